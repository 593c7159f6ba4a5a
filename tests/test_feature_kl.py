"""Tests of the feature KL (METHOD.md, "Classifier-based feature distillation"):
the PyTorch reference against ``F.kl_div`` in float64, and the Triton kernel (under
``TRITON_INTERPRET=1`` without a GPU) against the float64 reference, loss and gradient.

The interpreter is slow, so the default run covers a representative subset of shapes;
the full grid is marked ``slow``. torch.compile with Inductor runs everywhere (C++ code
around the op on the CPU); CUDA-graph capture and the 16384 x 4096 case are ``cuda`` tests.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from rcfd.core import ops
from rcfd.core.kernels import feature_kl as fk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(fk.triton is None, reason="needs Triton")
kernel = [pytest.mark.triton, needs_triton]

SHAPES = [(b, d) for b in (1, 3) for d in (1, 7, 512, 1920, 4097)] + [
    (33, 123), (128, 512), (1, 65536)]  # several rows per program, with a ragged tail
FULL_SHAPES = [(b, d) for b in (1, 3, 128) for d in (1, 7, 123, 512, 1920, 2048, 4097,
                                                        8192, 8193, 65536)]
# (loss rtol, loss atol, grad rtol, grad atol relative to max |grad|) for the kernel,
# against float64 on the same (rounded) inputs: the loss is fp32 arithmetic throughout,
# the gradient is rounded once to the input dtype.
TOL = {torch.float32: (1e-5, 1e-5, 1e-4, 1e-5),
       torch.float16: (1e-5, 1e-5, 2e-3, 2e-3),
       torch.bfloat16: (1e-5, 1e-5, 1e-2, 1e-2)}


def features(b, d, dtype=torch.float32, scale=3.0, relu=False):
    x = torch.randn(b, d, device=DEVICE, dtype=torch.float64) * scale
    return (x.relu() if relu else x).to(dtype)


def float64_reference(student, teacher, tau_t, tau_s, reduction, grad_output=None):
    """Loss and student gradient in float64 from the inputs as they are (already rounded)."""
    s = student.detach().double().requires_grad_()
    loss = fk.feature_kl_reference(s, teacher.double(), tau_t, tau_s, reduction)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, s, go)
    return loss, grad


def kernel_loss_and_grad(student, teacher, tau_t, tau_s, reduction, grad_output=None):
    s = student.detach().clone().requires_grad_()
    loss = fk.feature_kl_triton(s, teacher, tau_t, tau_s, reduction)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, s, go)
    return loss, grad


def assert_matches_reference(b, d, dtype=torch.float32, reduction="batchmean", tau_t=0.9,
                             tau_s=1.0, relu=False, scale=3.0, grad_output=None):
    s, t = features(b, d, dtype, scale, relu), features(b, d, dtype, scale, relu)
    loss, grad = kernel_loss_and_grad(s, t, tau_t, tau_s, reduction, grad_output)
    ref_loss, ref_grad = float64_reference(s, t, tau_t, tau_s, reduction, grad_output)
    lr, la, gr, ga = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad.dtype == dtype and grad.shape == s.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=lr, atol=la)
    g_atol = ga * ref_grad.abs().max().item() + 1e-30
    torch.testing.assert_close(grad.double(), ref_grad, rtol=gr, atol=g_atol)


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("reduction", fk.REDUCTIONS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 123), (2, 1920)])
@pytest.mark.parametrize("taus", [(0.9, 1.0), (0.95, 0.95), (2.0, 0.5)])
def test_reference_matches_kl_div_float64(shape, reduction, taus):
    tau_t, tau_s = taus
    s, t = features(*shape, torch.float64), features(*shape, torch.float64)
    log_q = F.log_softmax(s / tau_s, dim=1)
    p = F.softmax(t / tau_t, dim=1)
    if reduction == "none":
        want = F.kl_div(log_q, p, reduction="none").sum(dim=1)
    else:
        want = F.kl_div(log_q, p, reduction=reduction)
    got = fk.feature_kl_reference(s, t, tau_t, tau_s, reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", fk.REDUCTIONS)
def test_reference_gradcheck(reduction):
    s = features(3, 7, torch.float64).requires_grad_()
    t = features(3, 7, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: fk.feature_kl_reference(x, t, 0.9, 1.3, reduction), (s,))


def test_reference_gradient_formula():
    """dL/ds = (softmax(s / tau_S) - softmax(t / tau_T)) / (tau_S * B) for batchmean."""
    s, t = features(4, 33, torch.float64), features(4, 33, torch.float64)
    _, grad = float64_reference(s, t, 0.9, 1.3, "batchmean")
    want = (F.softmax(s / 1.3, dim=1) - F.softmax(t / 0.9, dim=1)) / (1.3 * 4)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_low_precision_dtypes(dtype):
    s = features(3, 64, dtype).requires_grad_()
    loss = fk.feature_kl_reference(s, features(3, 64, dtype))
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == dtype


# --------------------------------------------------------------------------- kernel


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape):
    assert_matches_reference(*shape)


@pytest.mark.parametrize("reduction", fk.REDUCTIONS)
@pytest.mark.parametrize("shape", [(3, 1920), (2, 65536)], ids=str)
@pytest.mark.triton
@needs_triton
def test_kernel_reductions(shape, reduction):
    b = shape[0]
    go = None if reduction != "none" else torch.rand(b, device=DEVICE) + 0.5
    assert_matches_reference(*shape, reduction=reduction, tau_t=0.95, tau_s=0.8,
                             grad_output=go)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(3, 4097), (2, 300)], ids=str)
def test_kernel_online_path_with_ragged_chunks(shape, monkeypatch):
    """Force the two-pass kernel on short rows: several chunks and a partial last one."""
    monkeypatch.setattr(fk, "MAX_ROW_BLOCK", 128)
    monkeypatch.setattr(fk, "ONLINE_CHUNK", 64)
    assert fk.launch_config(*shape, fk.MAX_ROW_BLOCK, fk.ONLINE_CHUNK).online
    assert_matches_reference(*shape, reduction="none", tau_t=0.9, tau_s=1.1)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(33, 123), (3, 1920), (1, 65536)], ids=str)
def test_kernel_low_precision(shape, dtype):
    assert_matches_reference(*shape, dtype=dtype)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(3, 512), (2, 1920), (1, 65536)], ids=str)
def test_kernel_post_relu_features_of_magnitude_1e3(shape):
    """Post-ReLU features: many exact zeros, the rest ~1e3, so both softmaxes are sharp."""
    assert_matches_reference(*shape, relu=True, scale=1e3, tau_t=0.9, tau_s=1.0)


@pytest.mark.parametrize("path", ["reference", pytest.param("triton", marks=kernel)])
@pytest.mark.parametrize("shape", [(3, 7), (2, 1920), (1, 65536)], ids=str)
def test_identical_inputs_give_zero_loss_and_gradient(path, shape):
    x = features(*shape)
    s = x.clone().requires_grad_()
    fn = fk.feature_kl_triton if path == "triton" else fk.feature_kl_reference
    loss = fn(s, x.clone(), 0.9, 0.9)
    loss.backward()
    if path == "triton":  # both softmaxes go through the same fp32 operations
        assert loss.item() == 0.0 and not s.grad.any()
    else:
        assert abs(loss.item()) < 1e-6
        assert s.grad.abs().max().item() < 1e-6  # fp32 rounding of q - p


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(3, 1920), (2, 65536)], ids=str)
def test_kernel_gradient_rows_sum_to_zero(shape):
    s, t = features(*shape), features(*shape)
    _, grad = kernel_loss_and_grad(s, t, 0.9, 1.0, "sum")
    rows = grad.double().sum(dim=1)
    assert (rows.abs() <= 1e-6 * grad.double().abs().sum(dim=1)).all()


@pytest.mark.parametrize("path", ["reference", pytest.param("triton", marks=kernel)])
def test_teacher_requiring_grad_gets_none(path):
    fn = fk.feature_kl_triton if path == "triton" else fk.feature_kl_reference
    s, t = features(3, 20).requires_grad_(), features(3, 20).requires_grad_()
    fn(s, t).backward()
    assert t.grad is None and s.grad is not None
    assert not fn(s.detach(), t).requires_grad  # the teacher alone never makes a graph


@pytest.mark.triton
@needs_triton
def test_kernel_without_grad_mode_gives_the_same_loss():
    s, t = features(3, 100).requires_grad_(), features(3, 100)
    with torch.no_grad():
        loss = fk.feature_kl_triton(s, t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, fk.feature_kl_triton(s, t).detach())


@pytest.mark.triton
@needs_triton
def test_kernel_is_differentiable_once_only():
    s, t = features(3, 20).requires_grad_(), features(3, 20)
    (grad,) = torch.autograd.grad(fk.feature_kl_triton(s, t), s, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def _strided(kind, b, d):
    """Non-contiguous ``[b, d]`` views with the layouts a caller can hand in."""
    base = features(b, d)
    if kind == "transposed":
        return base.t().contiguous().t()
    if kind == "column_step":
        return features(b, 2 * d)[:, ::2]
    if kind == "row_step":
        return features(2 * b, d)[::2]
    return features(1, d).expand(b, d)  # "expanded_rows": row stride 0


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("kind", ["transposed", "column_step", "row_step", "expanded_rows"])
def test_kernel_non_contiguous_inputs(kind):
    s, t = _strided(kind, 3, 77), _strided(kind, 3, 77)
    assert not s.is_contiguous()
    loss, grad = kernel_loss_and_grad(s, t, 0.9, 1.0, "none")
    ref_loss, ref_grad = float64_reference(s, t, 0.9, 1.0, "none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- bad inputs

_OK = dict(student=torch.zeros(2, 5), teacher=torch.zeros(2, 5), tau_teacher=0.9,
           tau_student=1.0, reduction="batchmean")
BAD = [
    ("student", [[1.0]], TypeError, "student must be a tensor"),
    ("teacher", torch.zeros(2, 5, dtype=torch.int64), TypeError, "teacher must be a float"),
    ("student", torch.zeros(2, 5, dtype=torch.complex64), TypeError, "student must be"),
    ("student", torch.zeros(10), ValueError, r"student must be a \[B, D\]"),
    ("teacher", torch.zeros(2, 5, 1), ValueError, "flatten"),
    ("teacher", torch.zeros(2, 6), ValueError, "teacher has shape"),
    ("both", torch.zeros(0, 5), ValueError, "at least one row"),
    ("both", torch.zeros(2, 0), ValueError, "one column"),
    ("teacher", torch.zeros(2, 5, dtype=torch.float64), TypeError, "teacher.to"),
    ("teacher", torch.zeros(2, 5, device="meta"), ValueError, "teacher is on meta"),
    ("tau_teacher", 0.0, ValueError, "tau_teacher must be finite and > 0"),
    ("tau_student", -1.0, ValueError, "tau_student must be finite and > 0"),
    ("tau_teacher", math.inf, ValueError, "tau_teacher"),
    ("tau_student", math.nan, ValueError, "tau_student"),
    ("tau_teacher", torch.tensor(0.9), TypeError, "tau_teacher must be a positive"),
    ("tau_student", True, TypeError, "tau_student"),
    ("tau_teacher", "0.9", TypeError, "tau_teacher"),
    ("reduction", "mean", ValueError, "not the KL"),
    ("reduction", "avg", ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("name,value,error,match", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_inputs_raise_clear_errors(name, value, error, match):
    bad = {"student": value, "teacher": value} if name == "both" else {name: value}
    with pytest.raises(error, match=match):
        ops.feature_kl(**{**_OK, **bad})


@needs_triton
def test_kernel_refuses_float64():
    with pytest.raises(TypeError, match="feature_kl_reference"):
        fk.feature_kl_triton(features(2, 5, torch.float64), features(2, 5, torch.float64))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("programs,stages", [(1, 1), (3, 2), (1000, 3)], ids=str)
@pytest.mark.parametrize("shape", [(33, 123), (128, 512), (3, 1920)], ids=str)
def test_persistent_rows_kernel(shape, programs, stages, monkeypatch):
    """Persistent programs looping over the row tiles (fewer programs than tiles, one, or
    more than tiles) give the loss and gradient of one tile per program."""
    plain = fk.launch_config
    monkeypatch.setattr(fk, "launch_config",
                        lambda *a: fk.persistent(plain(*a), programs, stages))
    assert fk.launch_config(*shape).stages == stages
    go = torch.rand(shape[0], device=DEVICE) + 0.5
    assert_matches_reference(*shape, reduction="none", grad_output=go)
    assert_matches_reference(*shape, dtype=torch.bfloat16)


def test_persistent_needs_a_whole_row_setting():
    with pytest.raises(ValueError, match="whole-row"):
        fk.persistent(fk.launch_config(2, 65536), 4, 2)
    for programs, stages in ((0, 2), (4, 0)):
        with pytest.raises(ValueError, match="programs >= 1 and stages >= 1"):
            fk.persistent(fk.launch_config(128, 512), programs, stages)
    assert fk.persistent(fk.launch_config(128, 512), 4, 2).grid == 4


# --------------------------------------------------------------------------- backward

SCALE_PATHS = ["kernel", "torch"]  # the skip-if-one Triton kernel, or one PyTorch multiply


@pytest.fixture(params=SCALE_PATHS)
def scale_path(request, monkeypatch):
    """Run the eager backward's in-place scaling through each of its two paths."""
    if request.param == "kernel":
        monkeypatch.setattr(fk, "INPLACE_KERNEL_MIN_BYTES", 0)
    else:
        monkeypatch.setattr(fk, "INPLACE_KERNEL_MIN_BYTES", 1 << 62)
    return request.param


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction,grad_output", [
    ("batchmean", 1.0), ("batchmean", 0.25), ("sum", -3.0),
    ("none", [1.0, 2.0, 1.0, -0.5, 1.0]), ("none", [1.0] * 5)], ids=str)
def test_backward_scales_by_grad_output(scale_path, reduction, grad_output, dtype):
    """Every row is scaled by its own grad_output, rows of exactly 1 included."""
    go = torch.tensor(grad_output, device=DEVICE)
    assert_matches_reference(5, 300, dtype=dtype, reduction=reduction, grad_output=go)


@pytest.mark.triton
@needs_triton
def test_backward_per_row_grad_output_with_stride_zero(scale_path):
    """``rows.mean().backward()`` hands the per-row backward an expanded (stride 0) scale."""
    s, t = features(4, 130), features(4, 130)
    leaf = s.clone().requires_grad_()
    fk.feature_kl_triton(leaf, t, 0.9, 1.0, "none").mean().backward()
    _, want = float64_reference(s, t, 0.9, 1.0, "batchmean")
    torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.triton
@needs_triton
def test_second_backward_through_one_forward_recomputes(scale_path):
    """The first backward hands its saved gradient over; ``retain_graph`` backwards after
    it run the kernel again, so each one gets the gradient for its own grad_output."""
    s, t = features(3, 200).requires_grad_(), features(3, 200)
    loss = fk.feature_kl_triton(s, t)
    (g1,) = torch.autograd.grad(loss, s, torch.tensor(2.0), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    _, want = float64_reference(s, t, 0.9, 1.0, "batchmean")
    torch.testing.assert_close(g1.double(), 2 * want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g2.double(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), 2 * want, rtol=1e-4, atol=1e-7)


@pytest.mark.triton
@needs_triton
def test_scale_in_place_per_row_and_shared(scale_path):
    """The scaling alone: rows scaled by 1 keep their values exactly, a NaN scale spreads,
    a shared scale ([] or an expanded [B]) reaches every row; the tensor is written in place.
    (Triton's interpreter rounds fp32 -> bf16 toward zero, a GPU to nearest: hence the
    tolerance of one bf16 rounding.)"""
    grad = features(4, 70, torch.bfloat16)
    rows = torch.tensor([1.0, 2.0, float("nan"), -0.5], device=DEVICE)
    out = fk._scale_in_place(grad.clone(), rows, "none")
    want = (grad.float() * rows[:, None]).to(torch.bfloat16)
    assert torch.equal(out[0], grad[0]) and out[2].isnan().all()
    torch.testing.assert_close(out[[0, 1, 3]], want[[0, 1, 3]])  # one bf16 rounding
    for shared in (torch.tensor(3.0, device=DEVICE), torch.tensor(3.0, device=DEVICE).expand(4)):
        buf = grad.clone()
        out = fk._scale_in_place(buf, shared, "none" if shared.dim() else "sum")
        assert out.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(out, (grad.float() * 3).to(torch.bfloat16))


# --------------------------------------------------------------------------- plumbing


def test_launch_config_shapes_work_per_program():
    small = fk.launch_config(128, 64)
    assert not small.online and small.rows > 1 and small.grid * small.rows >= 128
    assert small.grid < 128  # several short rows share a program
    for d in (1, 7, 512, 1920, 4097, fk.MAX_ROW_BLOCK):
        cfg = fk.launch_config(3, d)
        assert not cfg.online and cfg.block_d >= d and cfg.grid * cfg.rows >= 3
    for b, d in [(1, fk.MAX_ROW_BLOCK + 1), (4, 65536)]:
        cfg = fk.launch_config(b, d)
        assert cfg.online and cfg.grid == b and cfg.rows == 1
    for b, d in [(1, 1), (128, 512), (16384, 4096), (2, 65536)]:
        w = fk.launch_config(b, d).num_warps
        assert 1 <= w <= fk.MAX_WARPS and w & (w - 1) == 0


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("want", ["triton", "reference"])
def test_ops_entry_point_dispatch(want, monkeypatch):
    monkeypatch.setenv("RCFD_KL_BACKEND", want)
    assert ops.backend("feature_kl", DEVICE) == want
    with ops.fresh_routes():  # the route is decided at the first call, here afresh
        s, t = features(3, 50), features(3, 50)
        torch.testing.assert_close(ops.feature_kl(s, t), fk.feature_kl_reference(s, t),
                                   rtol=1e-5, atol=1e-6)
        s64, t64 = s.double(), t.double()  # float64 always takes the float64 reference
        assert torch.equal(ops.feature_kl(s64, t64), fk.feature_kl_reference(s64, t64))
        assert ops.route("feature_kl", DEVICE) == want


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("reduction,compute_grad", [("batchmean", True), ("none", False)])
def test_custom_op_opcheck(reduction, compute_grad):
    s, t = features(3, 37).requires_grad_(compute_grad), features(3, 37)
    torch.library.opcheck(torch.ops.rcfd.feature_kl.default,
                          (s, t, 0.9, 1.0, reduction, compute_grad))


@pytest.mark.triton
@needs_triton
def test_compiles_as_one_opaque_op():
    """Under torch.compile the kernel is the custom op, traced without graph breaks."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    s, t = features(3, 37).requires_grad_(), features(3, 37)
    compiled = torch.compile(fk.feature_kl_triton, backend=record, fullgraph=True)
    loss = compiled(s, t, 0.9, 1.0, "batchmean")
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.ops.rcfd.feature_kl.default in seen
    ref_loss, ref_grad = kernel_loss_and_grad(s, t, 0.9, 1.0, "batchmean")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


# --------------------------------------------------------------------------- slow, CUDA


@pytest.mark.slow
@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", fk.REDUCTIONS)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=str)
def test_kernel_full_grid(shape, reduction, dtype):
    go = torch.rand(shape[0], device=DEVICE) + 0.5 if reduction == "none" else None
    assert_matches_reference(*shape, dtype=dtype, reduction=reduction, grad_output=go)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_large_batch(dtype):
    assert_matches_reference(16384, 4096, dtype=dtype)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_inductor_matches_eager(dynamic):
    """Inductor compiles the graph around the opaque op (C++ on the CPU, Triton on a GPU);
    loss and gradient equal the eager path's, for two shapes (a recompile or a dynamic one)."""
    torch._dynamo.reset()

    def step(s, t):
        return fk.feature_kl_triton(s, t, 0.9, 1.0, "batchmean") * 2.0

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for b, d in [(128, 512), (64, 1920)]:
        s, t = features(b, d).requires_grad_(), features(b, d)
        loss = compiled(s, t)
        (grad,) = torch.autograd.grad(loss, s)
        want_loss = step(s, t)
        (want_grad,) = torch.autograd.grad(want_loss, s)
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("shape", [(128, 1920), (2, 65536)], ids=str)
def test_cuda_graph_capture_and_replay(shape, scale_path):
    static_s = features(*shape).requires_grad_()
    static_t = features(*shape)

    def step():
        loss = fk.feature_kl_triton(static_s, static_t, 0.9, 1.0, "batchmean")
        return loss, torch.autograd.grad(loss, static_s)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    for _ in range(2):
        new_s, new_t = features(*shape), features(*shape)
        with torch.no_grad():
            static_s.copy_(new_s)
            static_t.copy_(new_t)
        graph.replay()
        want_loss, want_grad = kernel_loss_and_grad(new_s, new_t, 0.9, 1.0, "batchmean")
        torch.testing.assert_close(static_loss, want_loss, rtol=0, atol=0)
        torch.testing.assert_close(static_grad, want_grad, rtol=0, atol=0)
