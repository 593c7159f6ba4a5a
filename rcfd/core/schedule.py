"""The cosine noise schedule and the ``(T, time_scale)`` indexing of METHOD.md.

A sampler is described by ``(T, time_scale)``: its step ``t`` in ``0..T`` is schedule index
``t * time_scale``. Every distillation round halves ``T`` and doubles ``time_scale``, so all
samplers of one lineage index the same table of ``T * time_scale + 1`` entries.
The tables are float64 tensors on the CPU; :meth:`Schedule.on` gives them on a device in the
arithmetic dtype of the images (cached, so a training step gathers from resident tables and
copies nothing from the host). :func:`schedule_at`, :func:`per_sample` and :func:`diffuse` are
the one copy of the per-sample coefficient helpers every loss and sampler uses.
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

PREDICTIONS = ("x0", "eps")  # what the network outputs (METHOD.md, "The network predicts x0")


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


def check_sampler_fits(schedule: Schedule, T: int, time_scale: int) -> None:
    """Raise unless a ``(T, time_scale)`` sampler's indices lie inside ``schedule``."""
    if T * time_scale >= schedule.num_indices:
        raise ValueError(
            f"a (T={T}, time_scale={time_scale}) sampler needs schedule indices up to "
            f"{T * time_scale} but the schedule has {schedule.num_indices} entries; build it "
            f"with cosine_schedule(T, time_scale) of the base model"
        )
