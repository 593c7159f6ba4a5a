"""Sampler plans: everything a sampler needs besides the model and the noise ``x_T``.

A plan visits the sampler steps ``t_0 > t_1 > ... > t_K`` of a ``(T, time_scale)`` model
(METHOD.md, "Images and time"): step ``t_i`` is schedule index ``t_i * time_scale``, which is
also the model's time input. The plan holds, on the sampling device,

* ``t_index[i] = t_i * time_scale`` (int64 ``[K+1]``),
* ``alpha[i], sigma[i]`` = the schedule at ``t_index[i]`` (``[K+1]``, fp32 or float64),

made once, before sampling, so that a sampler reads ``plan.alpha[i]`` (a view, no host
sync, no gather) and can be captured in a CUDA graph. The helpers below are the pieces
every sampler shares: the clipped x0 prediction of one model call (METHOD.md, "The network
predicts x0") and the final ``clip(z_K, -1, 1)``.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import torch

from rcfd.core.schedule import (
    Schedule,
    check_prediction,
    check_sampler,
    check_sampler_fits,
    cosine_schedule,
    eps_from_x0,
    outputs_to_x0_eps,
    step_indices,
)

PLAN_DTYPES = (torch.float32, torch.float64)


def resolve_steps(T: int, num_steps: int | None = None,
                  steps: Sequence[int] | None = None) -> list[int]:
    """The sampler steps to visit: ``step_indices(T, num_steps)`` (``T, T - T/N, ..., 0``;
    METHOD.md, "DDIM step"), or an explicit strictly decreasing list of integers in
    ``0..T`` (at least two)."""
    if (num_steps is None) == (steps is None):
        raise ValueError("give exactly one of num_steps (an int) or steps (a list of steps)")
    if steps is None:
        return step_indices(T, num_steps)
    try:
        steps = [operator.index(s) for s in steps]
    except TypeError:
        raise TypeError(f"steps must be integers (sampler steps in 0..T), got {list(steps)}") from None
    if len(steps) < 2 or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be a strictly decreasing list of >= 2 steps, got {steps}")
    if steps[0] > T or steps[-1] < 0:
        raise ValueError(f"steps must lie in 0..T={T}, got {steps}")
    return steps


@dataclass(frozen=True, eq=False)
class Plan:
    """The sampler steps ``steps = (t_0, ..., t_K)`` of a model with ``time_scale``, and on
    one device ``t_index = steps * time_scale`` (int64 ``[K+1]``) with the schedule's
    ``alpha``, ``sigma`` there (``[K+1]``, fp32 or float64). ``prediction`` says what the
    model outputs (``"x0"``, ``"eps"`` or ``"v"``); ``clip`` clips its x0 predictions and the final
    ``z_K`` to ``[-1, 1]``. Build it with :func:`make_plan`.

    Two plans are equal (and hash alike) when their steps, time scale, prediction, clip,
    coefficient dtype and coefficient values agree, whatever their device."""

    steps: tuple[int, ...]
    time_scale: int
    t_index: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    prediction: str = "x0"
    clip: bool = True

    def __post_init__(self):
        check_prediction(self.prediction)
        if not isinstance(self.clip, bool):
            raise TypeError(f"clip must be a bool, got {self.clip!r}")
        if isinstance(self.time_scale, bool) or not isinstance(self.time_scale, int) or self.time_scale < 1:
            raise ValueError(f"time_scale must be a positive integer, got {self.time_scale!r}")
        steps = self.steps
        if (not isinstance(steps, tuple) or len(steps) < 2
                or any(not isinstance(s, int) or isinstance(s, bool) for s in steps)
                or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] < 0):
            raise ValueError(f"steps must be a tuple of >= 2 strictly decreasing ints >= 0, got {steps!r}")
        n = len(steps)
        if self.t_index.dtype != torch.int64 or tuple(self.t_index.shape) != (n,):
            raise ValueError(f"t_index must be an int64 [{n}] tensor, got {self.t_index.dtype} "
                             f"{tuple(self.t_index.shape)}")
        for name in ("alpha", "sigma"):
            c = getattr(self, name)
            if c.dtype not in PLAN_DTYPES or tuple(c.shape) != (n,):
                raise ValueError(f"{name} must be a float32 or float64 [{n}] tensor, got {c.dtype} "
                                 f"{tuple(c.shape)}")
            if c.device != self.t_index.device:
                raise ValueError(f"{name} is on {c.device} but t_index is on {self.t_index.device}")
        if self.alpha.dtype != self.sigma.dtype:
            raise ValueError(f"alpha is {self.alpha.dtype} but sigma is {self.sigma.dtype}")
        if self.t_index.device.type == "cpu":  # value checks only where they cost no device sync
            _check_values(self)

    @property
    def num_steps(self) -> int:
        """``K``: the number of steps (model calls) of the plan."""
        return len(self.steps) - 1

    @property
    def device(self) -> torch.device:
        return self.t_index.device

    @property
    def dtype(self) -> torch.dtype:
        """The coefficients' dtype (fp32 or float64)."""
        return self.alpha.dtype

    @cached_property
    def key(self) -> tuple:
        """What identifies the plan, device aside (host values; reading them from a CUDA
        plan syncs once, plans made by :func:`make_plan` carry it from the CPU)."""
        return (self.steps, self.time_scale, self.prediction, self.clip, self.dtype,
                tuple(self.alpha.tolist()), tuple(self.sigma.tolist()))

    def __eq__(self, other):
        return isinstance(other, Plan) and self.key == other.key

    def __hash__(self):
        return self._key_hash

    @cached_property
    def _key_hash(self) -> int:
        return hash(self.key)

    def to(self, device: torch.device | str, *, copy: bool = False) -> "Plan":
        """The plan with its tensors on ``device`` (``copy=True``: fresh tensors even when
        already there, e.g. for a CUDA graph that must own the memory it reads)."""
        device = torch.device(device)
        moved = dataclasses.replace(
            self, **{name: getattr(self, name).to(device, copy=copy)
                     for name in ("t_index", "alpha", "sigma")})
        if "key" in self.__dict__:  # same values: keep the host copy, no sync for the new one
            moved.__dict__["key"] = self.key
        return moved


def _check_values(plan: Plan) -> None:
    want = torch.tensor(plan.steps, dtype=torch.int64) * plan.time_scale
    if not torch.equal(plan.t_index, want):
        raise ValueError(f"t_index must be steps * time_scale = {want.tolist()}, got {plan.t_index.tolist()}")
    for name in ("alpha", "sigma"):
        c = getattr(plan, name)
        if not bool(torch.isfinite(c).all() & (c > 0).all()):
            raise ValueError(f"{name} must be finite and > 0 at every step (it divides), got {c.tolist()}")


def make_plan(schedule: Schedule | None, T: int, time_scale: int, num_steps: int | None = None, *,
              steps: Sequence[int] | None = None, prediction: str = "x0", clip: bool = True,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Plan:
    """The plan of a ``(T, time_scale)`` model over ``step_indices(T, num_steps)`` or the
    explicit strictly decreasing ``steps`` in ``0..T``: schedule indices ``t * time_scale``
    and ``alpha``, ``sigma`` of ``schedule`` there (``None``: ``cosine_schedule(T,
    time_scale)``), as ``dtype`` (fp32 or float64) tensors on ``device``."""
    check_sampler(T, time_scale)
    check_prediction(prediction)
    if dtype not in PLAN_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    steps = resolve_steps(T, num_steps, steps)
    schedule = cosine_schedule(T, time_scale) if schedule is None else schedule
    check_sampler_fits(schedule, T, time_scale)
    t_index = torch.tensor(steps, dtype=torch.int64) * time_scale
    plan = Plan(steps=tuple(steps), time_scale=time_scale, t_index=t_index,
                alpha=schedule.alpha[t_index].to(dtype), sigma=schedule.sigma[t_index].to(dtype),
                prediction=prediction, clip=clip)
    plan.key  # noqa: B018  (computed on the CPU, carried by .to)
    return plan.to(device)


# --------------------------------------------------------------------------- shared by samplers


def check_inputs(x_T: torch.Tensor, plan: Plan) -> None:
    """Metadata checks only (no device sync): a float ``x_T`` of shape ``[B, ...]`` on the
    plan's device."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a rcfd.samplers.Plan (see make_plan), got {type(plan).__name__}")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise TypeError("x_T must be a float tensor of shape [B, ...]")
    if x_T.device != plan.device:
        raise ValueError(f"the plan is on {plan.device} but x_T is on {x_T.device}; "
                         f"use plan.to(x_T.device)")


def predict_x0(model: Callable, z: torch.Tensor, plan: Plan, i: int) -> torch.Tensor:
    """``x0_i = clip(x0_theta(z_i, t_i * time_scale), -1, 1)`` from ONE model call
    (METHOD.md, "The network predicts x0"): for ``prediction="eps"`` the output is
    ``eps_hat`` and ``x0_i = (z_i - sigma_i eps_hat) / alpha_i``, for ``"v"`` it is
    ``v_hat`` and ``x0_i = alpha_i z_i - sigma_i v_hat``; the clip applies when
    ``plan.clip``. The model's output (bf16 under autocast) is cast to ``z``'s dtype."""
    out = model(z, plan.t_index[i].expand(z.shape[0]))
    if out.shape != z.shape:
        raise ValueError(f"the model returned shape {tuple(out.shape)} for input {tuple(z.shape)}; "
                         "it must predict an image of the input's shape")
    out = out.to(z.dtype)
    if plan.prediction != "x0":
        out, _ = outputs_to_x0_eps(out, z, plan.alpha[i], plan.sigma[i], plan.prediction)
    return out.clamp(-1.0, 1.0) if plan.clip else out


def eps_of(z: torch.Tensor, x0: torch.Tensor, plan: Plan, i: int) -> torch.Tensor:
    """``eps_i = (z_i - alpha_i x0_i) / sigma_i`` (METHOD.md, "The network predicts x0") at
    plan step ``i``: :func:`~rcfd.core.schedule.eps_from_x0` with the plan's coefficients."""
    return eps_from_x0(z, x0, plan.alpha[i], plan.sigma[i])


def finish(z: torch.Tensor, plan: Plan) -> torch.Tensor:
    """A sampler's result: ``clip(z_K, -1, 1)`` when ``plan.clip``, the raw ``z_K`` when not
    (unclipped sampling, e.g. to measure an ODE solver's error)."""
    return z.clamp(-1.0, 1.0) if plan.clip else z
