"""One generic CUDA-graph capture for any sampler ``sampler(model, x_T, plan)``.

The whole K-step loop (K model forwards and K fused updates) is captured once per
(``x_T`` shape, dtype, device, plan, autocast dtype) and replayed: ``copy_`` into the static
input, ``replay()``, clone the static output (PyTorch's "CUDA Graphs" notes). This works for
every sampler of :data:`rcfd.samplers.SAMPLERS` because they read their per-step
coefficients from the plan's device tensors, never sync the host, and never branch on
tensor values. A sampler's other inputs (the consistency sampler's re-noising noise) are
passed as keywords, ``graph_sampler(x_T, noise=[...])`` (what :func:`rcfd.samplers.generate`
does, with per-image noise), or, when not passed, computed by the sampler's
``graph_inputs(x_T, plan) -> {keyword: tensor or list of tensors}``; either way they are made
eagerly before each replay, outside the captured region, and copied into static buffers the
graph reads.

Capture degrades, never crashes: when capturing (or compiling the model inside the capture,
or the first replay) raises, the sampler logs one line naming the error and the switch
(``--no-cuda-graph`` on the command line, ``use_cuda_graph=False`` in
:func:`rcfd.samplers.generate`) and runs eagerly from then on, giving the eager sampler's
images.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable

import torch

from rcfd.core.fallback import fallback_message, reason
from rcfd.core.precision import autocast
from rcfd.samplers.plan import Plan
from rcfd.samplers.registry import SamplerLike, get_sampler, sample, sampler_name

log = logging.getLogger("rcfd")

GRAPH_SWITCH = "--no-cuda-graph (use_cuda_graph=False in rcfd.samplers.generate)"


def capture_unavailable(device: torch.device | str) -> str | None:
    """Why a sampler on ``device`` cannot be captured in a CUDA graph, or None when it can:
    the one device check of :class:`GraphSampler` and :func:`rcfd.samplers.generate`."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"x_T is on {device} and CUDA graphs need a CUDA device"
    return None


@functools.lru_cache(maxsize=None)
def _warn_eager(why: str) -> None:
    msg = f"GraphSampler runs the eager sampler: {why}"
    log.warning("rcfd: %s", msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


class _Captured:
    """One captured sampler run with its static input and output. It owns its copy of the
    plan: the graph reads that memory on every replay, so it lives as long as the graph."""

    def __init__(self, graph, static_in, static_out, plan, ptrs, static_extra=None):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        self.plan, self.ptrs, self.static_extra = plan, ptrs, static_extra or {}


class GraphSampler:
    """``sampler`` (a name of :data:`rcfd.samplers.SAMPLERS` or a sampler function) over
    ``plan``, captured as one CUDA graph per (``x_T`` shape, dtype, device, plan, autocast
    dtype). ``graph_sampler(x_T)`` returns a fresh tensor of images.

    * The model must be in eval mode (dropout or batch statistics would be frozen into the
      graph). Capture runs ``warmup`` passes on a side stream first; all graphs of one
      GraphSampler share one memory pool.
    * The graph reads the parameters' memory: weights updated IN PLACE (``p.copy_``,
      ``load_state_dict``, an EMA ``lerp_``) are used by the next replay; reallocated ones
      (``model.to``, ``.half()``, new ``Parameter`` objects) are detected by their
      addresses and the graphs are captured again.
    * ``autocast_dtype`` (``torch.bfloat16`` / ``torch.float16``) runs the model under
      autocast (with ``cache_enabled=False`` in capture) while ``z`` stays in ``x_T``'s dtype.
    * ``compile``: the model runs as ``torch.compile(model)`` (Inductor's default mode, which
      fuses GroupNorm, SiLU and the residual adds) inside our graph; the warm-up passes
      compile it before capture.
    * For a non-CUDA ``x_T`` it runs the sampler eagerly (uncompiled) and warns once.
    * A capture that raises (module docstring) is logged once; this sampler then runs the
      eager, uncompiled sampler (``fell_back`` holds the reason).
    """

    def __init__(self, model: Callable, plan: Plan, sampler: SamplerLike = "ddim", *,
                 autocast_dtype: torch.dtype | None = None, warmup: int = 3,
                 compile: bool = False):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a rcfd.samplers.Plan (see make_plan), got {type(plan).__name__}")
        self.model, self.plan = model, plan
        self.sampler = get_sampler(sampler)
        self.autocast_dtype, self.warmup = autocast_dtype, warmup
        self._net = torch.compile(model) if compile else model  # compiled lazily, on first use
        autocast(torch.device("cpu"), autocast_dtype)  # refuse a bad dtype now
        self._check_eval()
        self._graphs: dict = {}
        self._pool = None
        self.fell_back: str | None = None

    def _check_eval(self) -> None:
        if isinstance(self.model, torch.nn.Module) and self.model.training:
            raise ValueError("GraphSampler needs the model in eval mode: call model.eval()")

    def reset(self) -> None:
        """Drop every captured graph (and the memory pool with them)."""
        self._graphs.clear()
        self._pool = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _ptrs(self) -> tuple:
        if not isinstance(self.model, torch.nn.Module):
            return ()
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    def _run(self, z: torch.Tensor, plan: Plan, extra: dict) -> torch.Tensor:
        with torch.no_grad(), autocast(z.device, self.autocast_dtype, cache=False):
            return self.sampler(self._net, z, plan, **extra)

    def _extra_inputs(self, x_T: torch.Tensor, plan: Plan, inputs: dict) -> dict:
        """This batch's other inputs: ``inputs`` when given, else the sampler's
        ``graph_inputs`` (module docstring), eagerly."""
        make = getattr(self.sampler, "graph_inputs", None)
        return inputs if inputs or make is None else make(x_T, plan)

    def _capture(self, x_T: torch.Tensor, plan: Plan, extra: dict) -> _Captured:
        static_in = x_T.detach().clone()
        static_extra = _clone_inputs(extra)
        plan = plan.to(x_T.device, copy=True)
        side = torch.cuda.Stream(device=x_T.device)
        side.wait_stream(torch.cuda.current_stream(x_T.device))
        with torch.cuda.stream(side):
            for _ in range(max(self.warmup, 1)):
                self._run(static_in, plan, static_extra)
        torch.cuda.current_stream(x_T.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._run(static_in, plan, static_extra)
        log.info("rcfd: captured a %d-step %s sampler graph for x_T %s %s", plan.num_steps,
                 sampler_name(self.sampler), tuple(x_T.shape), x_T.dtype)
        return _Captured(graph, static_in, static_out, plan, self._ptrs(), static_extra)

    def __call__(self, x_T: torch.Tensor, plan: Plan | None = None, **inputs) -> torch.Tensor:
        """Images from noise ``x_T`` (the result of the sampler); ``plan`` overrides the
        sampler's plan for this call (a graph per plan); ``inputs``: the sampler's other
        keyword inputs (module docstring), copied into the graph's buffers."""
        plan = self.plan if plan is None else plan
        self._check_eval()
        why = capture_unavailable(x_T.device)
        if why is not None:
            _warn_eager(why)
        if why is not None or self.fell_back is not None:
            return self._eager(x_T, plan, inputs)
        try:
            return self._replay(x_T, plan, inputs)
        except Exception as exc:  # a fast path that fails degrades (module docstring)
            self._fall_back(exc, plan)
            return self._eager(x_T, plan, inputs)

    def _eager(self, x_T: torch.Tensor, plan: Plan, inputs: dict) -> torch.Tensor:
        """The eager, uncompiled sampler: what a capture stands for."""
        return sample(self.model, x_T, plan, self.sampler, autocast_dtype=self.autocast_dtype, **inputs)

    def _replay(self, x_T: torch.Tensor, plan: Plan, inputs: dict) -> torch.Tensor:
        """The captured graph's images for ``x_T`` (captured first when there is none)."""
        key = (tuple(x_T.shape), x_T.dtype, x_T.device, plan.key, self.autocast_dtype)
        entry = self._graphs.get(key)
        if entry is not None and entry.ptrs != self._ptrs():
            log.warning("rcfd: model parameters were reallocated since capture; capturing again")
            self.reset()
            entry = None
        extra = self._extra_inputs(x_T, plan, inputs)
        if entry is None:
            entry = self._graphs[key] = self._capture(x_T, plan, extra)
        entry.static_in.copy_(x_T)
        _copy_inputs(entry.static_extra, extra)
        entry.graph.replay()
        return entry.static_out.clone()

    def _fall_back(self, exc: Exception, plan: Plan) -> None:
        """Drop the graphs, remember why and log the one line of a failed capture."""
        self.reset()
        self.fell_back = reason(exc)
        what = f"capturing the {plan.num_steps}-step {sampler_name(self.sampler)} sampler in a CUDA graph"
        log.warning("rcfd: %s", fallback_message(what, exc, GRAPH_SWITCH))


def _clone_inputs(extra: dict) -> dict:
    """Static copies of a sampler's extra inputs (tensors or lists of tensors)."""
    return {k: [t.clone() for t in v] if isinstance(v, (list, tuple)) else v.clone()
            for k, v in extra.items()}


def _copy_inputs(static: dict, extra: dict) -> None:
    """``copy_`` this batch's extra inputs into the graph's static buffers."""
    for k, v in extra.items():
        for dst, src in zip(static[k], v) if isinstance(v, (list, tuple)) else [(static[k], v)]:
            dst.copy_(src)
