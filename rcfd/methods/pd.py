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

from rcfd.losses import PDLoss
from rcfd.methods.common import require
from rcfd.methods.distill import DistillConfig, distill_rounds, halving_rounds
from rcfd.methods.registry import Method, Row
from rcfd.training.rundir import RunContext, checkpoint_path

STAGE = "pd"


class PDStageConfig(DistillConfig):
    """Progressive distillation (METHOD.md): rounds teacher ``(T, time_scale)`` -> student
    ``(T/2, 2 time_scale)`` from the base model's ``T`` down to ``final_T``, on the ``loss``
    denoising loss against the two-step teacher target."""

    loss: Literal["both", "x", "eps"] = "both"


def train_pd(cfg: PDStageConfig, teacher: Path, data, run: RunContext) -> list[Path]:
    """Progressive distillation from ``teacher`` (``base/model.safetensors``, or any diffusion
    checkpoint of ours or the reference's) down to ``cfg.final_T`` steps. Returns
    ``[run_dir/pd/T<T/2>.safetensors, ..., run_dir/pd/T<final_T>.safetensors]``."""

    def objective(teacher_net, schedule, teacher_T, time_scale, prediction):
        return PDLoss(teacher_net, schedule, teacher_T, time_scale, cfg.loss, prediction)

    return distill_rounds(cfg, STAGE, teacher, data, run, objective)


READS = {"teacher_T": "base.T"}  # the base model's T: PD's first teacher


def _rows(view) -> list[Row]:
    made = {s for _, s in halving_rounds(view.teacher_T, view.pd.final_T)}
    return [Row(STAGE, "PD", s, STAGE, f"T{s}") for s in sorted(view.eval_steps) if s in made]


def _describe(view) -> str:
    rounds = halving_rounds(view.teacher_T, view.pd.final_T)
    steps = sum(view.pd.round_steps(s) for _, s in rounds)
    return f"{view.teacher_T} -> {view.pd.final_T}: {len(rounds)} rounds, {steps} steps"


def _check(view) -> None:
    if view.pd.final_T >= view.teacher_T:
        raise ValueError(f"pd.final_T={view.pd.final_T} must be below base.T={view.teacher_T}")


METHOD = Method(
    name=STAGE, sections={"pd": (PDStageConfig, PDStageConfig)}, reads=READS,
    train=lambda view, run: train_pd(view.pd, require(run.run_dir, "base", "model"), view.data,
                                     run),
    describe=_describe, rows=_rows, needs=("base",), check=_check,
    inputs=lambda view, run_dir: [checkpoint_path(run_dir, "base", "model")],
    help="progressive distillation rounds from the base model")
