"""Deterministic DDIM sampling (METHOD.md, "DDIM step"): one step, the eager N-step
sampler, a CUDA-graph-captured N-step sampler, and a batched generator for evaluation.

Models are any callables ``model(z_t, t_index)`` returning ``x0_hat`` (or ``eps_hat`` with
``prediction="eps"``), ``t_index`` an int64 ``[B]`` tensor of schedule indices
``t * time_scale``. Samplers walk an explicit list of sampler steps ``ts`` (from
:func:`rcfd.core.schedule.step_indices`, or given) and go from ``ts[i]`` to ``ts[i + 1]``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Callable, Iterator, Sequence

import torch

from rcfd import ops
from rcfd.losses import PREDICTIONS, check_choice, schedule_at, x0_from_eps
from rcfd.core.schedule import Schedule, cosine_schedule, step_indices

log = logging.getLogger("rcfd")

# --------------------------------------------------------------------------- one step


def _coefs(schedule: Schedule, index, like: torch.Tensor):
    """``(alpha, sigma)`` at ``index``: Python floats for an int, ``[B]`` tensors for a
    ``[B]`` tensor."""
    if isinstance(index, torch.Tensor):
        return schedule_at(schedule, index, like)
    if not 0 <= index < schedule.num_indices:
        raise ValueError(f"schedule index {index} out of range 0..{schedule.num_indices - 1}")
    return float(schedule.alpha[index]), float(schedule.sigma[index])


def _t_index(index, z: torch.Tensor) -> torch.Tensor:
    if isinstance(index, torch.Tensor):
        return index.to(device=z.device, dtype=torch.int64)
    return torch.full((z.shape[0],), index, dtype=torch.int64, device=z.device)


def ddim_step(model: Callable, z_t: torch.Tensor, t, s, schedule: Schedule, time_scale: int,
              prediction: str = "x0", clip: bool = True) -> torch.Tensor:
    """One deterministic DDIM step from sampler step ``t`` to ``s < t`` (METHOD.md, "DDIM
    step")::

        x0_hat = clip(model(z_t, t * time_scale), -1, 1)
        z_s    = alpha_s x0_hat + sigma_s (z_t - alpha_t x0_hat) / sigma_t

    ``t`` and ``s`` are ints or int64 ``[B]`` tensors; the update is the fused
    :func:`rcfd.ops.ddim_update`. ``clip=False`` is the unclipped step of distillation."""
    check_choice("prediction", prediction, PREDICTIONS)
    it, is_ = t * time_scale, s * time_scale
    alpha_t, sigma_t = _coefs(schedule, it, z_t)
    alpha_s, sigma_s = _coefs(schedule, is_, z_t)
    out = model(z_t, _t_index(it, z_t))
    if prediction == "eps":
        out = x0_from_eps(z_t, out, alpha_t, sigma_t)
    return ops.ddim_update(z_t, out.to(z_t.dtype), alpha_s, sigma_s, alpha_t, sigma_t, clip=clip)


# --------------------------------------------------------------------------- eager sampler


def resolve_steps(T: int, num_steps: int | None = None,
                  steps: Sequence[int] | None = None) -> list[int]:
    """The sampler steps to visit: ``step_indices(T, num_steps)``, or an explicit strictly
    decreasing list of ints in ``0..T`` (at least two)."""
    if (num_steps is None) == (steps is None):
        raise ValueError("give exactly one of num_steps (an int) or steps (a list of steps)")
    if steps is None:
        return step_indices(T, num_steps)
    steps = [int(s) for s in steps]
    if len(steps) < 2 or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be a strictly decreasing list of >= 2 steps, got {steps}")
    if steps[0] > T or steps[-1] < 0:
        raise ValueError(f"steps must lie in 0..T={T}, got {steps}")
    return steps


def _autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to ``dtype`` (none for ``None``/fp32). Graph capture passes ``cache=False``:
    casts cached by autocast must not outlive the capture."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


@torch.no_grad()
def sample_ddim(model: Callable, x_T: torch.Tensor, T: int, time_scale: int,
                num_steps: int | None = None, schedule: Schedule | None = None, *,
                steps: Sequence[int] | None = None, prediction: str = "x0", clip: bool = True,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eager DDIM sampler (METHOD.md, "DDIM step"): from ``x_T`` over the sampler steps
    ``ts = step_indices(T, num_steps)`` (or the explicit ``steps``), ``ts[i] -> ts[i+1]``;
    returns ``clip(z_{ts[-1]}, -1, 1)``. ``schedule`` defaults to
    ``cosine_schedule(T, time_scale)``; ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs
    the model under autocast while ``z`` stays in ``x_T``'s dtype."""
    ts = resolve_steps(T, num_steps, steps)
    schedule = cosine_schedule(T, time_scale) if schedule is None else schedule
    z = x_T
    with _autocast(x_T.device, autocast_dtype):
        for i in range(len(ts) - 1):
            z = ddim_step(model, z, ts[i], ts[i + 1], schedule, time_scale, prediction, clip)
    return z.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------- CUDA graphs


@functools.lru_cache(maxsize=None)
def _warn_eager(reason: str) -> None:
    msg = f"CUDAGraphSampler runs the eager sampler: {reason}"
    log.warning("rcfd: %s", msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


class _Graph:
    """One captured N-step loop with its static input and output. It also owns the plan
    (per-step time indices and coefficients): the graph reads their memory on replay, so
    they must live as long as the graph."""

    def __init__(self, graph, static_in, static_out, plan, ptrs):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        self.plan, self.ptrs = plan, ptrs


class CUDAGraphSampler:
    """The N-step DDIM sampler of :func:`sample_ddim`, captured once per (batch shape,
    steps, dtype, autocast dtype) as one CUDA graph: the model forwards and the fused
    updates of all steps. ``sampler(x_T)`` copies ``x_T`` into the static input, replays
    and returns a clone of ``clip(z_0, -1, 1)``.

    * The model must be in eval mode (dropout or batch statistics would be frozen into the
      graph). Capture runs a few warm-up passes on a side stream first; all graphs of one
      sampler share one memory pool.
    * The graph reads the parameters' memory: update weights IN PLACE (``p.copy_``,
      ``load_state_dict``, an EMA ``lerp_``) and replays use them; reallocating them
      (``model.to``, ``.half()``, new ``Parameter`` objects) makes the graph stale. A stale
      capture is detected by the parameters' addresses and captured again.
    * Per-step coefficients and time indices are device tensors made before capture; the
      loop has no ``.item()`` and no branching on tensor values. The noise ``x_T`` is drawn
      by the caller.
    * Without CUDA (or for a non-CUDA ``x_T``) it runs :func:`sample_ddim` and warns once.
    """

    def __init__(self, model: Callable, T: int, time_scale: int, num_steps: int | None = None,
                 *, steps: Sequence[int] | None = None, schedule: Schedule | None = None,
                 prediction: str = "x0", clip: bool = True,
                 autocast_dtype: torch.dtype | None = None, warmup: int = 3):
        if isinstance(model, torch.nn.Module) and model.training:
            raise ValueError("CUDAGraphSampler needs the model in eval mode: call model.eval()")
        check_choice("prediction", prediction, PREDICTIONS)
        self.model, self.T, self.time_scale = model, T, time_scale
        self.steps = resolve_steps(T, num_steps, steps)
        self.schedule = cosine_schedule(T, time_scale) if schedule is None else schedule
        self.prediction, self.clip = prediction, clip
        self.autocast_dtype, self.warmup = autocast_dtype, warmup
        self._graphs: dict = {}
        self._pool = None

    def reset(self) -> None:
        """Drop every captured graph (and the pool with them)."""
        self._graphs.clear()
        self._pool = None

    def _eager(self, x_T, steps):
        return sample_ddim(self.model, x_T, self.T, self.time_scale, schedule=self.schedule,
                           steps=steps, prediction=self.prediction, clip=self.clip,
                           autocast_dtype=self.autocast_dtype)

    def _ptrs(self):
        if not isinstance(self.model, torch.nn.Module):
            return ()
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    def _plan(self, x: torch.Tensor, steps: list[int]):
        """Per step: the model's ``t_index`` [B] and the four DDIM coefficients as 0-dim
        device tensors (fp32), all made before capture."""
        plan = []
        for t, s in zip(steps, steps[1:]):
            it, is_ = t * self.time_scale, s * self.time_scale
            c = [self.schedule.alpha[is_], self.schedule.sigma[is_],
                 self.schedule.alpha[it], self.schedule.sigma[it]]
            c = [v.to(device=x.device, dtype=torch.float32) for v in c]
            plan.append((torch.full((x.shape[0],), it, dtype=torch.int64, device=x.device), c))
        return plan

    def _loop(self, z: torch.Tensor, plan) -> torch.Tensor:
        with torch.no_grad(), _autocast(z.device, self.autocast_dtype, cache=False):
            for t_index, (a_s, s_s, a_t, s_t) in plan:
                out = self.model(z, t_index)
                if self.prediction == "eps":
                    out = x0_from_eps(z, out, a_t, s_t)
                z = ops.ddim_update(z, out.to(z.dtype), a_s, s_s, a_t, s_t, clip=self.clip)
            return z.clamp(-1.0, 1.0)

    def _capture(self, x_T: torch.Tensor, steps: list[int]) -> _Graph:
        static_in = x_T.detach().clone()
        plan = self._plan(static_in, steps)
        side = torch.cuda.Stream(device=x_T.device)
        side.wait_stream(torch.cuda.current_stream(x_T.device))
        with torch.cuda.stream(side):
            for _ in range(max(self.warmup, 1)):
                self._loop(static_in, plan)
        torch.cuda.current_stream(x_T.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._loop(static_in, plan)
        log.info("rcfd: captured a %d-step DDIM sampler graph for x_T %s %s",
                 len(steps) - 1, tuple(x_T.shape), x_T.dtype)
        return _Graph(graph, static_in, static_out, plan, self._ptrs())

    def __call__(self, x_T: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """Images ``clip(z_0, -1, 1)`` from noise ``x_T``; ``num_steps`` overrides the
        sampler's steps for this call (a graph per step count)."""
        steps = self.steps if num_steps is None else resolve_steps(self.T, num_steps)
        if x_T.device.type != "cuda" or not torch.cuda.is_available():
            _warn_eager(f"x_T is on {x_T.device} and CUDA graphs need a CUDA device")
            return self._eager(x_T, steps)
        if isinstance(self.model, torch.nn.Module) and self.model.training:
            raise ValueError("CUDAGraphSampler needs the model in eval mode: call model.eval()")
        key = (tuple(x_T.shape), x_T.dtype, x_T.device, tuple(steps), self.autocast_dtype)
        entry = self._graphs.get(key)
        if entry is not None and entry.ptrs != self._ptrs():
            log.warning("rcfd: model parameters were reallocated since capture; capturing again")
            self.reset()
            entry = None
        if entry is None:
            entry = self._graphs[key] = self._capture(x_T, steps)
        entry.static_in.copy_(x_T)
        entry.graph.replay()
        return entry.static_out.clone()


# --------------------------------------------------------------------------- generation


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


def generate(model: Callable, n: int, batch_size: int, *, shape: Sequence[int], T: int,
             time_scale: int, num_steps: int, device: torch.device | str = "cpu",
             seed: int = 0, generator: torch.Generator | None = None,
             prediction: str = "x0", autocast_dtype: torch.dtype | None = None,
             use_cuda_graph: bool = True, progress: bool = True,
             indices: range | None = None) -> Iterator[torch.Tensor]:
    """Yield ``n`` images in ``[-1, 1]`` of ``shape`` ``(C, H, W)`` in batches of
    ``batch_size`` (the last may be smaller), for metrics; with ``indices`` only those of the
    ``n`` (a contiguous block: one rank's share, the same images whatever the world size; see
    :func:`noise_batches`). The noise is drawn on the CPU from ``generator`` (default: seeded
    with ``seed``), so a seed gives the same images on any device; on CUDA the batches run
    through a :class:`CUDAGraphSampler` (the model must be in eval mode)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    from tqdm.auto import tqdm

    device = torch.device(device)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    if use_cuda_graph and device.type == "cuda":
        sampler = CUDAGraphSampler(model, T, time_scale, num_steps, prediction=prediction,
                                   autocast_dtype=autocast_dtype)
    else:
        sampler = functools.partial(sample_ddim, model, T=T, time_scale=time_scale,
                                    num_steps=num_steps, prediction=prediction,
                                    autocast_dtype=autocast_dtype)
    total = n if indices is None else len(indices)
    with tqdm(total=total, unit="img", desc=f"{num_steps}-step DDIM", disable=not progress) as bar:
        for x_T in noise_batches(n, batch_size, shape, generator, indices):
            yield sampler(x_T.to(device))
            bar.update(x_T.shape[0])
