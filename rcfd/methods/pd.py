"""Progressive distillation (METHOD.md, "Progressive distillation target"): halving rounds
from the base model down to ``final_T`` steps, each round trained on
:class:`rcfd.losses.PDLoss` (Adam cosine-annealed to 0, no EMA, no dropout by default).

This module is the shape of every method: its config section, its objective, its ``train``,
what it reads of other sections (``READS``: the base model's ``T``), what it needs (the base
model) and what it produces (students at ``T = base.T / 2 ... final_T`` steps, evaluated at
``eval.steps``), as one :class:`rcfd.methods.registry.Method`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from rcfd.config import Pow2
from rcfd.losses import PDLoss
from rcfd.methods.common import require
from rcfd.methods.distill import (
    DistillConfig,
    describe_teacher,
    distill_rounds,
    halving_rounds,
    teacher_T_of,
)
from rcfd.methods.registry import Method, Row
from rcfd.training.rundir import RunContext, checkpoint_path

STAGE = "pd"


class PDStageConfig(DistillConfig):
    """Progressive distillation (METHOD.md): rounds teacher ``(T, time_scale)`` -> student
    ``(T/2, 2 time_scale)`` from the base model's ``T`` (or ``teacher``'s) down to
    ``final_T``, on the ``loss`` denoising loss against the two-step teacher target.
    ``teacher_T``: the first round's teacher ``T`` (``None``: the teacher's own; a diffusers
    ``teacher`` runs as any power of two up to its grid of 1024, e.g. 64)."""

    loss: Literal["both", "x", "eps"] = "both"
    teacher_T: Pow2 | None = None


def train_pd(cfg: PDStageConfig, teacher: Path, data, run: RunContext) -> list[Path]:
    """Progressive distillation from ``teacher`` (``base/model.safetensors``, or any diffusion
    checkpoint of ours or the reference's) down to ``cfg.final_T`` steps. Returns
    ``[run_dir/pd/T<T/2>.safetensors, ..., run_dir/pd/T<final_T>.safetensors]``."""

    def objective(teacher_net, schedule, teacher_T, time_scale, prediction, student):
        return PDLoss(teacher_net, schedule, teacher_T, time_scale, cfg.loss, prediction, student)

    return distill_rounds(cfg, STAGE, teacher, data, run, objective, first_T=cfg.teacher_T)


def teacher_path(cfg: PDStageConfig, run_dir: Path) -> Path:
    """The checkpoint PD starts from: ``cfg.teacher`` or the run's base model."""
    return Path(cfg.teacher) if cfg.teacher else checkpoint_path(run_dir, "base", "model")


def first_T(view) -> int:
    """The first round's teacher ``T``: ``pd.teacher_T``, else the teacher's (``base.T``)."""
    if view.pd.teacher is None:
        return view.pd.teacher_T or view.teacher_T
    return teacher_T_of(view.pd.teacher, view.pd.teacher_T)


READS = {"teacher_T": "base.T"}  # the base model's T: PD's first teacher


def _rows(view) -> list[Row]:
    made = {s for _, s in halving_rounds(first_T(view), view.pd.final_T)}
    return [Row(STAGE, "PD", s, STAGE, f"T{s}") for s in sorted(view.eval_steps) if s in made]


def _describe(view) -> str:
    T = first_T(view)
    rounds = halving_rounds(T, view.pd.final_T)
    steps = sum(view.pd.round_steps(s) for _, s in rounds)
    line = f"{T} -> {view.pd.final_T}: {len(rounds)} rounds, {steps} steps"
    if view.pd.teacher is not None:
        line += "; " + describe_teacher(view.pd.teacher, view.pd.teacher_T,
                                        view.pd.student_prediction)
    return line


def _check(view) -> None:
    T = first_T(view) if view.pd.teacher is None else view.pd.teacher_T
    if T is not None and view.pd.final_T >= T:
        what = "pd.teacher_T" if view.pd.teacher_T else "base.T"
        raise ValueError(f"pd.final_T={view.pd.final_T} must be below {what}={T}")
    if view.pd.teacher is None and view.pd.teacher_T not in (None, view.teacher_T):
        raise ValueError(f"pd.teacher_T={view.pd.teacher_T} applies to a pd.teacher (a "
                         f"diffusers folder); the base model is a T={view.teacher_T} sampler")


METHOD = Method(
    name=STAGE, sections={"pd": (PDStageConfig, PDStageConfig)}, reads=READS,
    train=lambda view, run: train_pd(
        view.pd, Path(view.pd.teacher) if view.pd.teacher else require(run.run_dir, "base", "model"),
        view.data, run),
    describe=_describe, rows=_rows, needs=("base",), check=_check,
    inputs=lambda view, run_dir: [teacher_path(view.pd, run_dir)],
    help="progressive distillation rounds from the base model")
