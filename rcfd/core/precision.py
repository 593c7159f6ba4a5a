"""Mixed precision: the one autocast helper of training and sampling.

The training loop runs its step under bf16 autocast on CUDA (``options.bf16``); the samplers
run the model under bf16 or fp16 autocast while their state ``z`` stays fp32. Both go
through :func:`autocast`, so the dtypes allowed and the capture-safe variant are defined once.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def autocast(device: torch.device | str, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to ``dtype`` on ``device``'s type (a null context for ``None`` or fp32).
    CUDA-graph capture passes ``cache=False``: casts cached by autocast must not outlive the
    capture. Any other dtype is a ValueError."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {dtype}")
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache)


def training_dtype(bf16: bool, device: torch.device | str) -> torch.dtype | None:
    """The training step's autocast dtype: bf16 on CUDA when ``bf16`` (``options.bf16``),
    else none (on the CPU bf16 autocast slows a step down and changes its numbers)."""
    return torch.bfloat16 if bf16 and torch.device(device).type == "cuda" else None
