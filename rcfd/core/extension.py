"""Loading on first use: the compiled extension ``rcfd._C`` (the fused DDIM update's
schemas and kernels) with its fake kernels, and the Triton KL module.

:mod:`rcfd.core.ops` chooses the backends; what a backend needs is loaded here, the first
time it is asked for, once, under a lock, so that importing the package imports neither the
extension nor Triton. ``torch.ops.rcfd.ddim_update*`` exist once :func:`load_extension` ran;
``torch.ops.rcfd.feature_kl`` once :func:`kl_kernels` ran.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from types import ModuleType

import torch

DDIM_OPS: dict = {}  # the compiled DDIM ops' overloads, looked up once when the extension loads


class _Loaded:
    """What this module loads on first use, once each: the compiled extension (``ext``, or
    why not in ``ext_error``) and the Triton KL module (``kl``, None without Triton)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ext_tried = self.kl_tried = False
        self.ext: ModuleType | None = None
        self.ext_error: str | None = None
        self.kl: ModuleType | None = None


_LOADED = _Loaded()


def load_extension() -> ModuleType | None:
    """Import ``rcfd._C`` (which defines ``torch.ops.rcfd.ddim_update*``) and register its
    fake kernels, once, thread-safely; return it, or None when it cannot be imported (warned
    once; :func:`extension_error` says why, and the DDIM update runs its reference)."""
    if not _LOADED.ext_tried:
        with _LOADED.lock:
            if not _LOADED.ext_tried:
                _import_extension()
                _LOADED.ext_tried = True
    return _LOADED.ext


def _import_extension() -> None:
    try:
        ext = importlib.import_module("rcfd._C")  # the optional compiled extension
        _register_ddim_python()
        DDIM_OPS.update(tensor=torch.ops.rcfd.ddim_update.default,
                        scalar=torch.ops.rcfd.ddim_update_scalar.default)
        _LOADED.ext = ext
    except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
        _LOADED.ext_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "rcfd: the compiled extension rcfd._C could not be loaded "
            f"({_LOADED.ext_error}); the fused DDIM update falls back to PyTorch. Rebuild it "
            "with `pip install --no-build-isolation -e .` in this environment.",
            RuntimeWarning,
            stacklevel=4,
        )


def kl_kernels() -> ModuleType | None:
    """The Triton KL module :mod:`rcfd.core.kernels.feature_kl`, imported once (it imports
    Triton and registers ``torch.ops.rcfd.feature_kl``), or None when Triton is missing."""
    if not _LOADED.kl_tried:
        with _LOADED.lock:
            if not _LOADED.kl_tried:
                module = importlib.import_module("rcfd.core.kernels.feature_kl")
                _LOADED.kl = module if module.triton is not None else None
                _LOADED.kl_tried = True
    return _LOADED.kl


def extension_loaded() -> bool:
    """True when the compiled extension ``rcfd._C`` imported (loading it if need be)."""
    return load_extension() is not None


def extension_error() -> str | None:
    """Why the extension failed to import, or None."""
    load_extension()
    return _LOADED.ext_error


def build_info() -> dict:
    """What the extension was built with (torch, CUDA, archs), or ``{"loaded": False}``."""
    ext = load_extension()
    if ext is None:
        return {"loaded": False, "error": _LOADED.ext_error}
    return {"loaded": True, **ext.build_info()}


# --------------------------------------------------------------------------- DDIM fake kernels

_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ddim_memory_format(z_t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels work in (csrc/ddim_update.cpp, ``ddim_memory_format``):
    channels-last inputs stay channels-last, everything else is made contiguous."""
    if z_t.is_contiguous():
        return torch.contiguous_format
    if z_t.dim() == 4 and z_t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if z_t.dim() == 5 and z_t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def check_ddim_meta(z_t, x0, coefs: dict, op_dtypes: bool) -> None:
    """The checks of csrc/checks.h that need no values, with the same messages: for the fake
    kernels (``op_dtypes``: float32/16/bf16 images and float32 coefficient tensors, as the
    compiled op takes) and for the reference path (any float dtype)."""
    where = "rcfd::ddim_update" if op_dtypes else "ddim_update"
    for name, t in (("z_t", z_t), ("x0", x0)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    if z_t.dtype not in _IMAGE_DTYPES and (op_dtypes or z_t.dtype != torch.float64):
        raise TypeError(f"{where}: z_t must be float32, float16 or bfloat16, got {z_t.dtype}")
    if x0.dtype != z_t.dtype:
        raise TypeError(f"{where}: x0 is {x0.dtype} but z_t is {z_t.dtype}; cast one of them")
    if z_t.dim() < 1 or z_t.numel() == 0:
        raise ValueError(f"{where}: z_t must be a non-empty [B, ...] tensor, got shape {list(z_t.shape)}")
    if x0.shape != z_t.shape:
        raise ValueError(f"{where}: x0 has shape {list(x0.shape)} but z_t has {list(z_t.shape)}; "
                         "they must match")
    if x0.device != z_t.device:
        raise ValueError(f"{where}: x0 is on {x0.device} but z_t is on {z_t.device}; move one of them")
    for name, c in coefs.items():
        if not isinstance(c, torch.Tensor):
            continue
        if (c.dtype != torch.float32) if op_dtypes else not c.is_floating_point():
            kind = "float32" if op_dtypes else "floating-point"
            raise TypeError(f"{where}: {name} must be a {kind} tensor, got {c.dtype}")
        if c.device != z_t.device:
            raise ValueError(f"{where}: {name} is on {c.device} but z_t is on {z_t.device}; move it there")
        if not (c.dim() == 0 or (c.dim() == 1 and c.shape[0] in (1, z_t.shape[0]))):
            raise ValueError(f"{where}: {name} must have shape [] or [B] with B={z_t.shape[0]}, "
                             f"got {list(c.shape)}")


def _register_ddim_python() -> None:
    """Fake (meta) kernels of the compiled DDIM ops, so that they trace under torch.compile
    and run on meta tensors. Their autograd kernel is C++ (csrc/ddim_update_autograd.cpp)."""
    if getattr(_register_ddim_python, "done", False):
        return

    @torch.library.register_fake("rcfd::ddim_update")
    def _(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip=False):
        coefs = {"alpha_s": alpha_s, "sigma_s": sigma_s, "alpha_t": alpha_t, "sigma_t": sigma_t}
        check_ddim_meta(z_t, x0, coefs, op_dtypes=True)
        return torch.empty_like(z_t, memory_format=ddim_memory_format(z_t))

    @torch.library.register_fake("rcfd::ddim_update_scalar")
    def _(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip=False):
        check_ddim_meta(z_t, x0, {}, op_dtypes=True)
        if not sigma_t > 0:
            raise ValueError(f"rcfd::ddim_update: sigma_t must be > 0 (it divides), got {sigma_t:g}")
        return torch.empty_like(z_t, memory_format=ddim_memory_format(z_t))

    _register_ddim_python.done = True
