"""Batched generation for evaluation: reproducible noise, split over ranks, through any
sampler (captured in CUDA graphs on a GPU)."""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from rcfd.samplers.graph import GraphSampler
from rcfd.samplers.plan import Plan
from rcfd.samplers.registry import SamplerLike, get_sampler, sample, sampler_name


def noise_batches(n: int, batch_size: int, shape: Sequence[int], generator: torch.Generator,
                  indices: range | None = None) -> Iterator[torch.Tensor]:
    """The starting noise of samples ``indices`` (default: all ``n``), in batches of up to
    ``batch_size``. It is drawn as one process drawing all ``n`` would draw it: batches of
    ``batch_size`` from ``generator``, in order. A block of ``indices`` therefore holds the
    same noise whatever the other blocks are, so the union over ranks of their
    :func:`rcfd.distributed.shard_range` blocks is one process's sample set for any world
    size; a block pays for drawing (and dropping) the noise before it, on the CPU."""
    indices = range(n) if indices is None else indices
    if indices.step != 1 or indices.start < 0 or indices.stop > n:
        raise ValueError(f"indices must be a contiguous block of range({n}), got {indices}")
    pending, count = [], 0
    for start in range(0, indices.stop, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn((b, *shape), generator=generator, device=generator.device)
        keep = x[max(0, indices.start - start):indices.stop - start]
        if keep.shape[0]:
            pending.append(keep)
            count += keep.shape[0]
        while count >= batch_size or (count and start + b >= indices.stop):
            rows = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield rows[:batch_size]
            count = max(0, count - batch_size)
            pending = [rows[batch_size:]] if count else []


def generate(model: Callable, n: int, batch_size: int, *, shape: Sequence[int], plan: Plan,
             sampler: SamplerLike = "ddim", device: torch.device | str = "cpu", seed: int = 0,
             generator: torch.Generator | None = None,
             autocast_dtype: torch.dtype | None = None, use_cuda_graph: bool = True,
             progress: bool = True, indices: range | None = None) -> Iterator[torch.Tensor]:
    """Yield ``n`` images of ``shape`` ``(C, H, W)`` (in ``[-1, 1]`` when ``plan.clip``) in
    batches of ``batch_size`` (the last may be smaller), from ``sampler`` (a name of
    :data:`rcfd.samplers.SAMPLERS` or a sampler function) over ``plan``. With ``indices``
    only those of the ``n`` (a contiguous block: one rank's share, the same images whatever
    the world size; see :func:`noise_batches`). The noise is drawn on the CPU from
    ``generator`` (default: seeded with ``seed``), so a seed gives the same images on any
    device; on CUDA the batches run through a :class:`GraphSampler` (the model must be in
    eval mode)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    device = torch.device(device)
    fn = get_sampler(sampler)
    plan = plan.to(device)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    if use_cuda_graph and device.type == "cuda":
        run = GraphSampler(model, plan, fn, autocast_dtype=autocast_dtype)
    else:
        run = functools.partial(sample, model, plan=plan, sampler=fn, autocast_dtype=autocast_dtype)
    total = n if indices is None else len(indices)
    label = f"{plan.num_steps}-step {sampler_name(fn)}"
    with tqdm(total=total, unit="img", desc=label, disable=not progress) as bar:
        for x_T in noise_batches(n, batch_size, shape, generator, indices):
            yield run(x_T.to(device))
            bar.update(x_T.shape[0])
