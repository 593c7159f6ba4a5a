"""Sampling a consistency model (Song et al. 2023, Algorithm 1) over a plan
``t_0 > t_1 > ... > t_K = 0`` whose last step is the schedule's first index, the
consistency boundary (:mod:`rcfd.core.consistency`)::

    x0 = f(x_T, t_0)
    for k = 1 .. K-1:  z = alpha_k x0 + sigma_k eps_k   (fresh noise)
                       x0 = f(z, t_k)

``K`` model calls; one step (``K = 1``) is ``f(x_T, T)``. ``f`` reads the model's output
through ``plan.prediction`` and is clipped to ``[-1, 1]`` when ``plan.clip`` (before the
re-noising too, as the paper's sampler clips its denoised images). The fresh noise
``eps_k`` comes from ``noise`` (a sequence of ``K - 1`` tensors of ``x_T``'s shape, from the
caller), or is drawn from ``generator``, or by default from a generator on ``x_T``'s device
seeded from ``x_T`` itself (:func:`noise_seed`): so a batch's images depend only on its
``x_T``, as the evaluation's reproducible noise wants, and two batches get different noise.
Reading that seed syncs the host once per batch, so a multistep run is not captured in a
CUDA graph (:class:`~rcfd.samplers.graph.GraphSampler` falls back to the eager sampler);
the one-step sampler draws nothing and is captured like the others.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from rcfd.core.consistency import SIGMA_DATA, consistency_output
from rcfd.core.seeds import derive_seed
from rcfd.samplers.plan import Plan, check_inputs, finish, predict_x0


def consistency_at(model: Callable, z: torch.Tensor, plan: Plan, i: int,
                   sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """``f(z, t_i)``: one model call at plan step ``i``, its output read as an x0 prediction
    (:func:`~rcfd.samplers.plan.predict_x0`, clipped only when ``plan.clip``: pass an
    unclipped plan for the consistency function itself), the boundary at the plan's last
    step."""
    return consistency_output(z, predict_x0(model, z, plan, i), plan.alpha[i], plan.sigma[i],
                              plan.alpha[-1], plan.sigma[-1], sigma_data)


def noise_seed(x_T: torch.Tensor) -> int:
    """The default seed of the re-noising: a hash of the bits of ``x_T``'s first 16 values
    (one host read), distinct for distinct starting noise."""
    head = x_T.detach().flatten()[:16].float().cpu()
    return derive_seed("rcfd-consistency-noise", *head.view(torch.int32).tolist())


@torch.no_grad()
def consistency(model: Callable, x_T: torch.Tensor, plan: Plan, *,
                noise: Sequence[torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Images from a consistency model over ``plan`` (module docstring); the plan must end
    at step 0, the boundary."""
    check_inputs(x_T, plan)
    if plan.steps[-1] != 0:
        raise ValueError(f"a consistency sampler's plan must end at step 0 (the boundary), got "
                         f"steps {list(plan.steps)}")
    if noise is not None and len(noise) != plan.num_steps - 1:
        raise ValueError(f"noise must hold {plan.num_steps - 1} tensors (one per re-noising), "
                         f"got {len(noise)}")
    raw = dataclasses.replace(plan, clip=False) if plan.clip else plan  # clip f, not x0_F
    x0 = finish(consistency_at(model, x_T, raw, 0), plan)
    if noise is None and generator is None and plan.num_steps > 1:
        generator = torch.Generator(device=x_T.device).manual_seed(noise_seed(x_T))
    for k in range(1, plan.num_steps):
        eps = (noise[k - 1] if noise is not None else
               torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype))
        z = (plan.alpha[k] * x0 + plan.sigma[k] * eps).to(x_T.dtype)
        x0 = finish(consistency_at(model, z, raw, k), plan)
    return x0
