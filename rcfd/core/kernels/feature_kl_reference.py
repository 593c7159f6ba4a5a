"""The temperature-softmax KL of classifier-based feature distillation written in PyTorch
(METHOD.md, "L_CFD"): the argument checks every implementation shares and the reference
that defines what the Triton kernels of :mod:`rcfd.core.kernels.feature_kl` compute."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("batchmean", "sum", "none")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- checks


def _check_tau(name: str, tau) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"feature_kl: {name} must be a positive Python float, got {tau!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"feature_kl: {name} must be finite and > 0, got {tau}")


def check_inputs(student, teacher, tau_teacher, tau_student, reduction) -> None:
    """Raise a TypeError / ValueError naming the argument when the inputs are not two
    ``[B, D]`` float tensors of one dtype and device with ``B, D >= 1``, positive finite
    temperatures and a known reduction. Reads no tensor values (no host sync)."""
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"feature_kl: {name} must be a tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise TypeError(
                f"feature_kl: {name} must be a float32, float16, bfloat16 or float64 tensor, "
                f"got {x.dtype}"
            )
        if x.dim() != 2:
            raise ValueError(
                f"feature_kl: {name} must be a [B, D] tensor of features, got shape "
                f"{tuple(x.shape)}; flatten the feature dimensions with .flatten(1)"
            )
    if student.shape != teacher.shape:
        raise ValueError(
            f"feature_kl: teacher has shape {tuple(teacher.shape)} but student has "
            f"{tuple(student.shape)}; they must match"
        )
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError(
            f"feature_kl: the inputs must have at least one row and one column, got "
            f"{tuple(student.shape)}"
        )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"feature_kl: teacher is {teacher.dtype} but student is {student.dtype}; cast "
            "the teacher with teacher.to(student.dtype)"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"feature_kl: teacher is on {teacher.device} but student is on {student.device}"
        )
    _check_tau("tau_teacher", tau_teacher)
    _check_tau("tau_student", tau_student)
    if reduction not in REDUCTIONS:
        hint = " ('mean' averages over B*D elements, which is not the KL)" * (reduction == "mean")
        raise ValueError(
            f"feature_kl: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got "
            f"{reduction!r}{hint}"
        )


# --------------------------------------------------------------------------- reference


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / rows.shape[0] if reduction == "batchmean" else total


def feature_kl_reference(student, teacher, tau_teacher=0.9, tau_student=1.0,
                         reduction="batchmean") -> torch.Tensor:
    """``KL(softmax(teacher / tau_T) || softmax(student / tau_S))`` per row, reduced
    (METHOD.md, "L_CFD"), in the log-softmax form. Arithmetic and the result are fp32
    (float64 for float64 inputs); the teacher is detached, the gradient reaches the
    student in its own dtype."""
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student.to(compute) / tau_student, dim=1)
    log_p = F.log_softmax(teacher.detach().to(compute) / tau_teacher, dim=1)
    rows = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return _reduce(rows, reduction)
