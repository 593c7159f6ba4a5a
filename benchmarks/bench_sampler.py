"""Sampler throughput (images/s) of N-step samplers on the CIFAR-10 U-Net: eager PyTorch vs
the CUDA-graph capture (:class:`rcfd.samplers.GraphSampler`) vs the eager sampler over
``torch.compile(mode="reduce-overhead")``, fp32 and bf16 autocast, grouped by (batch, steps,
dtype) so each group reads as a ratio against eager. DDIM runs every case; DPM-Solver++(2M)
and PNDM run one small case (their own groups), enough to show they capture and cost what
DDIM costs. Without a GPU only the eager samplers run, on the small digits U-Net.

    pytest benchmarks/bench_sampler.py --benchmark-only

Every case records ``images_per_s`` (and ``speedup_vs_eager`` where eager ran first in the
same process) in ``benchmark.extra_info``. The weights are the U-Net's initialisation;
the inputs are Gaussian noise (timing does not depend on what the network learnt).
"""

from __future__ import annotations

import time

import pytest
import torch

unet = pytest.importorskip("rcfd.core.unet", reason="rcfd.core.unet (the U-Net) is not in the tree yet")

from rcfd.core.schedule import cosine_schedule  # noqa: E402
from rcfd.samplers import GraphSampler, make_plan, sample  # noqa: E402

CUDA = torch.cuda.is_available()
T, TIME_SCALE = 8, 128  # an 8-step model of the 1024-step lineage; N-step samplers divide it
BATCHES = (1, 16, 128)
STEPS = (1, 4, 8)
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
MODES = ("eager", "graph", "compile")
SAMPLERS = ("ddim", "dpm-solver", "pndm")
OTHER_SAMPLER_CASE = (16, 4)  # (batch, steps) where the samplers besides DDIM also run
ROUNDS = 10 if CUDA else 2  # the CPU cases are slow: few rounds
WARMUP = 3 if CUDA else 1     # calls before timing: capture, compile, autotune

_eager_ips: dict = {}
_compiled: dict = {}


@pytest.fixture(scope="module")
def net():
    """``(model, image shape, device)``: the CIFAR-10 U-Net on a GPU, the digits one on CPU."""
    torch.manual_seed(0)
    cfg = unet.UNetConfig.cifar10() if CUDA else unet.UNetConfig.digits()
    device = "cuda" if CUDA else "cpu"
    model = unet.UNet(cfg).to(device).eval().requires_grad_(False)
    return model, (cfg.in_channels, cfg.image_size, cfg.image_size), device


def make_sampler(model, mode: str, steps: int, dtype, device, sampler: str = "ddim"):
    """A callable ``x_T -> images`` for one (mode, steps, autocast dtype, sampler)."""
    plan = make_plan(cosine_schedule(T, TIME_SCALE), T, TIME_SCALE, steps, device=device)
    if mode == "graph":
        return GraphSampler(model, plan, sampler, autocast_dtype=dtype)
    if mode == "compile":
        if dtype not in _compiled:  # one compiled wrapper per dtype, shared by all shapes
            _compiled[dtype] = torch.compile(model, mode="reduce-overhead")
        model = _compiled[dtype]
    return lambda x: sample(model, x, plan, sampler, autocast_dtype=dtype)


def skip_reason(mode: str, dtype_name: str) -> str | None:
    if not CUDA and (mode != "eager" or dtype_name != "fp32"):
        return "GPU-only case (the CPU runs the eager fp32 sampler only)"
    if mode == "compile" and not hasattr(torch, "compile"):
        return "torch.compile is not available"
    return None


def timed(fn, sync):
    def call():
        out = fn()
        sync()
        return out
    return call


def cases():
    """(sampler, mode, batch, steps, dtype) with eager first, so the others can quote a
    ratio; DDIM everywhere, the other samplers at :data:`OTHER_SAMPLER_CASE` only;
    torch.compile below batch 128 is `slow` (one compilation per shape)."""
    for mode in MODES:
        for batch in BATCHES:
            for steps in STEPS:
                for d in DTYPES:
                    others = SAMPLERS[1:] if (batch, steps) == OTHER_SAMPLER_CASE else ()
                    for name in ("ddim", *others):
                        slow = mode == "compile" and batch != BATCHES[-1]
                        prefix = "" if name == "ddim" else f"{name}-"
                        yield pytest.param(name, mode, batch, steps, d,
                                           id=f"{prefix}{mode}-b{batch}-N{steps}-{d}",
                                           marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("sampler_name, mode, batch, steps, dtype_name", list(cases()))
def test_sampler_throughput(benchmark, cuda_sync, net, sampler_name, mode, batch, steps,
                            dtype_name):
    reason = skip_reason(mode, dtype_name)
    if reason:
        pytest.skip(reason)
    model, shape, device = net
    dtype = DTYPES[dtype_name]
    sampler = make_sampler(model, mode, steps, dtype, device, sampler_name)
    x_T = torch.randn(batch, *shape, device=device)
    for _ in range(WARMUP):
        sampler(x_T)
    cuda_sync()
    which = "" if sampler_name == "ddim" else f" {sampler_name}"
    benchmark.group = f"sampler{which} b={batch} N={steps} {dtype_name}"
    benchmark.pedantic(timed(lambda: sampler(x_T), cuda_sync), rounds=ROUNDS, iterations=1,
                       warmup_rounds=int(CUDA))
    if benchmark.stats is None:  # --benchmark-disable: the sampler ran once, nothing timed
        return
    ips = batch / benchmark.stats.stats.median
    key = (sampler_name, batch, steps, dtype_name)
    info = {"sampler": sampler_name, "mode": mode, "batch": batch, "steps": steps,
            "dtype": dtype_name, "device": device, "images_per_s": ips}
    if mode == "eager":
        _eager_ips[key] = ips
    elif key in _eager_ips:
        info["speedup_vs_eager"] = ips / _eager_ips[key]
    benchmark.extra_info.update(info)


def throughput(sampler, x_T, sync, reps: int) -> float:
    """Images/s: median over ``reps`` timed calls after the warm-up calls."""
    for _ in range(WARMUP):
        sampler(x_T)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sampler(x_T)
        sync()
        times.append(time.perf_counter() - t0)
    return x_T.shape[0] / sorted(times)[len(times) // 2]
