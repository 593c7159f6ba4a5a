"""The public fused DDIM update ``rcfd.core.ops.ddim_update`` vs the eager PyTorch expression it
replaces, side by side in one group per case (shape, dtype, coefficients as Python floats or
``[B]`` tensors, ``no_grad`` as the samplers call it or grad enabled with ``x0`` requiring
grad as in training). Extra rows: the raw compiled op (``torch.ops.rcfd.ddim_update*``, no
Python around it) and, on a GPU, torch.compile of the eager expression.

Each timed call runs the update over ``ROTATE`` different input sets (so the data does not
sit in cache between calls) and then waits for the device; ``extra_info["per_op_us"]`` is the
time of one update. At the end the run prints, per case, the speed-up of the public function
over eager and whether the target (>= 2x at [16,3,32,32] and [128,3,32,32] fp32) is met.
"""

import pytest
import torch

from rcfd.core import ops
from rcfd.core.schedule import cosine_schedule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (batch, dtype, coefficients, grad): the samplers' case everywhere, grad enabled in fp32
CASES = [(b, d, c, False) for b in (16, 128, 512) for d in DTYPES for c in ("float", "tensor")]
CASES += [(b, "fp32", c, True) for b in (16, 128) for c in ("float", "tensor")]
TARGET = 2.0  # public ddim_update vs eager, at these batches in fp32
TARGET_BATCHES = (16, 128)
ROTATE = 8
_MEDIANS: dict = {}  # group -> {impl: median seconds}


def eager_ddim(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t):
    """What a sampler writes without the fused op (per-sample coefficients as [B,1,1,1])."""
    x0 = x0.clamp(-1, 1)
    eps = (z_t - alpha_t * x0) / sigma_t
    return alpha_s * x0 + sigma_s * eps


def make_inputs(batch, dtype, coefs, grad):
    """ROTATE input sets; coefficients of a real step of the cosine schedule."""
    sched = cosine_schedule(1024, 1)
    sets = []
    for _ in range(ROTATE):
        t = torch.randint(2, 1025, (batch,))
        s = t - 1
        vals = [v.float().to(DEVICE) for v in (sched.alpha[s], sched.sigma[s], sched.alpha[t], sched.sigma[t])]
        if coefs == "float":
            vals = [float(v[0]) for v in vals]
        z = torch.randn(batch, 3, 32, 32, device=DEVICE).to(dtype)
        x = (2 * torch.randn(batch, 3, 32, 32, device=DEVICE)).to(dtype).requires_grad_(grad)
        sets.append((z, x, vals))
    return sets


def timed(fn, sets, grad):
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        with torch.set_grad_enabled(grad):
            for z, x, c in sets:
                fn(z, x, c)
        sync()

    for _ in range(3):  # warm-up (and compilation)
        run()
    return run


def case_id(case):
    batch, dtype, coefs, grad = case
    return f"B{batch}-{dtype}-{coefs}-{'grad' if grad else 'nograd'}"


def group_name(case):
    batch, dtype, coefs, grad = case
    mode = "grad enabled, x0 requires grad" if grad else "no_grad"
    return f"ddim_update {DEVICE} [{batch},3,32,32] {dtype}, {coefs} coefficients, {mode}"


def run_case(benchmark, case, impl, fn):
    batch, dtype, coefs, grad = case
    sets = make_inputs(batch, DTYPES[dtype], coefs, grad)
    benchmark.group = group_name(case)
    benchmark.extra_info.update(impl=impl, batch=batch, dtype=dtype, coefs=coefs, grad=grad,
                                ops_per_call=ROTATE)
    benchmark(timed(fn, sets, grad))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _MEDIANS.setdefault(benchmark.group, {})[impl] = stats.stats.median
        benchmark.extra_info["per_op_us"] = stats.stats.median / ROTATE * 1e6


@pytest.fixture(scope="module", autouse=True)
def report_target(request):
    """After the module: public vs eager per case, and the 2x target's verdict."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _MEDIANS:
        return
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        _report(reporter.write_line)


def _report(write):
    write("")
    write(f"ddim_update on {DEVICE} ({torch.get_num_threads()} threads): public "
          "rcfd.core.ops.ddim_update vs eager (medians)")
    for case in CASES:
        times = _MEDIANS.get(group_name(case), {})
        if "eager" not in times or "public" not in times:
            continue
        ratio = times["eager"] / times["public"]
        line = (f"  {case_id(case)}: eager {times['eager'] / ROTATE * 1e6:.1f} us, public "
                f"{times['public'] / ROTATE * 1e6:.1f} us, {ratio:.2f}x")
        if case[0] in TARGET_BATCHES and case[1] == "fp32":
            line += f"  target >= {TARGET:g}x: {'met' if ratio >= TARGET else 'NOT MET'}"
        write(line)


def _eager_args(c):
    return [v.view(-1, 1, 1, 1) if isinstance(v, torch.Tensor) else v for v in c]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def bench_eager(benchmark, case):
    run_case(benchmark, case, "eager", lambda z, x, c: eager_ddim(z, x, *_eager_args(c)))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def bench_public(benchmark, case):
    assert ops.backend("ddim_update", DEVICE) == "extension", "benchmarking needs the compiled extension"
    run_case(benchmark, case, "public", lambda z, x, c: ops.ddim_update(z, x, *c, clip=True))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def bench_raw_op(benchmark, case):
    assert ops.extension_loaded(), "benchmarking needs the compiled extension"  # defines the ops
    scalar = torch.ops.rcfd.ddim_update_scalar.default
    tensor = torch.ops.rcfd.ddim_update.default
    op = scalar if case[2] == "float" else tensor
    run_case(benchmark, case, "raw op", lambda z, x, c: op(z, x, *c, True))


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile baseline is measured on a GPU")
@pytest.mark.parametrize("case", [c for c in CASES if not c[3]], ids=case_id)
def bench_compiled(benchmark, case):
    compiled = torch.compile(eager_ddim)
    run_case(benchmark, case, "torch.compile", lambda z, x, c: compiled(z, x, *_eager_args(c)))
