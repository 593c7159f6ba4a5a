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
seeded from ``x_T`` itself (:func:`noise_seed`). :func:`rcfd.samplers.generate` (the
evaluation, ``rcfd.sample``, ``Model.sample``) always passes ``noise``: per-image noise
from its own stream (``fresh_noise(plan) = K - 1`` tensors an image), so image ``i``'s
re-noising, like its ``x_T``, is the same whatever the batch size. The default is for a
direct call on one batch: it depends on the whole batch's ``x_T`` (a hash of its first
values), so it is reproducible for a given batch but NOT batch-size independent. Reading
that seed syncs the host once per batch, so the default noise is drawn before the loop
(:func:`renoising_noise`), all ``K - 1`` tensors in the order the loop uses them, and
:func:`graph_inputs` lets :class:`~rcfd.samplers.graph.GraphSampler` draw it eagerly per
batch outside the captured region when no ``noise`` is passed. The one-step sampler draws
nothing.
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


def renoising_noise(x_T: torch.Tensor, plan: Plan,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The ``K - 1`` re-noising tensors of a ``K``-step run from ``x_T``: drawn in order
    from ``generator``, by default one on ``x_T``'s device seeded from :func:`noise_seed`
    (``[]`` for one step, without reading ``x_T``)."""
    if plan.num_steps < 2:
        return []
    if generator is None:
        generator = torch.Generator(device=x_T.device).manual_seed(noise_seed(x_T))
    return [torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype)
            for _ in range(plan.num_steps - 1)]


def graph_inputs(x_T: torch.Tensor, plan: Plan) -> dict:
    """What :class:`~rcfd.samplers.graph.GraphSampler` computes eagerly before each replay
    and passes as static keyword inputs: ``{"noise": renoising_noise(x_T, plan)}``."""
    return {"noise": renoising_noise(x_T, plan)}


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
    if noise is None:
        noise = renoising_noise(x_T, plan, generator)
    x0 = finish(consistency_at(model, x_T, raw, 0), plan)
    for k in range(1, plan.num_steps):
        z = (plan.alpha[k] * x0 + plan.sigma[k] * noise[k - 1]).to(x_T.dtype)
        x0 = finish(consistency_at(model, z, raw, k), plan)
    return x0


def fresh_noise(plan: Plan) -> int:
    """How many noise tensors of ``x_T``'s shape a run over ``plan`` reads: ``K - 1``."""
    return max(plan.num_steps - 1, 0)


consistency.graph_inputs = graph_inputs  # what GraphSampler draws outside its capture
consistency.fresh_noise = fresh_noise  # what rcfd.samplers.generate draws per image
