"""Fused temperature-softmax KL of classifier-based feature distillation (METHOD.md,
"Classifier-based feature distillation"), forward and backward in one Triton pass.

For rows ``b`` of ``[B, D]`` features, with ``p = softmax(teacher / tau_T)`` and
``q = softmax(student / tau_S)``::

    KL_b = sum_d p (log p - log q)
         = sum_d p * ((a - max a) - (c - max c)) + lse(c - max c) - lse(a - max a)
    dKL_b / dstudent = (q - p) / tau_S

with ``a = teacher / tau_T`` and ``c = student / tau_S`` (the second form uses
``sum_d p = 1`` and never forms ``0 * log 0``). The kernels work in base 2: the inputs are
scaled by ``log2(e) / tau`` once, so every exponential is an ``exp2``, and the row sum is
multiplied by ``ln 2`` at the end. The reduction sets the scale: ``batchmean`` is
``sum_b KL_b / B`` (the paper's loss), ``sum`` is ``sum_b KL_b``, ``none`` is ``[KL_b]``.

Layers (DESIGN.md, house style 5):

* ``_kl_rows_kernel`` holds whole rows in registers, ``rows`` rows per tile when the rows
  are short, one tile per program (or, :func:`persistent`, fewer programs that loop over
  the tiles with their loads software-pipelined); ``_kl_online_kernel`` handles rows
  longer than ``MAX_ROW_BLOCK`` with one program per row: a first pass over column chunks
  keeps a running max and a running sum of exponentials (online softmax), a second pass
  forms ``p``, ``q``, the loss and the gradient. Both write the gradient
  ``(q - p) * scale / tau_S`` in the input dtype, so the backward pass is one
  multiplication by ``grad_output``.
* ``_forward`` picks the kernel (:func:`launch_config`) and launches it.
* :class:`_FeatureKLFunction` (eager) and the custom op ``rcfd::feature_kl`` (what
  torch.compile sees: opaque, with a fake kernel and an autograd formula) wrap ``_forward``.
  Eager calls skip the custom-op dispatcher, which costs about as much as the kernel at
  the launch-bound training shapes.

Bytes moved per element, for bandwidth figures: ``_kl_rows_kernel`` reads ``student`` and
``teacher`` once and writes the gradient once (``3 * itemsize``), plus 4 bytes of loss
per row; ``_kl_online_kernel`` reads both inputs twice (``5 * itemsize``; the second read
may come from L2). The eager backward scales the saved gradient in place and hands it over
(:func:`_scale_in_place`): on large gradients a Triton kernel whose programs skip rows whose
``grad_output`` is exactly 1, so the usual ``loss.backward()`` (or a sum of losses) moves
no further bytes, and any other scale costs ``2 * itemsize``. Nothing here reads a tensor's
value on the host, so every path can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: only the reference is available
    triton = None
    tl = None

from rcfd.core.kernels.feature_kl_reference import (  # noqa: E402, F401  (re-exported)
    REDUCTIONS,
    check_inputs,
    feature_kl_reference,
)

# Launch heuristics (see launch_config); retune them with benchmarks/bench_feature_kl.py.
MAX_ROW_BLOCK = 8192  # longest row held whole in registers
ONLINE_CHUNK = 4096  # columns per step of the two-pass kernel
# Measured on an H100 (benchmarks/tune_feature_kl.py, benchmarks/RESULTS.md): one row per
# program from 512 columns on, 32 values per thread and input (4 warps at 4096 columns).
ROW_TILE = 512  # elements per program when several short rows share one
ELEMS_PER_THREAD = 32  # per input; sets num_warps from the block size
MIN_BLOCK = 16
MAX_WARPS = 16
# Gradients from this size on are scaled by the skip-if-one Triton kernel (the saved pass
# outweighs a Triton launch); smaller ones, launch-bound, by one in-place PyTorch multiply.
INPLACE_KERNEL_MIN_BYTES = 8 << 20
SCALE_BLOCK = 4096  # columns per program of the scaling kernel
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _kl_rows_tile(tile, s_ptr, t_ptr, grad_ptr, loss_ptr, n_rows, n_cols, s_stride,
                      t_stride, coef_s, coef_t, grad_scale, loss_scale,
                      ROWS: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_GRAD: tl.constexpr):
        """Rows ``tile * ROWS ...`` (whole rows, ``n_cols <= BLOCK_D``): loss and gradient."""
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows = tl.minimum(rows, n_rows - 1).to(tl.int64)  # tail rows recompute the last one
        cols = tl.arange(0, BLOCK_D)
        mask = (cols < n_cols)[None, :]  # broadcast over the rows
        s = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask, other=0.0)
        t = tl.load(t_ptr + rows[:, None] * t_stride + cols[None, :], mask=mask, other=0.0)
        c = s.to(tl.float32) * coef_s  # student / tau_S, in log2 units
        a = t.to(tl.float32) * coef_t  # teacher / tau_T, in log2 units
        c_max = tl.max(tl.where(mask, c, float("-inf")), axis=1)
        a_max = tl.max(tl.where(mask, a, float("-inf")), axis=1)
        c = c - c_max[:, None]
        a = a - a_max[:, None]
        e_c = tl.where(mask, tl.exp2(c), 0.0)
        e_a = tl.where(mask, tl.exp2(a), 0.0)
        z_c = tl.sum(e_c, axis=1)
        z_a = tl.sum(e_a, axis=1)
        q = e_c * (1.0 / z_c)[:, None]
        p = e_a * (1.0 / z_a)[:, None]
        kl2 = tl.sum(p * (a - c), axis=1) + tl.log2(z_c) - tl.log2(z_a)  # KL in bits
        tl.store(loss_ptr + rows, kl2 * (loss_scale * 0.6931471805599453), mask=row_ok)
        if WRITE_GRAD:
            g = (q - p) * grad_scale
            offs = rows[:, None] * n_cols + cols[None, :]
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty),
                     mask=mask & row_ok[:, None])

    @triton.jit
    def _kl_rows_kernel(s_ptr, t_ptr, grad_ptr, loss_ptr, n_rows, n_cols, s_stride,
                        t_stride, coef_s, coef_t, grad_scale, loss_scale,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_GRAD: tl.constexpr,
                        STAGES: tl.constexpr):
        """Tiles of ``ROWS`` whole rows: one per program (``STAGES == 0``), or persistent
        programs that loop over the tiles with their loads pipelined ``STAGES`` deep."""
        if STAGES == 0:
            _kl_rows_tile(tl.program_id(0), s_ptr, t_ptr, grad_ptr, loss_ptr, n_rows, n_cols,
                          s_stride, t_stride, coef_s, coef_t, grad_scale, loss_scale,
                          ROWS, BLOCK_D, WRITE_GRAD)
        else:
            for tile in tl.range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0),
                                 num_stages=STAGES):
                _kl_rows_tile(tile, s_ptr, t_ptr, grad_ptr, loss_ptr, n_rows, n_cols,
                              s_stride, t_stride, coef_s, coef_t, grad_scale, loss_scale,
                              ROWS, BLOCK_D, WRITE_GRAD)

    @triton.jit
    def _kl_online_kernel(s_ptr, t_ptr, grad_ptr, loss_ptr, n_cols, s_stride, t_stride,
                          coef_s, coef_t, grad_scale, loss_scale,
                          CHUNK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        """One row per program, any length: a pass for the running max and sum of
        exponentials (online softmax), then a pass for p, q, the loss and the gradient."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        cols = tl.arange(0, CHUNK)
        c_max = float("-inf")
        a_max = float("-inf")
        z_c = 0.0
        z_a = 0.0
        for start in range(0, n_cols, CHUNK):
            ok = start + cols < n_cols
            c = tl.load(s_row + start + cols, mask=ok, other=float("-inf")).to(tl.float32)
            a = tl.load(t_row + start + cols, mask=ok, other=float("-inf")).to(tl.float32)
            c = c * coef_s
            a = a * coef_t
            c_new = tl.maximum(c_max, tl.max(c, axis=0))
            a_new = tl.maximum(a_max, tl.max(a, axis=0))
            z_c = z_c * tl.exp2(c_max - c_new) + tl.sum(tl.exp2(c - c_new), axis=0)
            z_a = z_a * tl.exp2(a_max - a_new) + tl.sum(tl.exp2(a - a_new), axis=0)
            c_max = c_new
            a_max = a_new
        inv_z_c = 1.0 / z_c
        inv_z_a = 1.0 / z_a
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        for start in range(0, n_cols, CHUNK):
            ok = start + cols < n_cols
            s = tl.load(s_row + start + cols, mask=ok, other=0.0)
            t = tl.load(t_row + start + cols, mask=ok, other=0.0)
            c = s.to(tl.float32) * coef_s - c_max
            a = t.to(tl.float32) * coef_t - a_max
            q = tl.where(ok, tl.exp2(c), 0.0) * inv_z_c
            p = tl.where(ok, tl.exp2(a), 0.0) * inv_z_a
            acc += p * (a - c)
            if WRITE_GRAD:
                g = (q - p) * grad_scale
                tl.store(grad_ptr + row * n_cols + start + cols,
                         g.to(grad_ptr.dtype.element_ty), mask=ok)
        kl2 = tl.sum(acc, axis=0) + tl.log2(z_c) - tl.log2(z_a)  # KL in bits
        tl.store(loss_ptr + row, kl2 * (loss_scale * 0.6931471805599453))  # nats: * ln 2

    @triton.jit
    def _scale_rows_kernel(g_ptr, scale_ptr, n_cols, scale_stride, BLOCK: tl.constexpr):
        """``g[row] *= scale[row * scale_stride]`` in place, over a ``(rows, column blocks)``
        grid; a program whose scale is exactly 1 returns without touching memory."""
        row = tl.program_id(0).to(tl.int64)
        scale = tl.load(scale_ptr + row * scale_stride)
        if scale != 1.0:
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            ok = cols < n_cols
            ptrs = g_ptr + row * n_cols + cols
            g = tl.load(ptrs, mask=ok).to(tl.float32)
            tl.store(ptrs, (g * scale).to(g_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- launchers


class LaunchConfig(NamedTuple):
    online: bool  # two passes over column chunks (rows longer than the block limit)
    block_d: int  # columns per block: the padded row, or the chunk when online
    rows: int  # rows per tile (whole-row kernel)
    num_warps: int
    grid: int  # programs
    stages: int = 0  # whole-row kernel: 0, a tile per program; > 0, persistent programs
    #                  looping over the tiles with loads pipelined this deep


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _warps(elems: int) -> int:
    return min(MAX_WARPS, max(1, elems // (32 * ELEMS_PER_THREAD)))


def launch_config(n_rows: int, n_cols: int, block_limit: int = MAX_ROW_BLOCK,
                  chunk: int = ONLINE_CHUNK) -> LaunchConfig:
    """How ``[n_rows, n_cols]`` is cut into programs: several short rows per program (a
    tile of about ``ROW_TILE`` elements), one whole row per program up to ``block_limit``
    columns, and the two-pass online kernel with ``chunk``-wide steps beyond. ``num_warps``
    grows with the block so each thread holds ``ELEMS_PER_THREAD`` values per input."""
    if n_cols > block_limit:
        return LaunchConfig(True, chunk, 1, _warps(chunk), n_rows)
    block = max(MIN_BLOCK, _next_pow2(n_cols))
    rows = min(max(1, ROW_TILE // block), _next_pow2(n_rows))
    return LaunchConfig(False, block, rows, _warps(rows * block), -(-n_rows // rows))


def persistent(cfg: LaunchConfig, programs: int, stages: int) -> LaunchConfig:
    """``cfg`` (a whole-row setting) run by at most ``programs`` persistent programs that
    loop over its row tiles, their loads pipelined ``stages`` deep (``stages >= 1``)."""
    if cfg.online or programs < 1 or stages < 1:
        raise ValueError(f"persistent needs a whole-row setting, programs >= 1 and stages >= 1; "
                         f"got {cfg}, programs={programs}, stages={stages}")
    return cfg._replace(grid=min(cfg.grid, programs), stages=stages)


def _forward(student, teacher, tau_teacher, tau_student, reduction, compute_grad,
             config: LaunchConfig | None = None):
    """Launch the forward kernel: returns ``(loss, grad)`` with ``loss`` fp32 (``[]`` or
    ``[B]``) and ``grad = dloss/dstudent`` (``[B, D]``, contiguous, input dtype) when
    ``compute_grad``, else an empty tensor. ``config`` overrides :func:`launch_config`
    (benchmarks/tune_feature_kl.py sweeps it)."""
    n_rows, n_cols = student.shape
    s = student if student.stride(1) == 1 else student.contiguous()
    t = teacher if teacher.stride(1) == 1 else teacher.contiguous()
    per_row = torch.empty(n_rows, device=s.device, dtype=torch.float32)
    grad = torch.empty((n_rows, n_cols) if compute_grad else (0,), device=s.device,
                       dtype=s.dtype)
    loss_scale = 1.0 / n_rows if reduction == "batchmean" else 1.0
    scalars = (1.0 / tau_student * _LOG2E, 1.0 / tau_teacher * _LOG2E,
               loss_scale / tau_student, loss_scale)
    cfg = config or launch_config(n_rows, n_cols, MAX_ROW_BLOCK, ONLINE_CHUNK)
    grad_arg = grad if compute_grad else per_row  # never written when not compute_grad
    if cfg.online:
        _kl_online_kernel[(cfg.grid,)](
            s, t, grad_arg, per_row, n_cols, s.stride(0), t.stride(0), *scalars,
            CHUNK=cfg.block_d, WRITE_GRAD=compute_grad, num_warps=cfg.num_warps)
    else:
        _kl_rows_kernel[(cfg.grid,)](
            s, t, grad_arg, per_row, n_rows, n_cols, s.stride(0), t.stride(0), *scalars,
            ROWS=cfg.rows, BLOCK_D=cfg.block_d, WRITE_GRAD=compute_grad, STAGES=cfg.stages,
            num_warps=cfg.num_warps)
    loss = per_row if reduction == "none" else per_row.sum()  # batchmean's 1/B is applied
    return loss, grad


def _check_saved(grad: torch.Tensor) -> None:
    if grad.numel() == 0:
        raise RuntimeError("feature_kl: backward through a forward that ran without grad")


def _backward(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``dL/dstudent = grad * grad_output`` (per row for ``reduction="none"``), out of place:
    the form the compiled op's backward traces, which Inductor fuses into its consumer."""
    _check_saved(grad)
    scale = grad_loss[:, None] if reduction == "none" else grad_loss
    return grad * scale.to(grad.dtype)


def _scale_in_place(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``grad *= grad_output`` (per row for ``reduction="none"``) in place, and return it:
    the eager backward owns the saved gradient and hands it over. Gradients of at least
    ``INPLACE_KERNEL_MIN_BYTES`` go through :func:`_scale_rows_kernel`, which leaves rows
    whose scale is exactly 1 untouched (the ``1`` of ``loss.backward()``); smaller ones take
    one PyTorch multiply. Either way the decision is on the device: no host sync."""
    _check_saved(grad)
    n_rows, n_cols = grad.shape
    block = min(SCALE_BLOCK, max(MIN_BLOCK, _next_pow2(n_cols)))
    col_blocks = -(-n_cols // block)
    if (triton is None or grad.numel() * grad.element_size() < INPLACE_KERNEL_MIN_BYTES
            or col_blocks > 65535):  # the CUDA limit of a grid's second axis
        return grad.mul_(grad_loss[:, None] if reduction == "none" else grad_loss)
    scale = grad_loss.reshape(-1).float()  # [] -> [1]; [B] keeps its stride (0 if expanded)
    stride = scale.stride(0) if reduction == "none" else 0
    _scale_rows_kernel[(n_rows, col_blocks)](
        grad, scale, n_cols, stride, BLOCK=block, num_warps=_warps(block))
    return grad


# --------------------------------------------------------------------------- autograd


class _FeatureKLFunction(torch.autograd.Function):
    """Eager path: the forward kernel keeps the gradient; the first backward scales it in
    place and hands it over. A second backward through the same graph
    (``retain_graph=True``) finds it gone and runs the kernel again on the saved inputs."""

    @staticmethod
    def forward(ctx, student, teacher, tau_teacher, tau_student, reduction, compute_grad):
        loss, grad = _forward(student, teacher, tau_teacher, tau_student, reduction,
                              compute_grad)
        ctx.args = (tau_teacher, tau_student, reduction)
        ctx.grad = grad  # owned here, not a saved tensor: backward may write into it
        ctx.save_for_backward(student, teacher)  # read only by a second backward
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            student, teacher = ctx.saved_tensors
            _, grad = _forward(student, teacher, *ctx.args, True)
        grad = _scale_in_place(grad, grad_loss, ctx.args[2])
        return grad, None, None, None, None, None


if triton is not None:

    @torch.library.custom_op(
        "rcfd::feature_kl", mutates_args=(),
        schema="(Tensor student, Tensor teacher, float tau_teacher, float tau_student, "
               "str reduction, bool compute_grad) -> (Tensor, Tensor)")
    def _feature_kl_op(student, teacher, tau_teacher, tau_student, reduction, compute_grad):
        return _forward(student, teacher, tau_teacher, tau_student, reduction, compute_grad)

    @_feature_kl_op.register_fake
    def _(student, teacher, tau_teacher, tau_student, reduction, compute_grad):
        n_rows, n_cols = student.shape
        loss = student.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
        grad = student.new_empty((n_rows, n_cols) if compute_grad else (0,))
        return loss, grad

    def _setup_context(ctx, inputs, output):
        ctx.reduction = inputs[4]
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _op_backward(ctx, grad_loss, _unused):
        (grad,) = ctx.saved_tensors
        return _backward(grad, grad_loss, ctx.reduction), None, None, None, None, None

    _feature_kl_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point


def feature_kl_triton(student, teacher, tau_teacher=0.9, tau_student=1.0,
                      reduction="batchmean") -> torch.Tensor:
    """The Triton KL: same contract as :func:`feature_kl_reference` for fp32 / fp16 / bf16
    inputs (arithmetic in fp32, loss fp32), differentiable once in ``student``. Under
    torch.compile it is the opaque op ``torch.ops.rcfd.feature_kl``."""
    if triton is None:
        raise RuntimeError("feature_kl_triton needs Triton; use feature_kl_reference")
    check_inputs(student, teacher, tau_teacher, tau_student, reduction)
    if student.dtype == torch.float64:
        raise TypeError("feature_kl_triton computes in fp32; float64 inputs take "
                        "feature_kl_reference (rcfd.core.ops.feature_kl does this)")
    teacher = teacher.detach()
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    args = (float(tau_teacher), float(tau_student), reduction, compute_grad)
    if torch.compiler.is_compiling():
        return _feature_kl_op(student, teacher, *args)[0]
    return _FeatureKLFunction.apply(student, teacher, *args)
