"""The samplers by name, and the eager way to run one (optionally under autocast).

A sampler is a pure function ``sampler(model, x_T, plan) -> images``: no host syncs and no
branching on tensor values, so that :class:`rcfd.samplers.graph.GraphSampler` can capture
any of them in a CUDA graph. A sampler that draws fresh noise while it runs (the multistep
consistency sampler) takes it as a ``noise`` keyword (a list of tensors of ``x_T``'s shape)
and says how many it reads in ``sampler.fresh_noise(plan)``, so that
:func:`rcfd.samplers.generate` can draw them per image, like ``x_T``.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from rcfd.core.precision import autocast
from rcfd.samplers.consistency import consistency
from rcfd.samplers.ddim import ddim
from rcfd.samplers.dpm_solver import dpm_solver_2m
from rcfd.samplers.plan import Plan
from rcfd.samplers.pndm import pndm

Sampler = Callable[[Callable, torch.Tensor, Plan], torch.Tensor]
SamplerLike = Union[str, Sampler]

SAMPLERS: dict[str, Sampler] = {"ddim": ddim, "dpm-solver": dpm_solver_2m, "pndm": pndm,
                                "consistency": consistency}
# The training-free samplers of a diffusion model (the base model's rows); "consistency"
# samples a consistency model (rcfd.methods.cd) and is not one of them.
TRAINING_FREE = ("ddim", "dpm-solver", "pndm")


def get_sampler(sampler: SamplerLike) -> Sampler:
    """The sampler function named ``sampler`` (a key of :data:`SAMPLERS`); a function is
    returned as it is."""
    if callable(sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(map(repr, SAMPLERS))}")
    return SAMPLERS[sampler]


def sampler_name(sampler: SamplerLike) -> str:
    """The registry name of ``sampler`` (a function's own name when it is not registered)."""
    fn = get_sampler(sampler)
    return next((k for k, v in SAMPLERS.items() if v is fn), getattr(fn, "__name__", repr(fn)))


def sample(model: Callable, x_T: torch.Tensor, plan: Plan, sampler: SamplerLike = "ddim", *,
           autocast_dtype: torch.dtype | None = None, **inputs) -> torch.Tensor:
    """Run ``sampler`` eagerly from ``x_T`` over ``plan`` (moved to ``x_T``'s device), the
    model under autocast to ``autocast_dtype`` when given (``z`` stays in ``x_T``'s dtype);
    ``inputs`` go to the sampler as keywords (the consistency sampler's ``noise``)."""
    fn = get_sampler(sampler)
    with autocast(x_T.device, autocast_dtype):
        return fn(model, x_T, plan.to(x_T.device), **inputs)
