"""Where a run keeps its files, and how a stage finds out what is already there.

Run directory layout (``run_dir``; ``<unit>`` is one resumable training job)::

    classifier/distill.safetensors  classifier/eval.safetensors    classifiers (by role)
    base/model.safetensors                          base model: weights + EMA
    pd/T<k>.safetensors  (T512 ... T1)              PD students, one per round
    rcfd/T<k>.safetensors (T4, T2, T1)              RCFD students, one per round
    <stage>/<unit>.train.pt                         resumable training state (while unfinished)
    <stage>/<unit>.jsonl                            metrics: one line per logged step
    tensorboard/<stage>/<unit>/                     the same metrics as TensorBoard events
    <stage>/<unit>_step<N>.png                      sample grids (diffusion stages)

A finished unit's checkpoint is written once, when its training finished, as safetensors
(:func:`rcfd.io.modelfile.save_model_checkpoint`); it is what later stages and the report
read (:func:`checkpoint_path`). Run directories of earlier versions hold ``<unit>.pt``
instead: :func:`checkpoint_path` finds it, so they resume and evaluate as they are. The
``.train.pt`` state (``torch.save``, loaded with ``weights_only=True``) is what
:func:`rcfd.training.loop.run_job` resumes from.

Only rank 0 writes. :class:`RunContext` says where and how a stage runs; :func:`unit_done`
decides whether a unit is skipped (resumed), trained again (overwritten) or refused.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcfd import distributed as dist
from rcfd.io.files import temp_file_pattern
from rcfd.io.modelfile import MODEL_SUFFIX
from rcfd.errors import StageExistsError


@dataclass
class RunContext:
    """Where and how a stage runs. ``resume``: continue unfinished units from their state
    and skip finished ones; ``overwrite``: train finished/unfinished units again from
    scratch (exclusive with ``resume``). ``skip_nonfinite``: skip up to that many steps
    whose loss is not finite (per unit) before failing. ``stop_after``: stop (checkpoint +
    :class:`Interrupted`) after this many steps of this call, e.g. to time-box a job.
    ``dist``: from :func:`rcfd.distributed.init_distributed`."""

    run_dir: Path
    device: str | torch.device = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    skip_nonfinite: int = 0
    progress: bool = True
    dist: dist.DistInfo = field(default_factory=dist.DistInfo)
    stop_after: int | None = None
    handle_signals: bool = True

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume keeps the run "
                             "directory's stages, overwrite trains them again")
        if not isinstance(self.skip_nonfinite, int) or self.skip_nonfinite < 0:
            raise ValueError(f"skip_nonfinite must be an integer >= 0, got {self.skip_nonfinite!r}")

    @property
    def torch_device(self) -> torch.device:
        return dist.resolve_device(self.device, self.dist)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


CHECKPOINT_SUFFIX = MODEL_SUFFIX  # ".safetensors"
LEGACY_SUFFIX = ".pt"  # finished checkpoints of earlier versions (torch.save)


def new_checkpoint_path(run_dir: Path | str, stage: str, unit: str) -> Path:
    """``run_dir/<stage>/<unit>.safetensors``, where a unit's checkpoint is written: e.g.
    ``("base", "model")``, ``("pd", "T8")``, ``("rcfd", "T1")``, ``("classifier", "distill")``."""
    return Path(run_dir) / stage / f"{unit}{CHECKPOINT_SUFFIX}"


def legacy_checkpoint_path(run_dir: Path | str, stage: str, unit: str) -> Path:
    """``run_dir/<stage>/<unit>.pt``: where earlier versions wrote a finished unit."""
    return Path(run_dir) / stage / f"{unit}{LEGACY_SUFFIX}"


def checkpoint_path(run_dir: Path | str, stage: str, unit: str) -> Path:
    """The checkpoint of ``stage/unit``: :func:`new_checkpoint_path` unless only an
    earlier version's ``<unit>.pt`` exists, which is then returned (it loads as it is)."""
    new = new_checkpoint_path(run_dir, stage, unit)
    legacy = legacy_checkpoint_path(run_dir, stage, unit)
    return legacy if not new.exists() and legacy.exists() else new


def state_path(run_dir: Path | str, stage: str, unit: str) -> Path:
    return Path(run_dir) / stage / f"{unit}.train.pt"


def metrics_path(run_dir: Path | str, stage: str, unit: str) -> Path:
    return Path(run_dir) / stage / f"{unit}.jsonl"


def tensorboard_dir(run_dir: Path | str, stage: str, unit: str) -> Path:
    return Path(run_dir) / "tensorboard" / stage / unit


def unit_files(run_dir: Path, stage: str, unit: str) -> list[Path]:
    """Every file a unit leaves: its checkpoint, state, metrics, sample grids and the
    temporary files of interrupted writes."""
    d = Path(run_dir) / stage
    fixed = [new_checkpoint_path(run_dir, stage, unit),
             legacy_checkpoint_path(run_dir, stage, unit),
             state_path(run_dir, stage, unit), metrics_path(run_dir, stage, unit)]
    if not d.is_dir():
        return fixed
    temps = [p for f in fixed for p in d.iterdir() if temp_file_pattern(f).fullmatch(p.name)]
    return fixed + sorted(d.glob(f"{unit}_step*.png")) + temps


def unit_done(run: RunContext, stage: str, unit: str) -> bool:
    """Whether ``stage/unit`` is finished and should be skipped (``resume``); raises
    :class:`StageExistsError` when it exists (finished or started) and neither resume nor
    overwrite was asked; with ``overwrite``, deletes it (rank 0) and returns False."""
    final, state = checkpoint_path(run.run_dir, stage, unit), state_path(run.run_dir, stage, unit)
    if not (final.exists() or state.exists()):
        return False
    if run.overwrite:
        if run.is_main:
            for p in unit_files(run.run_dir, stage, unit):
                p.unlink(missing_ok=True)
            shutil.rmtree(tensorboard_dir(run.run_dir, stage, unit), ignore_errors=True)
        dist.barrier()
        return False
    if run.resume:
        return final.exists()
    what = (f"a finished {stage} stage ({final})" if final.exists()
            else f"an unfinished {stage} stage ({state})")
    raise StageExistsError(f"{run.run_dir} already holds {what}. Pass resume=True "
                           "(--resume) to keep it and continue, or overwrite=True "
                           "(--overwrite) to train it again from scratch")
