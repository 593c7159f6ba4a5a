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

Nothing is loaded at import: the extension (and with it ``torch.ops.rcfd.ddim_update*`` and
their fake kernels) is loaded by the first :func:`backend` query or DDIM call that needs it
(or :func:`load_extension`), the Triton kernels module (which registers the custom op
``torch.ops.rcfd.feature_kl``) by the first query or call of the KL; each once, under a lock.
The routes the calls take can be changed only explicitly: :func:`references` (every op on
its reference inside a block) and :func:`fresh_routes` (choose again inside a block, e.g.
after setting ``RCFD_BACKEND``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Union

import torch

from rcfd.core.extension import (  # noqa: F401  (extension_error, build_info: re-exported)
    DDIM_OPS,
    build_info,
    check_ddim_meta,
    extension_error,
    extension_loaded,
    kl_kernels,
    load_extension,
)
from rcfd.core.kernels import feature_kl_reference as kl_reference

log = logging.getLogger("rcfd")

Coef = Union[float, torch.Tensor]

# --------------------------------------------------------------------------- backend choice


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
        elif device.type == "cuda" and not build_info()["cuda"]:
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
        elif kl_kernels() is None:
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
# input checks and autograd kernel are C++ (csrc/); their fake kernels, which torch.compile
# and meta tensors use, are registered when the extension loads (rcfd.core.extension). Here
# is the public function, which only routes: the compiled op checks its own inputs, so the
# public path adds no Python checks of its own.


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
    check_ddim_meta(z_t, x0, named, op_dtypes=False)
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


class _Routes:
    """The backend of each (op, device type) the calls take (``table``), decided by
    :func:`backend` at the first call there (RCFD_BACKEND / RCFD_KL_BACKEND are read then)
    and reused: the public functions run once per sampler step, where a microsecond matters
    (reading os.environ alone costs about one), and under torch.compile a cached route is a
    constant, not a graph break. ``forced``: inside :func:`references`."""

    def __init__(self):
        self.table: dict = {}
        self.forced = False


_ROUTING = _Routes()


def route(op: str, device: torch.device | str) -> str:
    """The backend ``op``'s calls on ``device`` take: :func:`backend`'s choice at the first
    call there, then kept (``"reference"`` everywhere inside :func:`references`)."""
    if _ROUTING.forced:
        return "reference"
    if not isinstance(device, torch.device):
        device = torch.device(device)
    choice = _ROUTING.table.get((op, device.type))
    if choice is None:
        choice = _ROUTING.table[(op, device.type)] = backend(op, device)
    return choice


@contextlib.contextmanager
def references():
    """Inside the block every op runs its PyTorch reference (e.g. a benchmark's eager
    baseline), whatever was chosen before; the choice outside is unchanged."""
    old, _ROUTING.forced = _ROUTING.forced, True
    try:
        yield
    finally:
        _ROUTING.forced = old


@contextlib.contextmanager
def fresh_routes():
    """Inside the block the calls choose their backends afresh (reading RCFD_BACKEND and
    RCFD_KL_BACKEND again, e.g. after a test sets them); on exit the routes from before
    the block are restored."""
    old, _ROUTING.table = _ROUTING.table, {}
    try:
        yield
    finally:
        _ROUTING.table = old


def _ddim_uses_extension(z_t: torch.Tensor) -> bool:
    """Whether ``z_t``'s update runs on the compiled op (float64 always takes the reference)."""
    return z_t.dtype != torch.float64 and route("ddim_update", z_t.device) == "extension"


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
        return DDIM_OPS["scalar"](z_t, x0, *coefs, bool(clip))
    coefs = (_coef_tensor(alpha_s, "alpha_s", z_t), _coef_tensor(sigma_s, "sigma_s", z_t),
             _coef_tensor(alpha_t, "alpha_t", z_t), _coef_tensor(sigma_t, "sigma_t", z_t))
    return DDIM_OPS["tensor"](z_t, x0, *coefs, bool(clip))


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
    kl_reference.check_inputs(student, teacher, tau_teacher, tau_student, reduction)
    if student.dtype != torch.float64 and route("feature_kl", student.device) == "triton":
        return kl_kernels().feature_kl_triton(student, teacher, tau_teacher, tau_student, reduction)
    return kl_reference.feature_kl_reference(student, teacher, tau_teacher, tau_student, reduction)
