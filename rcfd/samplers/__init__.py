"""Samplers as pure functions over an explicit plan (METHOD.md, "DDIM step" and
"Training-free samplers for the base model").

* :func:`make_plan` -> :class:`Plan`: the sampler steps ``t_0 > ... > t_K`` of a
  ``(T, time_scale)`` model, their schedule indices ``t_i * time_scale`` and ``alpha_i``,
  ``sigma_i`` as device tensors, what the model predicts and whether to clip;
* samplers ``sampler(model, x_T, plan) -> images``: :func:`ddim`, :func:`dpm_solver_2m`
  (DPM-Solver++(2M)), :func:`pndm` (PLMS), by name in :data:`SAMPLERS`; every state update
  is the fused :func:`rcfd.core.ops.ddim_update`;
* :class:`GraphSampler`: any sampler captured as one CUDA graph;
* :func:`generate` / :func:`noise_batches`: reproducible batched generation for metrics,
  image ``i``'s noise fixed by the seed and ``i`` alone (any batch size, any process count).

    plan = make_plan(cosine_schedule(T, time_scale), T, time_scale, 4, device="cuda")
    images = get_sampler("dpm-solver")(model, x_T, plan)
"""

from rcfd.samplers.ddim import ddim, ddim_transfer
from rcfd.samplers.dpm_solver import dpm_solver_2m
from rcfd.samplers.generate import (
    DTYPES,
    NOISE_CHUNK,
    NoiseStream,
    chunk_seed,
    generate,
    noise_batches,
    sampling_dtype,
    shard_samples,
)
from rcfd.samplers.graph import GraphSampler
from rcfd.samplers.plan import Plan, finish, make_plan, predict_x0, resolve_steps
from rcfd.samplers.pndm import pndm
from rcfd.samplers.registry import SAMPLERS, Sampler, get_sampler, sample, sampler_name

__all__ = [
    "Plan", "make_plan", "resolve_steps", "predict_x0", "finish",
    "ddim", "ddim_transfer", "dpm_solver_2m", "pndm",
    "SAMPLERS", "Sampler", "get_sampler", "sampler_name", "sample",
    "GraphSampler", "generate", "noise_batches", "shard_samples", "chunk_seed", "NoiseStream",
    "NOISE_CHUNK", "sampling_dtype", "DTYPES",
]
