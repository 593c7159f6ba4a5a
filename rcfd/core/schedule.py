"""The cosine noise schedule and the ``(T, time_scale)`` indexing of METHOD.md.

A sampler is described by ``(T, time_scale)``: its step ``t`` in ``0..T`` is schedule index
``t * time_scale``. Every distillation round halves ``T`` and doubles ``time_scale``, so all
samplers of one lineage index the same table of ``T * time_scale + 1`` entries.
Everything here is a pure function of integers and returns float64 tensors on the CPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

COSINE_OFFSET = 0.008  # "s" of Nichol & Dhariwal's cosine schedule
MAX_BETA = 0.999


class Schedule(NamedTuple):
    """``alpha[k] = sqrt(abar[k])`` and ``sigma[k] = sqrt(1 - abar[k])`` for schedule index
    ``k = 0 .. T * time_scale`` (float64, CPU)."""

    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def num_indices(self) -> int:
        return self.alpha.shape[0]


def check_sampler(T: int, time_scale: int) -> None:
    """Raise ``ValueError`` unless ``(T, time_scale)`` are positive integers."""
    for name, v in (("T", T), ("time_scale", time_scale)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def cosine_abar(T: int, time_scale: int) -> torch.Tensor:
    """Cumulative ``abar[k]``, ``k = 0 .. N-1`` with ``N = T * time_scale + 1`` (METHOD.md,
    "Cosine schedule"): ``f(i) = cos(((i / N) + s) / (1 + s) * pi / 2) ** 2`` for
    ``i = 0..N``; ``beta_i = min(1 - f(i) / f(i-1), 0.999)`` for ``i = 1..N``;
    ``abar[k] = prod_{j <= k} (1 - beta_{j+1})``. Note ``abar[0] < 1``: index 0 is not
    noise-free, exactly as the reference implementation (its checkpoints depend on it)."""
    check_sampler(T, time_scale)
    n = T * time_scale + 1
    i = torch.arange(n + 1, dtype=torch.float64)
    f = torch.cos((i / n + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    abar_raw = f / f[0]
    betas = torch.clamp(1 - abar_raw[1:] / abar_raw[:-1], max=MAX_BETA)
    return torch.cumprod(1 - betas, dim=0)


def cosine_schedule(T: int, time_scale: int) -> Schedule:
    """The ``(alpha, sigma)`` tables of a ``(T, time_scale)`` sampler, indexed by schedule
    index ``t * time_scale``."""
    abar = cosine_abar(T, time_scale)
    return Schedule(alpha=abar.sqrt(), sigma=(1 - abar).sqrt())


def step_indices(T: int, num_steps: int) -> list[int]:
    """Sampler steps ``t`` visited by an ``num_steps``-step DDIM sampler of a ``T``-step
    model: ``T, T - stride, ..., 0`` with ``stride = T / num_steps`` (METHOD.md, "DDIM
    step"); the sampler goes from ``ts[i]`` to ``ts[i+1]``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > T or T % num_steps:
        raise ValueError(
            f"num_steps={num_steps} must divide the model's T={T} (and not exceed it); "
            f"try a power of two <= {T}"
        )
    stride = T // num_steps
    return list(range(T, -1, -stride))
