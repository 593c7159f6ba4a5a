"""Fused DDIM update vs the eager PyTorch expression it replaces (and torch.compile of it on a
GPU). Groups are per shape and dtype, so each table reads as a ratio against ``eager``.

Each timed call runs the op over ``ROTATE`` different input sets (so the data does not sit
in cache between calls) and then waits for the device; ``extra_info["per_op_us"]`` is the
time of one op.
"""

import pytest
import torch

from rcfd import ops
from rcfd.core.schedule import cosine_schedule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = [16, 128, 512]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROTATE = 8


def eager_ddim(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t):
    """What a sampler writes without the fused op (per-sample coefficients as [B,1,1,1])."""
    x0 = x0.clamp(-1, 1)
    eps = (z_t - alpha_t * x0) / sigma_t
    return alpha_s * x0 + sigma_s * eps


def make_inputs(batch, dtype):
    sched = cosine_schedule(1024, 1)
    sets = []
    for _ in range(ROTATE):
        t = torch.randint(2, 1025, (batch,))
        s = t - 1
        coefs = [v.float().to(DEVICE) for v in (sched.alpha[s], sched.sigma[s], sched.alpha[t], sched.sigma[t])]
        z = torch.randn(batch, 3, 32, 32, device=DEVICE).to(dtype)
        x = (2 * torch.randn(batch, 3, 32, 32, device=DEVICE)).to(dtype)
        sets.append((z, x, coefs))
    return sets


def timed(fn, sets):
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        for z, x, c in sets:
            fn(z, x, c)
        sync()

    for _ in range(3):  # warm-up (and compilation)
        run()
    return run


def record(benchmark, batch, dtype_name, impl):
    benchmark.group = f"ddim_update {DEVICE} [{batch},3,32,32] {dtype_name}"
    benchmark.extra_info.update(impl=impl, batch=batch, dtype=dtype_name, ops_per_call=ROTATE)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def bench_eager(benchmark, batch, dtype_name):
    sets = make_inputs(batch, DTYPES[dtype_name])
    shaped = [(z, x, [v.view(-1, 1, 1, 1) for v in c]) for z, x, c in sets]
    record(benchmark, batch, dtype_name, "eager")
    benchmark(timed(lambda z, x, c: eager_ddim(z, x, *c), shaped))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def bench_fused(benchmark, batch, dtype_name):
    sets = make_inputs(batch, DTYPES[dtype_name])
    assert ops.backend("ddim_update", DEVICE) == "extension", "benchmarking needs the compiled extension"
    record(benchmark, batch, dtype_name, "fused")
    benchmark(timed(lambda z, x, c: torch.ops.rcfd.ddim_step(z, x, *c, True), sets))


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile baseline is measured on a GPU")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def bench_compiled(benchmark, batch, dtype_name):
    sets = make_inputs(batch, DTYPES[dtype_name])
    shaped = [(z, x, [v.view(-1, 1, 1, 1) for v in c]) for z, x, c in sets]
    compiled = torch.compile(eager_ddim)
    record(benchmark, batch, dtype_name, "torch.compile")
    benchmark(timed(lambda z, x, c: compiled(z, x, *c), shaped))
