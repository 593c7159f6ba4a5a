"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) from the
base model (or ``cd.teacher``): one unit ``cd/model`` trained on
:class:`rcfd.methods.cd_loss.CDLoss`, the student initialised from the teacher
(:func:`rcfd.methods.distill.student_from`), its target network an EMA of the student
(decay ``mu``) kept as the job's own state (``Job.state``, restored exactly on resume) and
updated in ``after_step`` (:func:`rcfd.training.ema.ema_update_`).

The student is our U-Net on the teacher's ``(T, time_scale)`` with the teacher's
``prediction``; the consistency parameterisation (:mod:`rcfd.core.consistency`) lives in the
loss and in the ``"consistency"`` sampler (:mod:`rcfd.samplers.consistency`), and the
checkpoint records it in ``extra["consistency"]``. Rows ``"CD"`` at ``eval.steps`` within
``cd.eval_steps`` (1 and 2 by default), sampled with that sampler, compared with PD by seed
in studies. Off unless configured (the ``smoke``, ``digits`` and ``cifar10-paper`` presets
configure it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from rcfd.config import Decay, Int, NonNegInt, PosFloat, PosInt, Section
from rcfd.core.consistency import DISTANCES, SIGMA_DATA, adaptive_mu, adaptive_N
from rcfd.core.schedule import schedule_of
from rcfd.io.checkpoint import save_diffusion_checkpoint
from rcfd.methods import common
from rcfd.methods.cd_loss import SOLVERS, CDLoss, CDStep
from rcfd.methods.common import (
    TrainOptions,
    check_images_fit,
    data_batches,
    data_identity,
    data_spec_dict,
    load_train,
    require,
    train_unit,
)
from rcfd.methods.distill import describe_teacher, load_teacher, student_from, student_prediction
from rcfd.methods.registry import Method, Row
from rcfd.training.ema import ema_update_
from rcfd.training.fast_step import ObjectiveStep
from rcfd.training.loop import Job
from rcfd.training.optim import OptimSpec
from rcfd.training.rundir import RunContext, checkpoint_path
from rcfd.training.state import stage_seed

STAGE, UNIT = "cd", "model"


class CDStageConfig(Section):
    """Consistency distillation (module docstring): ``N`` points of the teacher's index grid,
    the target network's EMA decay ``mu``, the ``distance`` (``"l2"`` or ``"pseudo-huber"``;
    LPIPS is not available: its weights are not part of the package), the teacher's ODE step
    ``solver`` (``"ddim"``: one call; ``"heun"``: EDM's second-order step, two calls; see
    :func:`rcfd.methods.cd_loss.teacher_step`), ``steps`` of Adam at
    ``lr``; ``schedule``: ``"fixed"`` (``N`` and ``mu`` throughout) or ``"adaptive"``
    (the paper's ``N(k)``, ``mu(k)`` from ``s0``, ``s1``, ``mu0``: see
    :func:`rcfd.core.consistency.adaptive_N`; ``s1=None`` is ``N - 1``, so the grid ends at
    ``N`` points; ``mu`` is then unused); ``teacher``: a diffusion checkpoint or a diffusers
    model folder (``None``: the run's base model); ``student_prediction``: what the
    student predicts (``None``: the teacher's, v for an eps teacher);
    ``eval_steps``: the step counts the ``CD`` rows may take (those in ``eval.steps``);
    ``num_sample_images`` one-step consistency samples every ``sample_interval`` steps and
    at the end, as a grid ``cd/model_step<N>.png`` (0: none)."""

    teacher: str | None = None
    student_prediction: Literal["x0", "v"] | None = None
    N: Annotated[Int, Field(ge=2)] = 18
    mu: Decay = 0.95
    distance: Literal[DISTANCES] = "l2"  # type: ignore[valid-type]
    solver: Literal[SOLVERS] = "ddim"  # type: ignore[valid-type]
    schedule: Literal["fixed", "adaptive"] = "fixed"
    s0: Annotated[Int, Field(ge=2)] = 2
    s1: PosInt | None = None
    mu0: Decay = 0.9
    steps: PosInt = 10_000
    batch_size: PosInt = 128
    flip: bool = True
    lr: PosFloat = 4e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup: NonNegInt = 0
    grad_clip: PosFloat | None = 1.0
    dropout: Decay = 0.0
    ema_decay: Decay | None = None
    eval_steps: tuple[PosInt, ...] = (1, 2)
    checkpoint_interval: PosInt = 1_000
    log_interval: PosInt = 10
    sample_interval: PosInt = 5_000
    num_sample_images: NonNegInt = 64
    options: TrainOptions = TrainOptions()


def teacher_path(cfg: CDStageConfig, run_dir: Path) -> Path:
    """The checkpoint CD distills: ``cfg.teacher`` or the run's base model."""
    return Path(cfg.teacher) if cfg.teacher else checkpoint_path(run_dir, "base", "model")


def N_max(cfg: CDStageConfig) -> int:
    """The most grid points training uses: ``N``, or the adaptive schedule's ``s1 + 1``."""
    if cfg.schedule == "fixed":
        return cfg.N
    return (cfg.N - 1 if cfg.s1 is None else cfg.s1) + 1


def step_schedule(cfg: CDStageConfig):
    """``(N_at(k), mu_after(steps_done))`` of the adaptive schedule (module
    :mod:`rcfd.core.consistency`): the grid of step ``k`` (0-based) and the target decay
    after it, which uses that step's ``N``."""
    s1 = N_max(cfg) - 1

    def N_at(k: int) -> int:
        return adaptive_N(k, cfg.steps, cfg.s0, s1)

    def mu_after(steps_done: int) -> float:
        return adaptive_mu(N_at(steps_done - 1), cfg.s0, cfg.mu0)
    return N_at, mu_after


def make_cd_job(cfg: CDStageConfig, source: Path, data, run: RunContext) -> Job:
    """The unit's :class:`~rcfd.training.loop.Job`: the student and its frozen target
    network from the teacher at ``source``, the CD objective, the target's EMA update."""
    device = run.torch_device
    dataset = load_train(data)
    identity = data_identity(data, dataset)
    teacher, info = load_teacher(source, device)
    check_images_fit(info.config, dataset, f"the teacher {source}")
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    target = student_from(teacher, info, 0.0).to(device).eval().requires_grad_(False)
    o = cfg.options
    if o.channels_last and device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
        target = target.to(memory_format=torch.channels_last)
    schedule = schedule_of(info)
    prediction = student_prediction(cfg.student_prediction, info.prediction)
    objective = CDLoss(teacher, target, schedule, info.T, info.time_scale, N_max(cfg),
                       cfg.distance, info.prediction, solver=cfg.solver,
                       student_prediction=prediction)
    step = ObjectiveStep(objective)
    mu_after = lambda steps_done: cfg.mu  # noqa: E731
    if cfg.schedule == "adaptive":
        N_at, mu_after = step_schedule(cfg)
        step = CDStep(objective, N_at)

    def after_step(steps_done, student):
        ema_update_(target, student, mu_after(steps_done))

    def finalize(net, ema_net, extra, path):
        return save_diffusion_checkpoint(
            path, net, T=info.T, time_scale=info.time_scale, prediction=prediction,
            ema_model=ema_net, noise_schedule=info.noise_schedule,
            extra={"stage": STAGE, "finished": True, "teacher": str(source),
                   "steps": extra["steps"], "skipped_steps": extra["skipped_steps"],
                   "config": cfg.to_dict(), "data": data_spec_dict(identity),
                   "consistency": {"sigma_data": SIGMA_DATA, "sampler": "consistency"}})

    return Job(stage=STAGE, unit=UNIT, model=student_from(teacher, info, cfg.dropout),
               loss_fn=step, data=identity,
               batches=data_batches(dataset, cfg.batch_size, run, STAGE, UNIT, flip=cfg.flip),
               steps=cfg.steps, config=cfg.to_dict(), finalize=finalize,
               optim=OptimSpec("adam", cfg.lr, cfg.lr_schedule, warmup=cfg.warmup, fused=o.fused),
               ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip, log_interval=cfg.log_interval,
               checkpoint_interval=cfg.checkpoint_interval, bf16=o.bf16,
               sample_fn=common.grid_sampler(schedule, info.T, info.time_scale, 1,
                                             cfg.num_sample_images, shape,
                                             stage_seed(run.seed, STAGE, "grid"), device,
                                             prediction, sampler="consistency"),
               sample_interval=cfg.sample_interval,
               channels_last=o.channels_last, compile=o.compile,
               state={"target": target}, after_step=after_step)


def train_cd(cfg: CDStageConfig, data, run: RunContext) -> list[Path]:
    """Train (or reuse, when finished) ``<run_dir>/cd/model.safetensors``; returns
    ``[its path]``."""
    source = Path(cfg.teacher) if cfg.teacher else require(run.run_dir, "base", "model")
    return [train_unit(run, STAGE, UNIT, lambda: make_cd_job(cfg, source, data, run))]


READS = {"teacher_T": "base.T"}  # the base model's T: the default teacher's grid


def _rows(view) -> list[Row]:
    cfg = view.cd
    T = view.teacher_T if cfg.teacher is None else None
    return [Row(STAGE, "CD", s, STAGE, UNIT, sampler="consistency")
            for s in sorted(set(view.eval_steps) & set(cfg.eval_steps))
            if T is None or T % s == 0]


def _describe(view) -> str:
    cfg = view.cd
    src = cfg.teacher or "base/model"
    grid = (f"N={cfg.N}, mu={cfg.mu}" if cfg.schedule == "fixed" else
            f"adaptive N {cfg.s0}..{N_max(cfg)}, mu0={cfg.mu0}")
    line = (f"from {src}: {grid}, {cfg.solver} teacher steps, {cfg.distance}, "
            f"{cfg.steps} steps, "
            f"rows at {sorted(set(view.eval_steps) & set(cfg.eval_steps))} steps")
    if cfg.teacher is not None:
        line += "; " + describe_teacher(cfg.teacher, None, cfg.student_prediction)
    return line


def _check(view) -> None:
    cfg = view.cd
    if cfg is None or cfg.teacher is not None:
        return
    if cfg.schedule == "adaptive" and cfg.s0 > N_max(cfg):
        raise ValueError(f"cd.s0={cfg.s0} must be at most s1 + 1={N_max(cfg)} (the adaptive "
                         "schedule's first and last N)")
    if N_max(cfg) - 1 > view.teacher_T:
        what = "N" if cfg.schedule == "fixed" else "s1 + 1"
        raise ValueError(f"cd.{what}={N_max(cfg)} needs N - 1 <= base.T={view.teacher_T} "
                         "(points of the teacher's grid)")


PRESETS = {
    "smoke": {"cd": dict(N=9, steps=4, batch_size=32, lr=2e-4, checkpoint_interval=2,
                         log_interval=1)},
    # digits: 1500 steps of batch 64, about 67 ms a step on 2 CPU cores (~100 s), well under
    # the ~3 minutes the default run may grow by (its two rows evaluate in seconds).
    "digits": {"cd": dict(N=18, steps=1500, batch_size=64, lr=2e-4, flip=False,
                          checkpoint_interval=250, log_interval=10)},
    # The paper's CIFAR-10 CD (Song et al. 2023, Table 3 / appendix C): N=18, mu=0.95, batch
    # 512, Adam lr 4e-4, 800k iterations, from an EDM teacher with Heun steps and LPIPS. Here:
    # our base model's grid, one DDIM teacher step, and L2 (LPIPS weights are not available).
    "cifar10-paper": {"cd": dict(N=18, mu=0.95, batch_size=512, lr=4e-4, steps=800_000,
                                 distance="l2", checkpoint_interval=5_000)},
}

METHOD = Method(
    name=STAGE, sections={"cd": (CDStageConfig | None, lambda: None)}, reads=READS,
    train=lambda view, run: train_cd(view.cd, view.data, run),
    describe=_describe, rows=_rows, needs=("base",), check=_check,
    inputs=lambda view, run_dir: [teacher_path(view.cd, run_dir)], compare_to="pd",
    presets=PRESETS, help="consistency distillation from the base model; off unless configured")
