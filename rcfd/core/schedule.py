"""The noise schedules and the ``(T, time_scale)`` indexing of METHOD.md: ours (cosine) and
a diffusers teacher's own (a table of ``alphas_cumprod``, "Teachers with their own schedule").

A sampler is described by ``(T, time_scale)``: its step ``t`` in ``0..T`` is schedule index
``t * time_scale``. Every distillation round halves ``T`` and doubles ``time_scale``, so all
samplers of one lineage index the same table of ``T * time_scale + 1`` entries.
The tables are float64 tensors on the CPU; :meth:`Schedule.on` gives them on a device in the
arithmetic dtype of the images (cached, so a training step gathers from resident tables and
copies nothing from the host). :func:`schedule_at`, :func:`per_sample` and :func:`diffuse` are
the one copy of the per-sample coefficient helpers every loss and sampler uses.

What a model's schedule is, is recorded as a plain-JSON *spec* (:func:`check_schedule_spec`):
``{"kind": "cosine"}`` (every model of ours; the default when a checkpoint records none) or
``{"kind": "diffusers", "alphas_cumprod": [...], "grid": G}``: a teacher trained on
``K = len(alphas_cumprod)`` integer timesteps, put on our grid of ``G + 1`` indices (``G`` a
power of two) by ``index i <-> timestep tau = i * (K - 1) / G`` (:func:`grid_timestep`), its
``abar(tau)`` interpolated log-linearly in log-SNR between integer timesteps and exact at
them (:func:`interpolated_abar`). Every sampler of such a lineage has ``T * time_scale = G``.
:func:`schedule_of` gives any model's tables from what its checkpoint says.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch

COSINE_OFFSET = 0.008  # "s" of Nichol & Dhariwal's cosine schedule
MAX_BETA = 0.999
COSINE_SPEC = {"kind": "cosine"}
SCHEDULE_KINDS = ("cosine", "diffusers")
MAX_TRAIN_TIMESTEPS = 100_000  # a diffusers teacher's num_train_timesteps, at most
MAX_GRID = 1 << 16


class Schedule(NamedTuple):
    """``alpha[k] = sqrt(abar[k])`` and ``sigma[k] = sqrt(1 - abar[k])`` for schedule index
    ``k = 0 .. T * time_scale`` (float64, CPU)."""

    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def num_indices(self) -> int:
        return self.alpha.shape[0]

    def on(self, device: torch.device | str, dtype: torch.dtype = torch.float32):
        """``(alpha, sigma)`` as ``dtype`` tensors on ``device``, made once per (table,
        device, dtype) and then reused (:func:`on_device`): converting the float64 table to
        ``dtype`` first and gathering afterwards gives the same values as gathering first."""
        device = torch.device(device)
        return on_device(self.alpha, device, dtype), on_device(self.sigma, device, dtype)


def on_device(table: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``table`` as ``dtype`` on ``device``, cached on the table tensor itself (its
    ``_rcfd_copies``, ``{(device, dtype): copy}``): the copies live and die with the table,
    so another table's copy can never be returned (as a cache keyed by ``id()`` could, once
    the id is reused). The tables are read-only: one changed in place keeps stale copies.
    An attribute read, unlike a weak dictionary, traces under torch.compile."""
    copies = getattr(table, "_rcfd_copies", None)
    if copies is None:
        copies = table._rcfd_copies = {}
    hit = copies.get((device, dtype))
    if hit is None:
        hit = copies[(device, dtype)] = table.to(dtype).to(device)
    return hit


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
    step"); the sampler goes from entry ``i`` of this list to entry ``i + 1``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > T or T % num_steps:
        raise ValueError(
            f"num_steps={num_steps} must divide the model's T={T} (and not exceed it); "
            f"try a power of two <= {T}"
        )
    stride = T // num_steps
    return list(range(T, -1, -stride))


# --------------------------------------------------------------------------- per-sample helpers


def coef_dtype(x: torch.Tensor) -> torch.dtype:
    """Arithmetic dtype of the schedule coefficients for images ``x``: float64 for float64
    images, fp32 otherwise (also under bf16 autocast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_sample(c, x: torch.Tensor):
    """A scalar as it is, or a ``[B]`` tensor viewed as ``[B, 1, ..., 1]`` against ``x``."""
    if isinstance(c, torch.Tensor) and c.dim() == 1:
        return c.reshape(-1, *([1] * (x.dim() - 1)))
    return c


def schedule_at(schedule: Schedule, index: torch.Tensor, like: torch.Tensor):
    """``(alpha[index], sigma[index])`` as ``[B]`` tensors on ``like``'s device, in
    :func:`coef_dtype` of ``like`` (METHOD.md, "Cosine schedule"); ``index`` is an int64
    ``[B]`` tensor of schedule indices. CPU indices are range-checked (a device index is not:
    reading it would synchronise)."""
    if index.dtype != torch.int64:
        raise TypeError(f"schedule index must be an int64 tensor, got {index.dtype}")
    n = schedule.num_indices
    if index.device.type == "cpu" and index.numel() and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"schedule index out of range 0..{n - 1}: {index.tolist()}")
    alpha, sigma = schedule.on(like.device, coef_dtype(like))
    index = index.to(like.device)
    return alpha[index], sigma[index]


def diffuse(x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor, schedule: Schedule):
    """``z_t = alpha_t x0 + sigma_t eps`` at schedule index ``index`` (METHOD.md, "Base
    training"), in ``x0``'s dtype; returns ``(z_t, alpha_t, sigma_t)``."""
    alpha_t, sigma_t = schedule_at(schedule, index, x0)
    z_t = (per_sample(alpha_t, x0) * x0 + per_sample(sigma_t, x0) * eps).to(x0.dtype)
    return z_t, alpha_t, sigma_t


# --------------------------------------------------------------------------- parameterisation

PREDICTIONS = ("x0", "eps", "v")  # what the network outputs (METHOD.md, "The network predicts x0")


def check_prediction(prediction: str) -> None:
    """Raise ``ValueError`` unless ``prediction`` is one of :data:`PREDICTIONS`."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(map(repr, PREDICTIONS))}; "
                         f"got {prediction!r}")


def eps_from_x0(z_t: torch.Tensor, x0: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """``eps_hat = (z_t - alpha_t * x0_hat) / sigma_t`` (METHOD.md, "The network predicts
    x0"), the inverse of ``z_t = alpha_t x0 + sigma_t eps``; coefficients are scalars, 0-dim
    or ``[B]`` tensors (:func:`per_sample`)."""
    return (z_t - per_sample(alpha_t, z_t) * x0) / per_sample(sigma_t, z_t)


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """``x0_hat = (z_t - sigma_t * eps_hat) / alpha_t`` (METHOD.md, the eps-predicting
    variant), the inverse of ``z_t = alpha_t x0 + sigma_t eps``; coefficients are scalars,
    0-dim or ``[B]`` tensors (:func:`per_sample`)."""
    return (z_t - per_sample(sigma_t, z_t) * eps) / per_sample(alpha_t, z_t)


def x0_from_v(z_t: torch.Tensor, v: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """``x0_hat = alpha_t z_t - sigma_t v_hat`` for ``v = alpha_t eps - sigma_t x0`` (METHOD.md,
    "Teachers with their own schedule"; exact when ``alpha^2 + sigma^2 = 1``, as on every
    schedule here). Never divides: finite wherever its inputs are."""
    return per_sample(alpha_t, z_t) * z_t - per_sample(sigma_t, z_t) * v


def outputs_to_x0_eps(out: torch.Tensor, z_t: torch.Tensor, alpha_t, sigma_t,
                      prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from a network output ``out`` that is ``prediction`` (``"x0"``,
    ``"eps"`` or ``"v"``) at ``z_t = alpha_t x0 + sigma_t eps``: the one copy of the
    conversion every loss and sampler uses. ``eps`` of a ``"v"`` output is
    ``sigma_t z_t + alpha_t v_hat`` (no division)."""
    if prediction == "x0":
        return out, eps_from_x0(z_t, out, alpha_t, sigma_t)
    if prediction == "eps":
        return x0_from_eps(z_t, out, alpha_t, sigma_t), out
    check_prediction(prediction)
    eps = per_sample(sigma_t, z_t) * z_t + per_sample(alpha_t, z_t) * out
    return x0_from_v(z_t, out, alpha_t, sigma_t), eps


def prediction_target(x0: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t,
                      prediction: str) -> torch.Tensor:
    """What a network of ``prediction`` should output for ``(x0, eps)``: ``x0``, ``eps`` or
    ``v = alpha_t eps - sigma_t x0``; the inverse of :func:`outputs_to_x0_eps`."""
    check_prediction(prediction)
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    return per_sample(alpha_t, x0) * eps - per_sample(sigma_t, x0) * x0


def check_sampler_fits(schedule: Schedule, T: int, time_scale: int) -> None:
    """Raise unless a ``(T, time_scale)`` sampler's indices lie inside ``schedule``."""
    if T * time_scale >= schedule.num_indices:
        raise ValueError(
            f"a (T={T}, time_scale={time_scale}) sampler needs schedule indices up to "
            f"{T * time_scale} but the schedule has {schedule.num_indices} entries; build it "
            f"with schedule_of(info) of the model's checkpoint"
        )


# --------------------------------------------------------------------------- a model's own schedule


def grid_timestep(index: torch.Tensor, num_train_timesteps: int, grid: int) -> torch.Tensor:
    """The teacher timestep ``tau = index * (K - 1) / G`` (float64) of our schedule index on
    a grid of ``G + 1`` indices for a ``K``-timestep teacher: exact for ``G`` a power of two."""
    return index.to(torch.float64) * (num_train_timesteps - 1) / grid


def interpolated_abar(alphas_cumprod: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``abar(tau)`` for real timesteps ``tau`` in ``[0, K - 1]`` (float64): log-SNR
    ``log(abar / (1 - abar))`` linear in ``tau`` between integer timesteps (METHOD.md,
    "Teachers with their own schedule"), and ``alphas_cumprod[k]`` itself, bit for bit, at
    an integer ``tau = k``."""
    abar = alphas_cumprod.to(torch.float64)
    tau = tau.to(torch.float64)
    if tau.numel() and (tau.min() < 0 or tau.max() > abar.shape[0] - 1):
        raise ValueError(f"timesteps must lie in [0, {abar.shape[0] - 1}]")
    lo = tau.floor().long()
    hi = (lo + 1).clamp(max=abar.shape[0] - 1)
    w = tau - lo
    logsnr = torch.log(abar) - torch.log1p(-abar)
    between = torch.sigmoid((1 - w) * logsnr[lo] + w * logsnr[hi])
    return torch.where(w == 0, abar[lo], between)


def check_schedule_spec(spec: Any) -> str | None:
    """``None`` when ``spec`` is a schedule spec (module docstring), else what is wrong with
    it: a kind of :data:`SCHEDULE_KINDS`; for ``"diffusers"`` 2 to :data:`MAX_TRAIN_TIMESTEPS`
    ``alphas_cumprod`` values strictly inside ``(0, 1)`` and non-increasing, and a power-of-two
    ``grid`` up to :data:`MAX_GRID`."""
    if not isinstance(spec, Mapping) or spec.get("kind") not in SCHEDULE_KINDS:
        return f"a dict with 'kind' one of {SCHEDULE_KINDS}, got {str(spec)[:80]}"
    if spec["kind"] == "cosine":
        return None
    abar, grid = spec.get("alphas_cumprod"), spec.get("grid")
    if (not isinstance(abar, (list, tuple)) or not 2 <= len(abar) <= MAX_TRAIN_TIMESTEPS
            or not all(isinstance(a, float) and 0.0 < a < 1.0 for a in abar)):
        return (f"'alphas_cumprod' must be 2 to {MAX_TRAIN_TIMESTEPS} floats in (0, 1) "
                "(a zero-terminal-SNR schedule is not supported)")
    if any(b > a for a, b in zip(abar, abar[1:])):
        return "'alphas_cumprod' must not increase"
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= MAX_GRID or grid & (grid - 1):
        return f"'grid' must be a power of two up to {MAX_GRID}, got {grid!r}"
    return None


def schedule_from_spec(spec: Mapping[str, Any] | None, T: int, time_scale: int) -> Schedule:
    """The tables of a ``(T, time_scale)`` sampler on the schedule ``spec`` (``None``: cosine):
    :func:`cosine_schedule`, or a diffusers teacher's ``alphas_cumprod`` on its grid (module
    docstring; ``T * time_scale`` must be at most its ``grid``). Raises ``ValueError`` for a
    malformed spec."""
    spec = COSINE_SPEC if spec is None else spec
    problem = check_schedule_spec(spec)
    if problem is not None:
        raise ValueError(f"invalid noise schedule: {problem}")
    if spec["kind"] == "cosine":
        return cosine_schedule(T, time_scale)
    check_sampler(T, time_scale)
    grid, abar = spec["grid"], torch.tensor(spec["alphas_cumprod"], dtype=torch.float64)
    if T * time_scale > grid:
        raise ValueError(f"a (T={T}, time_scale={time_scale}) sampler does not fit the "
                         f"teacher's grid of {grid} + 1 indices")
    tau = grid_timestep(torch.arange(grid + 1), abar.shape[0], grid)
    table = interpolated_abar(abar, tau)
    return Schedule(alpha=table.sqrt(), sigma=(1 - table).sqrt())


def schedule_of(info: Any) -> Schedule:
    """The noise schedule a checkpoint's model samples on, from its ``DiffusionInfo``
    (``T``, ``time_scale`` and ``noise_schedule``, the spec; cosine when it has none): the
    one function every sampler, loss and evaluation of a loaded model gets it from."""
    return schedule_from_spec(getattr(info, "noise_schedule", None), info.T, info.time_scale)


def describe_schedule(spec: Mapping[str, Any] | None) -> str:
    """A schedule spec in words, e.g. ``cosine`` or ``diffusers DDPMScheduler linear, 1000
    timesteps on a grid of 1024``."""
    if spec is None or spec.get("kind") == "cosine":
        return "cosine"
    return (f"diffusers {spec.get('scheduler', '')} {spec.get('beta_schedule', '')}, "
            f"{len(spec['alphas_cumprod'])} timesteps on a grid of {spec['grid']}")
