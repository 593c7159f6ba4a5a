"""Batched generation for evaluation: reproducible per-image noise drawn on the sampling
device, split over ranks, through any sampler (captured in CUDA graphs on a GPU).

The ``n`` samples are numbered ``0..n-1``. Every random number a sampler reads comes from a
*noise stream* (:class:`NoiseStream`): the starting noise ``x_T`` (stream ``"rcfd-noise"``)
and, for a sampler that re-noises (the multistep consistency sampler), its fresh noise
(stream ``"rcfd-consistency-noise"``, ``K - 1`` tensors per image). A stream cuts the image
numbers into fixed chunks of :data:`NOISE_CHUNK` images; chunk ``c`` is ONE draw of
``[NOISE_CHUNK, *per_image]`` on the device from its own generator, seeded with
:func:`chunk_seed` ``(stream, seed, c)``, and image ``i`` gets row ``i % NOISE_CHUNK`` of chunk
``i // NOISE_CHUNK``. So image ``i``'s noise depends only on the seed, ``i``, the stream and
the device type (CPU and CUDA generators draw different numbers), never on ``n``, the batch
size, or which other images are made: a batch is assembled from the chunks it overlaps (a
chunk two batches share is drawn once), a rank makes any contiguous block of the images
(:func:`shard_samples`) and the union over ranks is one process's sample set, for any world
size. Nothing synchronises the host per batch.
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
NOISE_CHUNK = 64  # images per noise draw: changing it changes every seed's images
X_T_STREAM, RENOISE_STREAM = "rcfd-noise", "rcfd-consistency-noise"


def sampling_dtype(dtype: str, device: torch.device | str) -> str:
    """The model dtype to sample in: ``"auto"`` is ``"bf16"`` on CUDA (the model runs under
    bf16 autocast while the sampler's state stays fp32) and ``"fp32"`` elsewhere."""
    if dtype == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def chunk_seed(seed: int, c: int, stream: str = X_T_STREAM) -> int:
    """The seed of chunk ``c`` of a noise stream: a 63-bit hash of ``(stream, seed, c)``
    (:func:`rcfd.core.seeds.derive_seed`)."""
    return derive_seed(stream, seed, c)


class NoiseStream:
    """Per-image noise of one stream (module docstring): ``stream(start, stop)`` is the
    float32 ``[stop - start, *per_image]`` noise of images ``start..stop-1`` on ``device``,
    equal row for row whatever ranges it is asked for, a tensor of its own. It keeps the last
    chunk it drew, so consecutive batches draw each chunk once."""

    def __init__(self, per_image: Sequence[int], seed: int, device: torch.device | str = "cpu",
                 stream: str = X_T_STREAM):
        self.per_image, self.seed, self.stream = tuple(per_image), seed, stream
        self.device = torch.device(device)
        self._last: tuple[int, torch.Tensor] | None = None

    def chunk(self, c: int) -> torch.Tensor:
        """Chunk ``c``: one draw of ``[NOISE_CHUNK, *per_image]`` from its own generator."""
        if self._last is not None and self._last[0] == c:
            return self._last[1]
        generator = torch.Generator(device=self.device).manual_seed(chunk_seed(self.seed, c, self.stream))
        x = torch.randn((NOISE_CHUNK, *self.per_image), generator=generator, device=self.device)
        self._last = (c, x)
        return x

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start < stop:
            raise ValueError(f"need 0 <= start < stop, got {start}, {stop}")
        first, last = start // NOISE_CHUNK, (stop - 1) // NOISE_CHUNK
        parts = [self.chunk(c) for c in range(first, last + 1)]
        lo, hi = start - first * NOISE_CHUNK, stop - first * NOISE_CHUNK
        if len(parts) == 1:  # a copy: a sampler writing into x_T must not change the cache
            return parts[0][lo:hi].clone()
        return torch.cat(parts)[lo:hi]


def shard_samples(n: int, rank: int = 0, world_size: int = 1) -> range:
    """The samples rank ``rank`` of ``world_size`` makes: a contiguous block of ``n //
    world_size`` images (the first ranks take one more when they do not divide evenly); the
    blocks in rank order tile ``range(n)``. Any split gives one process's images (module
    docstring); this one balances the ranks."""
    per, extra = divmod(n, world_size)
    first = rank * per + min(rank, extra)
    return range(first, first + per + (rank < extra))


def _check_indices(n: int, indices: range | None) -> range:
    indices = range(n) if indices is None else indices
    if indices.step != 1 or indices.start < 0 or indices.stop > n:
        raise ValueError(f"indices must be a contiguous block of range({n}), got {indices}; "
                         f"use shard_samples")
    return indices


def batch_ranges(indices: range, batch_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each batch of ``batch_size`` over ``indices`` (the last may be
    smaller)."""
    for start in range(indices.start, indices.stop, batch_size):
        yield start, min(start + batch_size, indices.stop)


def noise_batches(n: int, batch_size: int, shape: Sequence[int], seed: int,
                  device: torch.device | str = "cpu",
                  indices: range | None = None) -> Iterator[torch.Tensor]:
    """The starting noise of samples ``indices`` (default: all ``n``; any contiguous block,
    e.g. :func:`shard_samples`), in batches of ``batch_size`` from the block's start (the
    last may be smaller), drawn on ``device``: image ``i``'s noise is the same for every
    ``n > i``, batch size and block (module docstring)."""
    indices = _check_indices(n, indices)
    stream = NoiseStream(shape, seed, device)
    for start, stop in batch_ranges(indices, batch_size):
        yield stream(start, stop)


def fresh_noise_count(sampler: Callable, plan: Plan) -> int:
    """How many noise tensors of ``x_T``'s shape ``sampler`` reads per image through its
    ``noise`` keyword over ``plan`` (its ``fresh_noise(plan)``; 0 for a deterministic one)."""
    count = getattr(sampler, "fresh_noise", None)
    return 0 if count is None else count(plan)


def _inputs(stream: NoiseStream | None, start: int, stop: int) -> dict:
    """The sampler's per-image fresh noise for a batch: ``{"noise": [K - 1 tensors]}``."""
    return {} if stream is None else {"noise": list(stream(start, stop).unbind(1))}


def generate(model: Callable, n: int, batch_size: int, *, shape: Sequence[int], plan: Plan,
             sampler: SamplerLike = "ddim", device: torch.device | str = "cpu", seed: int = 0,
             dtype: str = "auto", use_cuda_graph: bool = True, compile: bool | None = None,
             progress: bool = True, indices: range | None = None) -> Iterator[torch.Tensor]:
    """Yield ``n`` images of ``shape`` ``(C, H, W)`` (in ``[-1, 1]`` when ``plan.clip``) on
    ``device``, in batches of ``batch_size`` (the last may be smaller), from ``sampler`` (a
    name of :data:`rcfd.samplers.SAMPLERS` or a sampler function) over ``plan``, the model in
    ``dtype`` (:func:`sampling_dtype`). With ``indices`` only those of the ``n`` (one rank's
    block, :func:`shard_samples`). Image ``i`` starts from the same noise, and a re-noising
    sampler (one with ``fresh_noise``) reads the same fresh noise, whatever ``n > i``,
    ``batch_size`` and ``indices`` (module docstring); its pixels can still differ in the
    last bits between batch sizes where the model's kernels do. On CUDA the batches run
    through a :class:`GraphSampler` (the model must be in eval mode), with the model compiled
    inside the graph when ``compile`` (default ``None``: on CUDA; the first batch then pays
    the compilation); a capture that fails logs one line and the batches run eagerly."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    device = torch.device(device)
    indices = _check_indices(n, indices)
    fn = get_sampler(sampler)
    plan = plan.to(device)
    autocast_dtype = DTYPES[sampling_dtype(dtype, device)]
    if use_cuda_graph and capture_unavailable(device) is None:
        run = GraphSampler(model, plan, fn, autocast_dtype=autocast_dtype,
                           compile=True if compile is None else compile)
    else:
        run = functools.partial(sample, model, plan=plan, sampler=fn, autocast_dtype=autocast_dtype)
    count = fresh_noise_count(fn, plan)
    fresh = NoiseStream((count, *shape), seed, device, RENOISE_STREAM) if count else None
    starts = NoiseStream(shape, seed, device)
    label = f"{plan.num_steps}-step {sampler_name(fn)}"
    with tqdm(total=len(indices), unit="img", desc=label, disable=not progress) as bar:
        for start, stop in batch_ranges(indices, batch_size):
            yield run(starts(start, stop), **_inputs(fresh, start, stop))
            bar.update(stop - start)
