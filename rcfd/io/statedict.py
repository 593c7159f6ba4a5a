"""State dicts checked against the model they go into: the checks every checkpoint loader
runs (on the ``meta`` device, before any memory is spent on the model), and the wrappers
(DistributedDataParallel, torch.compile) removed from modules and keys. Re-exported by
:mod:`rcfd.io.checkpoint`, where the package imports them from.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from rcfd.errors import StateDictMismatchError
from rcfd.io.files import short_repr

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (torch.compile)
    prefix carried by every key."""
    sd = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        while sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _dtype_kind(dtype: torch.dtype) -> str:
    return ("bool" if dtype == torch.bool else "complex" if dtype.is_complex
            else "float" if dtype.is_floating_point else "integer")


def _stored_in_full(t: torch.Tensor) -> bool:
    """The tensor's values are in its storage, not broadcast from fewer bytes (an expanded,
    stride-0 tensor costs a few bytes in a file and its full size in a model)."""
    return t.device.type != "meta" and t.numel() * t.element_size() <= t.untyped_storage().nbytes()


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], what: str = "model", *,
                     show: int = 5) -> None:
    """Raise :class:`StateDictMismatchError` unless ``state_dict`` fits ``model`` exactly:
    it names the missing, unexpected, mis-shaped, wrong-kind (float / integer / bool) and
    not-fully-stored entries (``show`` of each, then counts). Works on a ``meta`` model,
    so a state dict can be checked before any memory is spent on the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes, kinds, partial = [], [], []
    for k, v in expected.items():
        if k not in state_dict or not isinstance(v, torch.Tensor):
            continue
        t = state_dict[k]
        if not isinstance(t, torch.Tensor):
            kinds.append(f"{k}: checkpoint holds {short_repr(t)}, not a tensor")
        elif tuple(t.shape) != tuple(v.shape):
            shapes.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(v.shape)}")
        elif _dtype_kind(t.dtype) != _dtype_kind(v.dtype):
            kinds.append(f"{k}: checkpoint {t.dtype} vs model {v.dtype}")
        elif not _stored_in_full(t):
            partial.append(f"{k}: {tuple(t.shape)} from {t.untyped_storage().nbytes()} bytes")
    if missing or unexpected or shapes or kinds or partial:
        parts = [f"{what}: the state dict does not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes), ("dtype mismatch", kinds),
                             ("not stored in full (broadcast views)", partial)):
            if items:
                more = f" ... and {len(items) - show} more" if len(items) > show else ""
                parts.append(f"{len(items)} {title}: " + ", ".join(map(str, items[:show])) + more)
        if any(isinstance(k, str) and k.startswith(_WRAPPER_PREFIXES) for k in unexpected):
            parts.append("hint: strip the wrapper prefix with strip_wrapper_prefixes()")
        raise StateDictMismatchError("; ".join(parts))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any],
                           what: str = "model", *, show: int = 5) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` after :func:`check_state_dict`,
    whose error names every mismatch."""
    check_state_dict(model, state_dict, what, show=show)
    model.load_state_dict(state_dict, strict=True)


def build_checked(build: Callable[[], nn.Module], state_dict: Mapping[str, Any],
                  what: str = "model", *, show: int = 5) -> nn.Module:
    """``build()`` on the ``meta`` device, :func:`check_state_dict` against it, and only
    then ``build()`` for real (on the default device) and load ``state_dict`` strictly."""
    with torch.device("meta"):
        shell = build()
    check_state_dict(shell, state_dict, what, show=show)
    model = build()
    model.load_state_dict(state_dict, strict=True)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
