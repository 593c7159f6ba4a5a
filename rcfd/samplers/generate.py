"""Batched generation for evaluation: reproducible noise drawn on the sampling device, split
over ranks, through any sampler (captured in CUDA graphs on a GPU).

The ``n`` samples are numbered ``0..n-1`` and cut into batches of ``batch_size``; batch ``k``
starts from noise drawn on the device from its own generator, seeded with a hash of
``(seed, k)``. So a batch's images depend only on the seed, its index and the device type
(CPU and CUDA generators differ), never on which other batches are made: a rank makes its
block of whole batches (:func:`shard_batches`) and the union over ranks is one process's
sample set, for any world size. Nothing synchronises the host per batch.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from rcfd.core.seeds import derive_seed
from rcfd.samplers.graph import GraphSampler, capture_unavailable
from rcfd.samplers.plan import Plan
from rcfd.samplers.registry import SamplerLike, get_sampler, sample, sampler_name

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sampling_dtype(dtype: str, device: torch.device | str) -> str:
    """The model dtype to sample in: ``"auto"`` is ``"bf16"`` on CUDA (the model runs under
    bf16 autocast while the sampler's state stays fp32) and ``"fp32"`` elsewhere."""
    if dtype == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch ``k``'s noise: a 63-bit hash of ``(seed, k)``
    (:func:`rcfd.core.seeds.derive_seed` of ``("rcfd-noise", seed, k)``)."""
    return derive_seed("rcfd-noise", seed, k)


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """The samples rank ``rank`` of ``world_size`` makes: a contiguous block of whole batches
    (the first ranks take one batch more when they do not divide evenly); the blocks in rank
    order tile ``range(n)``."""
    num_batches = -(-n // batch_size)
    per, extra = divmod(num_batches, world_size)
    first = rank * per + min(rank, extra)
    last = first + per + (rank < extra)
    return range(min(n, first * batch_size), min(n, last * batch_size))


def noise_batches(n: int, batch_size: int, shape: Sequence[int], seed: int,
                  device: torch.device | str = "cpu",
                  indices: range | None = None) -> Iterator[torch.Tensor]:
    """The starting noise of samples ``indices`` (default: all ``n``; a block of whole
    batches, see :func:`shard_batches`), one batch at a time, drawn on ``device`` (module
    docstring)."""
    indices = range(n) if indices is None else indices
    aligned = not indices or (indices.start % batch_size == 0
                              and (indices.stop == n or indices.stop % batch_size == 0))
    if indices.step != 1 or indices.start < 0 or indices.stop > n or not aligned:
        raise ValueError(f"indices must be a block of whole batches of {batch_size} in range({n}), "
                         f"got {indices}; use shard_batches")
    device = torch.device(device)
    for start in range(indices.start, indices.stop, batch_size):
        b = min(batch_size, n - start)
        generator = torch.Generator(device=device).manual_seed(batch_seed(seed, start // batch_size))
        yield torch.randn((b, *shape), generator=generator, device=device)


def generate(model: Callable, n: int, batch_size: int, *, shape: Sequence[int], plan: Plan,
             sampler: SamplerLike = "ddim", device: torch.device | str = "cpu", seed: int = 0,
             dtype: str = "auto", use_cuda_graph: bool = True, compile: bool | None = None,
             progress: bool = True, indices: range | None = None) -> Iterator[torch.Tensor]:
    """Yield ``n`` images of ``shape`` ``(C, H, W)`` (in ``[-1, 1]`` when ``plan.clip``) on
    ``device``, in batches of ``batch_size`` (the last may be smaller), from ``sampler`` (a
    name of :data:`rcfd.samplers.SAMPLERS` or a sampler function) over ``plan``, the model in
    ``dtype`` (:func:`sampling_dtype`). With ``indices`` only those of the ``n`` (one rank's
    block, :func:`shard_batches`). On CUDA the batches run through a :class:`GraphSampler`
    (the model must be in eval mode), with the model compiled inside the graph when
    ``compile`` (default ``None``: on CUDA; the first batch then pays the compilation); a
    capture that fails logs one line and the batches run eagerly (:class:`GraphSampler`)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    device = torch.device(device)
    fn = get_sampler(sampler)
    plan = plan.to(device)
    autocast_dtype = DTYPES[sampling_dtype(dtype, device)]
    if use_cuda_graph and capture_unavailable(device) is None:
        run = GraphSampler(model, plan, fn, autocast_dtype=autocast_dtype,
                           compile=True if compile is None else compile)
    else:
        run = functools.partial(sample, model, plan=plan, sampler=fn, autocast_dtype=autocast_dtype)
    total = n if indices is None else len(indices)
    label = f"{plan.num_steps}-step {sampler_name(fn)}"
    with tqdm(total=total, unit="img", desc=label, disable=not progress) as bar:
        for x_T in noise_batches(n, batch_size, shape, seed, device, indices):
            yield run(x_T)
            bar.update(x_T.shape[0])
