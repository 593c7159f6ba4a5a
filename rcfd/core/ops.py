"""The package's fused ops, and the ONE place where their backend is chosen.

Two hot paths have kernels of their own:

* :func:`ddim_update`: the deterministic DDIM update (METHOD.md, "DDIM step") fused into
  one pass over memory by the C++/CUDA extension ``rcfd._C``;
* :func:`feature_kl`: the temperature-softmax KL of classifier-based feature distillation
  (METHOD.md, "Classifier-based feature distillation"), forward and backward in one Triton
  kernel (:mod:`rcfd.core.kernels.feature_kl`).

Each has a plain PyTorch reference (``*_reference``) that defines what the kernel computes
and serves where no kernel applies. :func:`backend` decides which implementation runs for
an op on a device; the decision is logged once per (op, device type) so a run always says
what it used. ``RCFD_BACKEND=reference`` forces the PyTorch references everywhere (the
DDIM update reads it once per device type, at its first call there) and
``RCFD_KL_BACKEND=triton`` runs the Triton KL on the CPU (through ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from typing import Union

import torch

from rcfd.core.kernels import feature_kl as fk

log = logging.getLogger("rcfd")

Coef = Union[float, torch.Tensor]

# --------------------------------------------------------------------------- extension

_EXT = None
_EXT_ERROR: str | None = None
_OPS: dict = {}  # the compiled DDIM ops' overloads, looked up once when the extension loads


def _load_extension():
    """Import ``rcfd._C`` once; on failure remember why and warn exactly once."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    try:
        from rcfd import _C  # noqa: F401, PLC0415 - the optional compiled extension; importing it registers torch.ops.rcfd

        _register_ddim_python()
        _OPS.update(tensor=torch.ops.rcfd.ddim_update.default,
                    scalar=torch.ops.rcfd.ddim_update_scalar.default)
        _EXT = _C
    except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
        _EXT_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "rcfd: the compiled extension rcfd._C could not be loaded "
            f"({_EXT_ERROR}); the fused DDIM update falls back to PyTorch. Rebuild it with "
            "`pip install --no-build-isolation -e .` in this environment.",
            RuntimeWarning,
            stacklevel=2,
        )
    return _EXT


def extension_loaded() -> bool:
    """True when the compiled extension ``rcfd._C`` imported."""
    return _load_extension() is not None


def extension_error() -> str | None:
    """Why the extension failed to import, or None."""
    _load_extension()
    return _EXT_ERROR


def build_info() -> dict:
    """What the extension was built with (torch, CUDA, archs), or ``{"loaded": False}``."""
    ext = _load_extension()
    if ext is None:
        return {"loaded": False, "error": _EXT_ERROR}
    return {"loaded": True, **ext.build_info()}


# --------------------------------------------------------------------------- backend choice


def _triton_available() -> bool:
    return fk.triton is not None


@functools.lru_cache(maxsize=None)
def _announce(op: str, device_type: str, choice: str, why: str) -> None:
    log.info("rcfd: %s on %s runs on the %s backend (%s)", op, device_type, choice, why)


def backend(op: str, device: torch.device | str) -> str:
    """Which implementation runs ``op`` on ``device``: ``"extension"``, ``"triton"`` or
    ``"reference"``. This is the only place the choice is made."""
    device = torch.device(device)
    forced = os.environ.get("RCFD_BACKEND", "").strip().lower()
    if forced not in ("", "auto", "reference"):
        raise ValueError(f"RCFD_BACKEND must be 'reference' or unset, got {forced!r}")
    if forced == "reference":
        choice, why = "reference", "RCFD_BACKEND=reference"
    elif op == "ddim_update":
        if not extension_loaded():
            choice, why = "reference", "extension not loaded"
        elif device.type == "cuda" and not _EXT.build_info()["cuda"]:
            choice, why = "reference", "extension built without CUDA kernels"
        elif device.type in ("cpu", "cuda"):
            choice, why = "extension", "fused kernel"
        else:
            choice, why = "reference", f"no kernel for {device.type}"
    elif op == "feature_kl":
        want = os.environ.get("RCFD_KL_BACKEND", "auto").strip().lower()
        if want not in ("auto", "triton", "reference"):
            raise ValueError(f"RCFD_KL_BACKEND must be auto, triton or reference, got {want!r}")
        if want == "reference":
            choice, why = "reference", "RCFD_KL_BACKEND=reference"
        elif not _triton_available():
            choice, why = "reference", "triton not installed"
        elif device.type == "cuda":
            choice, why = "triton", "fused kernel"
        elif want == "triton" and device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError(
                    "RCFD_KL_BACKEND=triton on the CPU needs TRITON_INTERPRET=1 set before "
                    "triton is imported"
                )
            choice, why = "triton", "TRITON_INTERPRET=1"
        else:
            choice, why = "reference", f"no Triton kernel on {device.type} by default"
    else:
        raise ValueError(f"unknown op {op!r}")
    _announce(op, device.type, choice, why)
    return choice


# --------------------------------------------------------------------------- DDIM update
#
# The compiled ops torch.ops.rcfd.ddim_update / ddim_update_scalar are the update alone (a
# sampler's DDIM step is the model call plus this update). Their schemas, CPU and CUDA kernels,
# input checks and autograd kernel are C++ (csrc/); here are their fake kernels, which
# torch.compile and meta tensors use, and the public function, which only routes: the
# compiled op checks its own inputs, so the public path adds no Python checks of its own.

_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ddim_memory_format(z_t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels work in (csrc/ddim_update.cpp, ``ddim_memory_format``):
    channels-last inputs stay channels-last, everything else is made contiguous."""
    if z_t.is_contiguous():
        return torch.contiguous_format
    if z_t.dim() == 4 and z_t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if z_t.dim() == 5 and z_t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _check_ddim_meta(z_t, x0, coefs: dict, op_dtypes: bool) -> None:
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
        _check_ddim_meta(z_t, x0, coefs, op_dtypes=True)
        return torch.empty_like(z_t, memory_format=_ddim_memory_format(z_t))

    @torch.library.register_fake("rcfd::ddim_update_scalar")
    def _(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip=False):
        _check_ddim_meta(z_t, x0, {}, op_dtypes=True)
        if not sigma_t > 0:
            raise ValueError(f"rcfd::ddim_update: sigma_t must be > 0 (it divides), got {sigma_t:g}")
        return torch.empty_like(z_t, memory_format=_ddim_memory_format(z_t))

    _register_ddim_python.done = True


def ddim_update_reference(
    z_t: torch.Tensor,
    x0: torch.Tensor,
    alpha_s: Coef,
    sigma_s: Coef,
    alpha_t: Coef,
    sigma_t: Coef,
    clip: bool = False,
) -> torch.Tensor:
    """``z_s = alpha_s * x0 + sigma_s * (z_t - alpha_t * x0) / sigma_t`` (METHOD.md, "DDIM
    step"), with ``x0`` clipped to ``[-1, 1]`` first when ``clip``; arithmetic in fp32
    (float64 for float64 inputs), result in the input dtype."""
    compute = torch.float64 if z_t.dtype == torch.float64 else torch.float32

    def coef(c):
        if isinstance(c, torch.Tensor):
            c = c.to(device=z_t.device, dtype=compute)
            return c.reshape(-1, *([1] * (z_t.dim() - 1))) if c.dim() == 1 else c
        return float(c)

    x = x0.to(compute)
    if clip:
        x = x.clamp(-1.0, 1.0)
    z = z_t.to(compute)
    out = coef(alpha_s) * x + coef(sigma_s) * (z - coef(alpha_t) * x) / coef(sigma_t)
    return out.to(z_t.dtype)


def _coef_float(c, name: str) -> float:
    try:
        return float(c)
    except (TypeError, ValueError):
        raise TypeError(f"ddim_update: {name} must be a float or a tensor, got {c!r}") from None


_COEF_NAMES = ("alpha_s", "sigma_s", "alpha_t", "sigma_t")


def _checked_reference(z_t, x0, coefs: tuple, clip: bool) -> torch.Tensor:
    """The PyTorch reference with the checks that the compiled op would have made (float64
    inputs, RCFD_BACKEND=reference, no extension)."""
    named = dict(zip(_COEF_NAMES, coefs))
    _check_ddim_meta(z_t, x0, named, op_dtypes=False)
    for name, c in named.items():
        if not isinstance(c, torch.Tensor):
            named[name] = _coef_float(c, name)
    s_t = named["sigma_t"]
    if isinstance(s_t, torch.Tensor):  # values on a device are not read (that would sync)
        positive = s_t.device.type != "cpu" or bool((s_t > 0).all())
    else:
        positive = s_t > 0
    if not positive:
        raise ValueError("ddim_update: sigma_t must be > 0 (it divides)")
    return ddim_update_reference(z_t, x0, *named.values(), clip)


# The backend of each (op, device type), decided by backend() at the first call there
# (RCFD_BACKEND / RCFD_KL_BACKEND are read then) and reused: the public functions run once per
# sampler step, where a microsecond matters (reading os.environ alone costs about one), and
# under torch.compile a cached route is a constant, not a graph break.
_ROUTES: dict = {}
_FORCED = [False]  # inside references(): every op on its PyTorch reference


def _route(op: str, device: torch.device) -> str:
    if _FORCED[0]:
        return "reference"
    choice = _ROUTES.get((op, device.type))
    if choice is None:
        choice = _ROUTES[(op, device.type)] = backend(op, device)
    return choice


def _ddim_backend(device: torch.device) -> str:
    return _route("ddim_update", device)


@contextlib.contextmanager
def references():
    """Inside the block every op runs its PyTorch reference (e.g. a benchmark's eager
    baseline), whatever was chosen before; the choice outside is unchanged."""
    old, _FORCED[0] = _FORCED[0], True
    try:
        yield
    finally:
        _FORCED[0] = old


def _ddim_uses_extension(z_t: torch.Tensor) -> bool:
    """Whether ``z_t``'s update runs on the compiled op (float64 always takes the reference)."""
    return z_t.dtype != torch.float64 and _ddim_backend(z_t.device) == "extension"


def _coef_tensor(c, name: str, z_t: torch.Tensor) -> torch.Tensor:
    """A coefficient as the float32 tensor the compiled op takes (a Python number of a mixed
    call becomes a 0-dim tensor on z_t's device; other float dtypes are cast)."""
    if isinstance(c, torch.Tensor):
        return c.float() if c.dtype != torch.float32 and c.is_floating_point() else c
    v = _coef_float(c, name)
    if name == "sigma_t" and not v > 0:  # the op reads tensor values on the CPU only
        raise ValueError(f"ddim_update: sigma_t must be > 0 (it divides), got {v:g}")
    return torch.full((), v, dtype=torch.float32, device=z_t.device)


def ddim_update(
    z_t: torch.Tensor,
    x0: torch.Tensor,
    alpha_s: Coef,
    sigma_s: Coef,
    alpha_t: Coef,
    sigma_t: Coef,
    *,
    clip: bool = False,
) -> torch.Tensor:
    """Fused DDIM update from index ``t`` to ``s``: ``z_s = alpha_s * x0 + sigma_s * (z_t -
    alpha_t * x0) / sigma_t`` with ``x0`` optionally clipped to ``[-1, 1]``.

    Coefficients are Python floats or tensors of shape ``[]`` or ``[B]`` on ``z_t``'s
    device. Inputs are float32, float16 or bfloat16 (arithmetic in fp32), contiguous or
    channels-last; float64 inputs take the float64 reference. Differentiable in ``z_t`` and
    ``x0``. Bad inputs raise TypeError / ValueError naming the argument.
    """
    Tensor = torch.Tensor
    if not (isinstance(z_t, Tensor) and isinstance(x0, Tensor) and _ddim_uses_extension(z_t)):
        return _checked_reference(z_t, x0, (alpha_s, sigma_s, alpha_t, sigma_t), clip)
    if not (isinstance(alpha_s, Tensor) or isinstance(sigma_s, Tensor)
            or isinstance(alpha_t, Tensor) or isinstance(sigma_t, Tensor)):
        try:
            coefs = (float(alpha_s), float(sigma_s), float(alpha_t), float(sigma_t))
        except (TypeError, ValueError):
            coefs = tuple(_coef_float(c, n) for c, n in zip((alpha_s, sigma_s, alpha_t, sigma_t), _COEF_NAMES))
        return _OPS["scalar"](z_t, x0, *coefs, bool(clip))
    coefs = (_coef_tensor(alpha_s, "alpha_s", z_t), _coef_tensor(sigma_s, "sigma_s", z_t),
             _coef_tensor(alpha_t, "alpha_t", z_t), _coef_tensor(sigma_t, "sigma_t", z_t))
    return _OPS["tensor"](z_t, x0, *coefs, bool(clip))


# --------------------------------------------------------------------------- feature KL


def feature_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau_teacher: float = 0.9,
    tau_student: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``KL(softmax(teacher / tau_teacher) || softmax(student / tau_student))`` over rows of
    ``[B, D]`` features; the gradient flows to ``student`` only. The loss is fp32 (float64
    for float64 inputs, which always take the float64 reference). See
    :mod:`rcfd.core.kernels.feature_kl`."""
    fk.check_inputs(student, teacher, tau_teacher, tau_student, reduction)
    if student.dtype != torch.float64 and _route("feature_kl", student.device) == "triton":
        return fk.feature_kl_triton(student, teacher, tau_teacher, tau_student, reduction)
    return fk.feature_kl_reference(student, teacher, tau_teacher, tau_student, reduction)


# Load the extension with the module, so that torch.ops.rcfd.* exist after `import rcfd.core.ops`
# (a failure is reported once, above, and the references take over).
_load_extension()
