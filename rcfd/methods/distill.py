"""Halving rounds, the skeleton every distillation method shares (METHOD.md, "Progressive
distillation target"): teacher ``(T, time_scale)`` -> student ``(T/2, 2 time_scale)``, each
student initialised from its teacher, round ``k``'s student round ``k+1``'s teacher, every
round writing ``run_dir/<stage>/T<student T>.safetensors``. A method supplies its objective (a loss
object of :mod:`rcfd.losses`) and :func:`distill_rounds` does the rest.

Teachers. ``teacher`` (any method's) names a diffusion checkpoint or a diffusers model
folder instead of the run's own model; a diffusers teacher runs on its own schedule and
time grid (:mod:`rcfd.interop.diffusers_load`: ``G = 1024`` indices, so its first round's
teacher is the ``(T, 1024 / T)`` sampler for the ``T`` the method asks, e.g.
``pd.teacher_T``). Students record their teacher's schedule. A student predicts
``student_prediction`` (``None``: its teacher's, except that an eps teacher's students
predict v: an eps student at one step divides by ``alpha ~ 0``, PD's paper, section 4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rcfd.io.checkpoint import DiffusionInfo, load_diffusion_checkpoint, save_diffusion_checkpoint
from rcfd.config import Decay, NonNegInt, PosFloat, PosInt, Pow2, Section, is_pow2
from rcfd.interop.diffusers_load import DEFAULT_GRID, is_diffusers_folder, read_diffusers_config
from rcfd.core.schedule import describe_schedule, schedule_of
from rcfd.core.unet import UNet
from rcfd.errors import CheckpointError, UsageError
from rcfd.methods.common import (
    TrainOptions,
    check_images_fit,
    data_batches,
    data_identity,
    data_spec_dict,
    grid_sampler,
    load_train,
    train_unit,
)
from rcfd.training.fast_step import ObjectiveStep
from rcfd.training.loop import Job
from rcfd.training.optim import OptimSpec
from rcfd.training.rundir import RunContext
from rcfd.training.state import stage_seed


class DistillConfig(Section):
    """Fields every distillation method shares: rounds halve ``T`` down to ``final_T``; a
    round whose student has ``T <= long_round_max_T`` trains ``long_round_steps``, the others
    ``steps_per_round``; Adam at ``lr``, cosine-annealed to 0 (or constant), no EMA by
    default, the student's dropout set to ``dropout``, the data flipped when ``flip``.
    ``teacher``: a diffusion checkpoint or diffusers folder to start from (``None``: the
    run's own); ``student_prediction``: what the students predict (module docstring)."""

    teacher: str | None = None
    student_prediction: Literal["x0", "v"] | None = None

    final_T: Pow2 = 1
    steps_per_round: PosInt = 10_000
    long_round_steps: PosInt = 20_000
    long_round_max_T: NonNegInt = 2
    lr: PosFloat = 5e-5
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup: NonNegInt = 0
    batch_size: PosInt = 128
    grad_clip: PosFloat | None = 1.0
    ema_decay: Decay | None = None
    dropout: Decay = 0.0
    flip: bool = True
    sample_interval: PosInt = 5_000
    num_sample_images: NonNegInt = 64
    checkpoint_interval: PosInt = 5_000
    log_interval: PosInt = 10
    options: TrainOptions = TrainOptions()

    def round_steps(self, student_T: int) -> int:
        """Training steps of the round whose student takes ``student_T`` steps."""
        return self.long_round_steps if student_T <= self.long_round_max_T else self.steps_per_round


def halving_rounds(teacher_T: int, final_T: int) -> list[tuple[int, int]]:
    """``[(teacher_T, student_T), ...]`` halving from ``teacher_T`` down to ``final_T``."""
    if not (is_pow2(teacher_T) and is_pow2(final_T)) or final_T > teacher_T:
        raise ValueError(f"rounds need powers of two with final_T <= teacher_T; got "
                         f"teacher_T={teacher_T}, final_T={final_T}")
    out, t = [], teacher_T
    while t > final_T:
        out.append((t, t // 2))
        t //= 2
    return out


def load_teacher(path: Path | str, device, T: int | None = None) -> tuple[nn.Module, DiffusionInfo]:
    """A frozen teacher (eval mode, no parameter grads; its EMA weights when it has them);
    ``T``: the sampler a diffusers folder runs as (a power of two up to its grid; ``None``:
    the grid's), and what a checkpoint must be (``None``: whatever it is)."""
    if not Path(path).exists():
        raise UsageError(f"the teacher {path} does not exist; give a diffusion checkpoint or "
                         "a diffusers model folder")
    model, info = load_diffusion_checkpoint(path, device, diffusers_T=T)
    if T is not None and info.T != T:
        raise UsageError(f"the teacher {path} is a T={info.T} sampler, not T={T}; give the "
                         f"checkpoint of a T={T} sampler (only a diffusers folder runs as any T)")
    return model.eval().requires_grad_(False), info


def student_prediction(asked: str | None, teacher_prediction: str) -> str:
    """What a teacher's students predict: ``asked``, or (``None``) the teacher's own, except
    ``"v"`` for an eps teacher (module docstring)."""
    if asked is not None:
        return asked
    return "v" if teacher_prediction == "eps" else teacher_prediction


def teacher_T_of(path: Path | str, T: int | None = None) -> int:
    """The ``T`` of the first round's teacher at ``path`` (for plans and rows, before any
    training): ``T`` when given, a diffusers folder's grid, else the checkpoint's own."""
    if T is not None:
        return T
    if is_diffusers_folder(path):
        return DEFAULT_GRID
    return load_diffusion_checkpoint(path, "cpu")[1].T


def describe_teacher(path: Path | str, T: int | None = None, asked: str | None = None) -> str:
    """One line saying what a ``teacher`` resolves to (kind, ``T``, prediction, schedule),
    from its configs alone for a diffusers folder; for ``--dry-run``."""
    if is_diffusers_folder(path):
        parts = read_diffusers_config(path, T=T)
        kind, T, ts, pred, spec = ("diffusers folder", parts["T"], parts["time_scale"],
                                   parts["prediction"], parts["schedule"])
    else:
        info = load_diffusion_checkpoint(path, "cpu")[1]
        kind, T, ts, pred, spec = (f"{info.source} checkpoint", info.T, info.time_scale,
                                   info.prediction, info.noise_schedule)
    return (f"teacher {path}: {kind}, T={T} (time_scale {ts}), prediction {pred} -> students "
            f"{student_prediction(asked, pred)}, schedule {describe_schedule(spec)}")


def check_halving(info: DiffusionInfo, final_T: int, source) -> list[tuple[int, int]]:
    """The rounds ``[(T, T/2), ..., (2 final_T, final_T)]`` from a teacher, with clear
    errors when its ``T`` cannot halve down to ``final_T``."""
    if info.T & (info.T - 1) or info.T <= final_T:
        raise UsageError(f"{source} is a T={info.T} sampler; distillation halves T each round "
                         f"down to final_T={final_T}, so the teacher's T must be a power of two "
                         f"above {final_T}")
    return halving_rounds(info.T, final_T)


def student_from(teacher: nn.Module, info: DiffusionInfo, dropout: float) -> UNet:
    """A student initialised from ``teacher`` (a round's, or any method's that starts from
    its teacher): a new :class:`~rcfd.core.unet.UNet` of the teacher's architecture
    (``info.config``) with ``dropout``, holding a copy of the teacher's weights (the
    teacher is left as it is). A teacher whose architecture is not ours fails to load."""
    student = UNet(info.config.replace(dropout=dropout))
    student.load_state_dict(teacher.state_dict())
    return student


def distill_rounds(cfg: DistillConfig, stage: str, teacher_path: Path | str, data,
                   run: RunContext, make_objective: Callable,
                   extra_info: dict | None = None, first_T: int | None = None) -> list[Path]:
    """Run the halving rounds of ``cfg`` from ``teacher_path`` (run as a ``first_T``
    sampler: :func:`load_teacher`). ``make_objective(teacher, schedule, teacher_T,
    time_scale, prediction, student_prediction)`` builds a round's loss object (with
    ``draw`` and ``__call__(student, x0, t, noise)``, as :class:`rcfd.losses.PDLoss`)."""
    device = run.torch_device
    dataset = load_train(data)
    identity = data_identity(data, dataset)
    teacher, info = load_teacher(teacher_path, device, first_T)
    check_images_fit(info.config, dataset, f"the teacher {teacher_path}")
    rounds = check_halving(info, cfg.final_T, teacher_path)
    schedule = schedule_of(info)  # T * time_scale is the same every round
    time_scale, source, paths = info.time_scale, str(teacher_path), []
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    o = cfg.options
    for teacher_T, student_T in rounds:
        unit, student_ts = f"T{student_T}", 2 * time_scale

        def make_job():
            nonlocal teacher
            if o.channels_last and device.type == "cuda":
                teacher = teacher.to(memory_format=torch.channels_last)
            prediction = student_prediction(cfg.student_prediction, info.prediction)
            objective = make_objective(teacher, schedule, teacher_T, time_scale, info.prediction,
                                       prediction)

            def finalize(net, ema_net, extra, path, T=student_T, ts2=student_ts, src=source,
                         prediction=prediction):
                return save_diffusion_checkpoint(
                    path, net, T=T, time_scale=ts2, prediction=prediction, ema_model=ema_net,
                    noise_schedule=info.noise_schedule,
                    extra={"stage": stage, "finished": True, "teacher": src, "steps": extra["steps"],
                           "skipped_steps": extra["skipped_steps"], "config": cfg.to_dict(),
                           "data": data_spec_dict(identity), **(extra_info or {})})

            job = Job(stage=stage, unit=unit, model=student_from(teacher, info, cfg.dropout),
                      loss_fn=ObjectiveStep(objective), data=identity,
                      batches=data_batches(dataset, cfg.batch_size, run, stage, unit, flip=cfg.flip),
                      steps=cfg.round_steps(student_T), config=cfg.to_dict(), finalize=finalize,
                      optim=OptimSpec("adam", cfg.lr, cfg.lr_schedule, warmup=cfg.warmup,
                                      fused=o.fused),
                      ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                      log_interval=cfg.log_interval, checkpoint_interval=cfg.checkpoint_interval,
                      sample_fn=grid_sampler(schedule, student_T, student_ts, student_T,
                                             cfg.num_sample_images, shape,
                                             stage_seed(run.seed, stage, "grid"), device,
                                             prediction),
                      sample_interval=cfg.sample_interval, bf16=o.bf16,
                      channels_last=o.channels_last, compile=o.compile)
            return job

        path = train_unit(run, stage, unit, make_job)
        teacher, new = load_teacher(path, device)
        if (new.T, new.time_scale) != (student_T, student_ts):
            raise CheckpointError(f"{path} is a (T={new.T}, time_scale={new.time_scale}) sampler, "
                                  f"not the (T={student_T}, time_scale={student_ts}) student of "
                                  "this round; delete it or pass --overwrite")
        info, time_scale, source = new, new.time_scale, str(path)
        paths.append(path)
    return paths
