"""The fused DDIM update: the public rcfd.core.ops.ddim_update and the compiled ops
torch.ops.rcfd.ddim_update / ddim_update_scalar (the update alone; a sampler's DDIM step is the
model call plus this update)."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rcfd.core import ops
from rcfd.core.schedule import cosine_schedule

ops.load_extension()  # torch.ops.rcfd.ddim_update* exist once the extension is loaded

TOL = {  # (rtol, atol) against a float64 reference computed from the same inputs
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
SHAPES = [(1, 3, 32, 32), (7, 1, 16, 16), (123, 3, 5, 7), (7, 5), (4, 2, 3, 3, 3)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KINDS = ["scalar", "per-sample", "0-dim", "mixed", "float64-tensors"]


def reference64(z_t, x0, a_s, s_s, a_t, s_t, clip):
    """METHOD.md "DDIM step", in float64, written out independently of rcfd.core.ops."""
    shape = (-1,) + (1,) * (z_t.dim() - 1)

    def c(v):
        return v.double().reshape(shape) if isinstance(v, torch.Tensor) and v.dim() else (
            v.double() if isinstance(v, torch.Tensor) else float(v)
        )

    x = x0.double().clamp(-1, 1) if clip else x0.double()
    eps = (z_t.double() - c(a_t) * x) / c(s_t)
    return c(a_s) * x + c(s_s) * eps


def coefs(batch, device, kind):
    """Coefficients of a real step of the cosine schedule, as floats or per-sample tensors."""
    sched = cosine_schedule(64, 16)
    t = torch.randint(2, 65, (batch,)) * 16
    s = t - 16 * torch.randint(1, 2, (batch,))
    vals = [sched.alpha[s], sched.sigma[s], sched.alpha[t], sched.sigma[t]]
    if kind == "scalar":
        return [float(v[0]) for v in vals]
    if kind == "0-dim":
        return [v[0].float().to(device) for v in vals]
    if kind == "mixed":
        return [vals[0].float().to(device), float(vals[1][0]), vals[2].float().to(device), float(vals[3][0])]
    if kind == "float64-tensors":
        return [v.double().to(device) for v in vals]
    return [v.float().to(device) for v in vals]


def test_extension_is_loaded_and_has_cuda_kernels_when_it_should():
    assert ops.extension_loaded(), f"rcfd._C did not load: {ops.extension_error()}"
    info = ops.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (
        "the extension was built against another torch; rebuild it"
    )
    toolkit = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    if torch.version.cuda and toolkit and os.environ.get("RCFD_NO_CUDA") != "1":
        assert info["cuda"], "torch has CUDA and a toolkit is present, but no CUDA kernels were built"
        assert info["cuda_archs"]
    if torch.cuda.is_available():
        assert ops.backend("ddim_update", "cuda") == "extension"
    assert ops.backend("ddim_update", "cpu") == "extension"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip", [False, True])
def test_matches_float64_reference(device, dtype, shape, kind, clip):
    z_t = torch.randn(shape, device=device).to(dtype)
    x0 = (3 * torch.randn(shape, device=device)).to(dtype)  # well outside [-1, 1]
    c = coefs(shape[0], device, kind)
    out = ops.ddim_update(z_t, x0, *c, clip=clip)
    assert out.dtype == dtype and out.shape == z_t.shape
    ref = reference64(z_t, x0, *c, clip)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL))
def test_channels_last_stays_channels_last(device, dtype):
    z_t = torch.randn(5, 3, 9, 11, device=device).to(dtype).to(memory_format=torch.channels_last)
    x0 = torch.randn(5, 3, 9, 11, device=device).to(dtype).to(memory_format=torch.channels_last)
    c = coefs(5, device, "per-sample")
    out = ops.ddim_update(z_t, x0, *c, clip=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), reference64(z_t, x0, *c, True), rtol=rtol, atol=atol)
    # one input channels-last, the other contiguous; and a strided (sliced) input
    out2 = ops.ddim_update(z_t, x0.contiguous(), *c, clip=True)
    torch.testing.assert_close(out2, out)
    wide = torch.randn(5, 3, 9, 22, device=device).to(dtype)
    out3 = ops.ddim_update(wide[..., ::2], x0, *c, clip=False)
    torch.testing.assert_close(out3.double(), reference64(wide[..., ::2], x0, *c, False), rtol=rtol, atol=atol)


def test_agrees_with_pytorch_reference_implementation():
    z_t, x0 = torch.randn(7, 3, 8, 8), 2 * torch.randn(7, 3, 8, 8)
    c = coefs(7, "cpu", "per-sample")
    for clip in (False, True):
        torch.testing.assert_close(
            ops.ddim_update(z_t, x0, *c, clip=clip), ops.ddim_update_reference(z_t, x0, *c, clip)
        )


def test_float64_inputs_use_the_reference():
    z_t, x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    c = coefs(3, "cpu", "per-sample")
    out = ops.ddim_update(z_t, x0, *c)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference64(z_t, x0, *c, False))


def test_nan_propagates_through_clip():
    z_t, x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x0[0, 0, 0, 0] = float("nan")
    out = ops.ddim_update(z_t, x0, 0.5, 0.5, 0.4, 0.6, clip=True)
    assert out[0, 0, 0, 0].isnan() and out[1].isfinite().all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("shape", [(7, 3, 5, 5), (5, 4), (3, 2, 3, 3, 3)])
def test_gradient_matches_reference(clip, kind, shape):
    z_t = torch.randn(shape, requires_grad=True)
    x0 = (2 * torch.randn(shape)).requires_grad_()
    c = coefs(shape[0], "cpu", kind)
    g = torch.randn(shape)
    gz, gx = torch.autograd.grad(ops.ddim_update(z_t, x0, *c, clip=clip), (z_t, x0), g)
    z64, x64 = z_t.detach().double().requires_grad_(), x0.detach().double().requires_grad_()
    rz, rx = torch.autograd.grad(reference64(z64, x64, *c, clip), (z64, x64), g.double())
    torch.testing.assert_close(gz.double(), rz, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["scalar", "per-sample"])
def test_gradient_of_one_input_and_in_bfloat16(kind):
    z_t = torch.randn(6, 3, 4, 4).bfloat16()
    x0 = (2 * torch.randn(6, 3, 4, 4)).bfloat16().requires_grad_()
    c = coefs(6, "cpu", kind)
    out = ops.ddim_update(z_t, x0, *c, clip=True)
    (gx,) = torch.autograd.grad(out, (x0,), torch.ones_like(out))
    assert gx.dtype == torch.bfloat16
    x64 = x0.detach().double().requires_grad_()
    (rx,) = torch.autograd.grad(reference64(z_t, x64, *c, True).sum(), (x64,))
    torch.testing.assert_close(gx.double(), rx, **dict(zip(("rtol", "atol"), TOL[torch.bfloat16])))


@pytest.mark.parametrize("kind", ["scalar", "per-sample"])
def test_graph_only_when_an_image_requires_grad(kind):
    z_t, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    c = coefs(3, "cpu", kind)
    with torch.no_grad():
        assert ops.ddim_update(z_t, x0.requires_grad_(), *c).grad_fn is None
    assert ops.ddim_update(z_t, x0.detach(), *c).grad_fn is None
    assert ops.ddim_update(z_t, x0, *c).grad_fn is not None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    z_t = torch.randn(7, 3, 5, 5, device=device, requires_grad=True)
    x0 = torch.randn(7, 3, 5, 5, device=device, requires_grad=True)
    c = coefs(7, device, "per-sample")
    update, scalar = torch.ops.rcfd.ddim_update.default, torch.ops.rcfd.ddim_update_scalar.default
    torch.library.opcheck(update, (z_t, x0, *c, True))
    torch.library.opcheck(update, (z_t.detach(), x0.detach(), *c, False))
    torch.library.opcheck(update, (z_t, x0, *coefs(7, device, "0-dim"), False))
    torch.library.opcheck(scalar, (z_t, x0, 0.9, 0.3, 0.8, 0.6, True))
    torch.library.opcheck(scalar, (z_t.detach(), x0.detach(), 0.9, 0.3, 0.8, 0.6, False))
    zc = z_t.detach().to(memory_format=torch.channels_last)
    torch.library.opcheck(update, (zc, x0.detach(), *c, True))
    z5, x5 = torch.randn(3, 2, 3, 3, 3, device=device, requires_grad=True), torch.randn(3, 2, 3, 3, 3, device=device)
    torch.library.opcheck(update, (z5, x5, *coefs(3, device, "per-sample"), True))


@pytest.mark.parametrize("kind", ["scalar", "per-sample"])
def test_forward_and_backward_trace_under_torch_compile(kind):
    """aot_eager runs the fake kernels and the C++ autograd kernel under FakeTensors (no
    code generation, so this stays quick on the CPU)."""
    z_t, x0 = torch.randn(5, 3, 4, 4), (2 * torch.randn(5, 3, 4, 4)).requires_grad_()
    c = coefs(5, "cpu", kind)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(z, x, *cs):
        return ops.ddim_update(z, x, *cs, clip=True) * 2

    out = step(z_t, x0, *c)
    (gx,) = torch.autograd.grad(out.sum(), (x0,))
    x64 = x0.detach().double().requires_grad_()
    ref = 2 * reference64(z_t, x64, *c, True)
    (rx,) = torch.autograd.grad(ref.sum(), (x64,))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-6)


def forced_reference(monkeypatch):
    """RCFD_BACKEND=reference, and a block in which the routes are chosen afresh (they are
    chosen once per device type) and after which the earlier ones are back."""
    monkeypatch.setenv("RCFD_BACKEND", "reference")
    return ops.fresh_routes()


def test_backend_choice_follows_rcfd_backend(monkeypatch):
    assert ops.route("ddim_update", torch.device("cpu")) == "extension"
    with forced_reference(monkeypatch):
        assert ops.route("ddim_update", torch.device("cpu")) == "reference"
        z_t, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
        torch.testing.assert_close(ops.ddim_update(z_t, x0, 0.9, 0.4, 0.8, 0.6),
                                   reference64(z_t, x0, 0.9, 0.4, 0.8, 0.6, False).float())
    assert ops.route("ddim_update", torch.device("cpu")) == "extension"  # restored


def test_references_block_forces_the_reference_and_restores_the_route():
    z_t, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    with ops.references():
        assert ops.route("ddim_update", "cpu") == "reference"
        assert torch.equal(ops.ddim_update(z_t, x0, 0.9, 0.4, 0.8, 0.6),
                           ops.ddim_update_reference(z_t, x0, 0.9, 0.4, 0.8, 0.6))
    assert ops.route("ddim_update", "cpu") == "extension"


# --------------------------------------------------------------------------- bad input


def _good():
    return torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), [0.9, 0.4, 0.8, 0.6]


PUBLIC_BAD_INPUTS = [  # (make bad arguments from good ones, exception, words in its message)
    (lambda z, x, c: (z, x[:3], c), ValueError, "x0 has shape [3, 3, 8, 8] but z_t has [4, 3, 8, 8]"),
    (lambda z, x, c: (z, x.half(), c), TypeError, "but z_t is"),
    (lambda z, x, c: (z.int(), x.int(), c), TypeError, "z_t must be float32, float16 or bfloat16"),
    (lambda z, x, c: ("z", x, c), TypeError, "z_t must be a tensor"),
    (lambda z, x, c: (z, None, c), TypeError, "x0 must be a tensor"),
    (lambda z, x, c: (z, x, [c[0], c[1], c[2], 0.0]), ValueError, "sigma_t must be > 0"),
    (lambda z, x, c: (z, x, [c[0], c[1], c[2], -0.5]), ValueError, "sigma_t must be > 0"),
    (lambda z, x, c: (z, x, [c[0], c[1], c[2], torch.tensor([0.5, 0.5, 0.0, 0.5])]), ValueError, "sigma_t must be > 0"),
    (lambda z, x, c: (z, x, [torch.ones(4), c[1], c[2], 0.0]), ValueError, "sigma_t must be > 0"),
    (lambda z, x, c: (z, x, [torch.ones(3), *c[1:]]), ValueError, "alpha_s must have shape [] or [B] with B=4, got [3]"),
    (lambda z, x, c: (z, x, [torch.ones(4, 1), *c[1:]]), ValueError, "alpha_s must have shape [] or [B]"),
    (lambda z, x, c: (z, x, [c[0], torch.ones(4, dtype=torch.int64), *c[2:]]), TypeError, "sigma_s must be a float"),
    (lambda z, x, c: (z, x, [c[0], "a", *c[2:]]), TypeError, "sigma_s must be a float or a tensor"),
    (lambda z, x, c: (z, x.to("meta"), c), ValueError, "x0 is on meta but z_t is on cpu"),
    (lambda z, x, c: (z, x, [torch.ones(4, device="meta"), *c[1:]]), ValueError, "alpha_s is on meta but z_t is on cpu"),
    (lambda z, x, c: (z[:0], x[:0], c), ValueError, "non-empty"),
    (lambda z, x, c: (z.double(), x[:3].double(), c), ValueError, "x0 has shape"),
]


@pytest.mark.parametrize("route", ["extension", "reference"])
@pytest.mark.parametrize("mutate, exc, words", PUBLIC_BAD_INPUTS)
def test_bad_input_is_named(mutate, exc, words, route, monkeypatch):
    routes = forced_reference(monkeypatch) if route == "reference" else contextlib.nullcontext()
    z, x, c = mutate(*_good())
    with routes, pytest.raises(exc) as info:
        assert ops.route("ddim_update", "cpu") == route
        ops.ddim_update(z, x, *c)
    assert words in str(info.value)


# The raw compiled ops with every bad input they check, with and without an input that
# requires grad (the autograd kernel's path), in a child process: an error path that crashes
# (it once segfaulted on a GPU machine) fails these tests instead of killing the test run.
RAW_BAD_INPUTS = {  # name: (call, exception, words)
    "shape": ("U(z, x[:3], *c, False)", "ValueError", "x0 has shape [3, 3, 8, 8] but z_t has [4, 3, 8, 8]"),
    "shape-2d-coef": ("U(z, x, torch.ones(4, 1), *c[1:], False)", "ValueError", "alpha_s must have shape [] or [B] with B=4, got [4, 1]"),
    "coef-batch": ("U(z, x, torch.ones(5), *c[1:], False)", "ValueError", "alpha_s must have shape [] or [B] with B=4, got [5]"),
    "empty": ("U(z[:0], x[:0], *c, False)", "ValueError", "z_t must be a non-empty [B, ...] tensor, got shape [0, 3, 8, 8]"),
    "sigma-zero": ("U(z, x, *c[:3], torch.zeros(4), False)", "ValueError", "sigma_t must be > 0 (it divides), got 0"),
    "x0-device": ("U(z, x.to('meta'), *c, False)", "ValueError", "x0 is on meta but z_t is on cpu"),
    "coef-device": ("U(z, x, *c[:3], c[3].to('meta'), False)", "ValueError", "sigma_t is on meta but z_t is on cpu"),
    "x0-dtype": ("U(z, x.double(), *c, False)", "TypeError", "x0 is Double but z_t is Float"),
    "z-dtype": ("U(z.double(), x.double(), *c, False)", "TypeError", "z_t must be float32, float16 or bfloat16, got Double"),
    "coef-dtype": ("U(z, x, *c[:3], c[3].double(), False)", "TypeError", "sigma_t must be a float32 tensor, got Double"),
    "scalar-sigma-zero": ("S(z, x, 0.9, 0.4, 0.8, 0.0, False)", "ValueError", "sigma_t must be > 0 (it divides), got 0"),
    "scalar-sigma-negative": ("S(z, x, 0.9, 0.4, 0.8, -0.25, False)", "ValueError", "sigma_t must be > 0 (it divides), got -0.25"),
    "scalar-sigma-nan": ("S(z, x, 0.9, 0.4, 0.8, float('nan'), False)", "ValueError", "sigma_t must be > 0 (it divides), got nan"),
    "scalar-shape": ("S(z, x[:3], 0.9, 0.4, 0.8, 0.6, False)", "ValueError", "x0 has shape [3, 3, 8, 8]"),
    "scalar-x0-device": ("S(z, x.to('meta'), 0.9, 0.4, 0.8, 0.6, False)", "ValueError", "x0 is on meta but z_t is on cpu"),
    "scalar-dtype": ("S(z.int(), x.int(), 0.9, 0.4, 0.8, 0.6, False)", "TypeError", "z_t must be float32, float16 or bfloat16, got Int"),
}
if torch.cuda.is_available():
    RAW_BAD_INPUTS["cuda-x0-device"] = ("U(z.cuda(), x, *c, False)", "ValueError", "x0 is on cpu but z_t is on cuda:0")
    RAW_BAD_INPUTS["cuda-coef-device"] = ("U(z.cuda(), x.cuda(), *c, False)", "ValueError", "alpha_s is on cpu but z_t is on cuda:0")
    RAW_BAD_INPUTS["cuda-scalar-sigma"] = ("S(z.cuda(), x.cuda(), 0.9, 0.4, 0.8, 0.0, False)", "ValueError", "sigma_t must be > 0")

CHILD = """
import faulthandler, json, sys, torch
faulthandler.enable()
from rcfd.core import ops
ops.load_extension()  # defines the ops and registers their fake kernels
U, S = torch.ops.rcfd.ddim_update, torch.ops.rcfd.ddim_update_scalar
for name, call in json.loads(sys.argv[1]).items():
    for grad in (False, True):
        print(json.dumps({"case": name, "grad": grad, "started": True}), flush=True)
        z, x = torch.randn(4, 3, 8, 8, requires_grad=grad), torch.randn(4, 3, 8, 8)
        c = [torch.full((4,), v) for v in (0.9, 0.4, 0.8, 0.6)]
        try:
            eval(call)
            got = {"type": None, "message": ""}
        except Exception as e:
            got = {"type": type(e).__name__, "message": str(e)}
        print(json.dumps({"case": name, "grad": grad, **got}), flush=True)
"""


@pytest.fixture(scope="module")
def raw_op_errors():
    calls = {name: call for name, (call, _, _) in RAW_BAD_INPUTS.items()}
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(calls)], capture_output=True,
                         text=True, timeout=600)
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return run, {(r["case"], r["grad"]): r for r in results if "started" not in r}


@pytest.mark.parametrize("name", list(RAW_BAD_INPUTS))
def test_compiled_op_checks_its_own_inputs(name, raw_op_errors):
    run, results = raw_op_errors
    _, exc, words = RAW_BAD_INPUTS[name]
    for grad in (False, True):
        got = results.get((name, grad))
        assert got is not None, (
            f"the process calling the raw op died in case {name!r} (grad={grad}) with exit code "
            f"{run.returncode} (negative: killed by that signal)\n{run.stderr[-3000:]}"
        )
        assert got["type"] == exc, got
        assert words in got["message"], got


# --------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream_and_in_a_graph():
    z_t = torch.randn(16, 3, 32, 32, device="cuda")
    x0 = 2 * torch.randn(16, 3, 32, 32, device="cuda")
    c = coefs(16, "cuda", "per-sample")
    expected = reference64(z_t, x0, *c, True).float()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ops.ddim_update(z_t, x0, *c, clip=True)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    static_z, static_x = z_t.clone(), x0.clone()
    ops.ddim_update(static_z, static_x, *c, clip=True)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.rcfd.ddim_update(static_z, static_x, *c, True)
    new_z, new_x = torch.randn_like(z_t), 2 * torch.randn_like(x0)
    static_z.copy_(new_z)
    static_x.copy_(new_x)
    graph.replay()
    torch.testing.assert_close(static_out, reference64(new_z, new_x, *c, True).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_under_torch_compile():
    z_t = torch.randn(8, 3, 32, 32, device="cuda")
    x0 = 2 * torch.randn(8, 3, 32, 32, device="cuda")
    c = coefs(8, "cuda", "per-sample")

    @torch.compile(fullgraph=True)
    def step(z, x, a_s, s_s, a_t, s_t):
        return torch.ops.rcfd.ddim_update(z, x, a_s, s_s, a_t, s_t, True) * 2

    torch.testing.assert_close(step(z_t, x0, *c), 2 * reference64(z_t, x0, *c, True).float(), rtol=1e-5, atol=1e-5)
