"""Feature KL, forward + backward: ours against the expression it replaces.

Baseline: eager ``F.kl_div(log_softmax(s / tau_S), softmax(t / tau_T), "batchmean")`` and,
on a GPU, ``torch.compile`` of the same expression. Ours: the Triton kernel (GPU only:
the interpreter measures nothing) and the PyTorch reference. Each shape is one
benchmark group, so the table reads as ratios against eager.

Run: ``pytest benchmarks/bench_feature_kl.py --benchmark-only``.

* B=128 x D in {512, 1920, 2048} (ResNet18 / DenseNet201 features at training batch
  size) is launch-bound: read it in microseconds per call.
* B=16384 x D=4096 (GPU only) is bandwidth-bound: ``extra_info`` gives the achieved GB/s
  and its share of a device-to-device copy measured in the same session.

At the launch-bound shapes each timing runs 16 forward + backward calls and synchronises once
(``extra_info["ops_per_call"]``; the summary's ``per_op`` is one call). The ``CUDA graph``
groups replay the same calls captured in one graph: the GPU work alone, without the host
costs (autograd engine, Python, launches, idle gaps) that the plain groups include.

Bytes: any fused forward + backward must read ``student`` and ``teacher`` and write the
student gradient, ``3 * itemsize`` per element (``bytes_min``, the basis of
``GBps_effective`` for every implementation). Ours moves exactly that when ``grad_output``
is 1 (a plain ``loss.backward()``): the forward writes the gradient and the backward hands
it over untouched. Any other ``grad_output`` (the ``-go0.5`` group) adds a scaling pass,
``5 * itemsize`` in all (``bytes_ours``; see :mod:`rcfd.core.kernels.feature_kl`). Every timed
call takes the next pair from a pool of inputs larger than the L2 cache.
"""

import itertools
import math

import gpu_timing
import pytest
import torch
import torch.nn.functional as F

from rcfd.core.kernels import feature_kl as fk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TAU_T, TAU_S = 0.9, 1.0
ROTATE_BYTES = 256 << 20  # input pool per benchmark: well past any L2
CALLS_PER_TIMING = 16  # forward+backward calls per timing at the launch-bound shapes
gpu_only = pytest.mark.skipif(not CUDA, reason="GPU only")


def kl_div_expression(s, t):
    return F.kl_div(F.log_softmax(s / TAU_S, dim=1), F.softmax(t / TAU_T, dim=1),
                    reduction="batchmean")


def rcfd_triton(s, t):
    return fk.feature_kl_triton(s, t, TAU_T, TAU_S, "batchmean")


def rcfd_reference(s, t):
    return fk.feature_kl_reference(s, t, TAU_T, TAU_S, "batchmean")


IMPLS = {
    "eager_kl_div": lambda: kl_div_expression,
    "compiled_kl_div": lambda: torch.compile(kl_div_expression, dynamic=False),
    "rcfd_reference": lambda: rcfd_reference,
    "rcfd_triton": lambda: rcfd_triton,
}
GPU_IMPLS = ("compiled_kl_div", "rcfd_triton")
# (B, D, dtype, grad_output): the real shapes, then the bandwidth-bound one
CASES = [(128, 512, torch.float32, 1.0), (128, 1920, torch.float32, 1.0),
         (128, 2048, torch.float32, 1.0), (16384, 4096, torch.float32, 1.0),
         (16384, 4096, torch.float32, 0.5), (16384, 4096, torch.bfloat16, 1.0)]
GRAPH_IMPLS = ("eager_kl_div", "rcfd_triton")  # also timed as CUDA-graph replays


def _large(case) -> bool:
    return case[0] * case[1] > 1 << 22


def _case_id(case):
    b, d, dtype, go = case
    return f"{b}x{d}-{str(dtype).removeprefix('torch.')}" + ("" if go == 1 else f"-go{go}")


def _params():
    for case, impl in itertools.product(CASES, IMPLS):
        marks = [gpu_only] if (_large(case) or impl in GPU_IMPLS) else []
        yield pytest.param(case, impl, False, id=f"{_case_id(case)}-{impl}", marks=marks)
    for case, impl in itertools.product(CASES, GRAPH_IMPLS):
        yield pytest.param(case, impl, True, id=f"{_case_id(case)}-{impl}-graph",
                           marks=[gpu_only])


@pytest.fixture(scope="session")
def copy_bandwidth_gbps():
    return gpu_timing.copy_bandwidth_gbps()


def _input_pool(b, d, dtype):
    pair_bytes = 2 * b * d * torch.empty((), dtype=dtype).element_size()
    count = max(2, min(64, math.ceil(ROTATE_BYTES / pair_bytes))) if CUDA else 2
    pool = []
    for _ in range(count):
        s = (torch.randn(b, d, device=DEVICE) * 3).to(dtype).requires_grad_()
        t = (torch.randn(b, d, device=DEVICE) * 3).to(dtype)
        pool.append((s, t))
    return pool


@pytest.mark.parametrize("case,impl,captured", list(_params()))
def test_feature_kl_forward_backward(benchmark, case, impl, captured, request):
    b, d, dtype, go = case
    fn = IMPLS[impl]()
    pool = _input_pool(b, d, dtype)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    grad_output = None if go == 1 else torch.tensor(go, device=DEVICE)

    # Launch-bound shapes: several calls per timing and one synchronisation, so the figure is
    # the time a training step spends per call (launches and autograd included), not the
    # latency of a synchronisation. Bandwidth-bound shapes: one call, then synchronise.
    calls = 1 if _large(case) else CALLS_PER_TIMING
    if captured:  # the same calls on fixed inputs, captured: the GPU time alone
        pairs = [pool[i % len(pool)] for i in range(calls)]

        def run():
            for s, t in pairs:
                torch.autograd.grad(fn(s, t), s, grad_output)

        graph = gpu_timing.capture(run)

        def step():
            graph.replay()
            sync()
    else:
        cycle = itertools.cycle(pool)

        def step():
            for _ in range(calls):
                s, t = next(cycle)
                loss = fn(s, t)
                (grad,) = torch.autograd.grad(loss, s, grad_output)
            sync()
            return grad

    for _ in range(3):  # JIT / compile / allocator warm-up, outside the timing
        step()
    benchmark.group = f"feature_kl fwd+bwd {_case_id(case)}" + (" (CUDA graph)" * captured)
    itemsize = torch.empty((), dtype=dtype).element_size()
    bytes_min = 3 * itemsize * b * d
    benchmark.extra_info.update(impl=impl, B=b, D=d, dtype=str(dtype), grad_output=go,
                                bytes_min=bytes_min, ops_per_call=calls, graph=captured)
    if impl == "rcfd_triton":
        passes = 3 if go == 1 else 5
        benchmark.extra_info["bytes_ours"] = passes * itemsize * b * d + 4 * b
    benchmark(step)
    if benchmark.stats is not None and _large(case):  # bandwidth only where it binds
        seconds = benchmark.stats.stats.median
        copy = request.getfixturevalue("copy_bandwidth_gbps")
        gbps = bytes_min / seconds / 1e9
        benchmark.extra_info.update(GBps_effective=round(gbps, 1), copy_GBps=round(copy, 1),
                                    pct_of_copy=round(100 * gbps / copy, 1))
        if "bytes_ours" in benchmark.extra_info:
            benchmark.extra_info["GBps_ours"] = round(
                benchmark.extra_info["bytes_ours"] / seconds / 1e9, 1)
