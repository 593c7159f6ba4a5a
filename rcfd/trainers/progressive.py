"""Progressive distillation (METHOD.md, "Progressive distillation target"): rounds teacher
``(T, ts)`` -> student ``(T/2, 2 ts)``, each student initialised from its teacher and
trained on ``losses.pd_loss`` (through :func:`rcfd.trainers.base.pd_objective`), Adam with
cosine annealing to 0, no EMA and no dropout by default. Round ``k``'s student is round
``k+1``'s teacher; every round writes ``run_dir/pd/T<student T>.pt``.

:func:`distill_rounds` is the round driver shared with RCFD (:mod:`rcfd.trainers.rcfd`),
which only swaps the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rcfd.checkpoint import (
    DiffusionInfo,
    load_diffusion_checkpoint,
    save_diffusion_checkpoint,
)
from rcfd.config import PDStageConfig, halving_rounds
from rcfd.data import DatasetSpec, ImageDataset
from rcfd.core.schedule import cosine_schedule
from rcfd.trainers.base import (
    _data_dict,
    check_images_fit,
    data_batches,
    draw_noise,
    grid_sampler,
    load_train,
    pd_objective,
    student_config,
)
from rcfd.trainers.loop import Job, _log, run_job, stage_seed
from rcfd.trainers.optim import OptimSpec
from rcfd.trainers.rundir import RunContext, checkpoint_path, unit_done
from rcfd.core.unet import UNet

STAGE = "pd"


def load_teacher(path: Path | str, device: torch.device) -> tuple[nn.Module, DiffusionInfo]:
    """A frozen teacher (eval mode, no parameter grads; its EMA weights when it has them)."""
    model, info = load_diffusion_checkpoint(path, device)
    return model.eval().requires_grad_(False), info


def check_halving(info: DiffusionInfo, final_T: int, source) -> list[tuple[int, int]]:
    """The rounds ``[(T, T/2), ..., (2 final_T, final_T)]`` from a teacher, with clear
    errors when its ``T`` cannot halve down to ``final_T``."""
    if info.T & (info.T - 1) or info.T <= final_T:
        raise ValueError(f"{source} is a T={info.T} sampler; distillation halves T each round "
                         f"down to final_T={final_T}, so the teacher's T must be a power of two "
                         f"above {final_T}")
    return halving_rounds(info.T, final_T)


def distill_rounds(cfg, stage: str, teacher_path: Path | str, data, run: RunContext,
                   make_loss: Callable, extra_info: dict | None = None) -> list[Path]:
    """Run the halving rounds of ``cfg`` (a PD or RCFD stage config) from ``teacher_path``.
    ``make_loss(teacher, schedule, teacher_T, teacher_ts, prediction) -> loss_fn`` builds
    a round's objective (see :class:`rcfd.trainers.loop.Job`)."""
    device = run.torch_device
    dataset = load_train(data)
    teacher, info = load_teacher(teacher_path, device)
    check_images_fit(info.config, dataset, f"the teacher {teacher_path}")
    rounds = check_halving(info, cfg.final_T, teacher_path)
    schedule = cosine_schedule(info.T, info.time_scale)  # T * ts is the same every round
    ts, source, paths = info.time_scale, str(teacher_path), []
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    o = cfg.options
    for teacher_T, student_T in rounds:
        unit = f"T{student_T}"
        if unit_done(run, stage, unit):
            path = checkpoint_path(run.run_dir, stage, unit)
            _log(run, f"{stage}/{unit} is finished; using {path}")
        else:
            if o.channels_last and device.type == "cuda":
                teacher = teacher.to(memory_format=torch.channels_last)
            student = UNet(student_config(info.config, cfg.dropout))
            student.load_state_dict(teacher.state_dict())
            student_ts = 2 * ts

            def finalize(net, ema_net, extra, path, T=student_T, ts2=student_ts, src=source,
                         prediction=info.prediction):
                return save_diffusion_checkpoint(
                    path, net, T=T, time_scale=ts2, prediction=prediction,
                    ema_model=ema_net,
                    extra={"stage": stage, "finished": True, "teacher": src, "steps": extra["steps"],
                           "skipped_steps": extra["skipped_steps"], "config": cfg.to_dict(),
                           "data": _data_dict(data, dataset), **(extra_info or {})})

            job = Job(stage=stage, unit=unit, model=student,
                      loss_fn=make_loss(teacher, schedule, teacher_T, ts, info.prediction),
                      batches=data_batches(dataset, cfg.batch_size, run, stage, unit,
                                           flip=cfg.flip),
                      steps=cfg.round_steps(student_T), config=cfg.to_dict(), finalize=finalize,
                      optim=OptimSpec("adam", cfg.lr, cfg.lr_schedule, warmup=cfg.warmup,
                                      fused=o.fused),
                      ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                      log_interval=cfg.log_interval, checkpoint_interval=cfg.checkpoint_interval,
                      sample_fn=grid_sampler(student_T, student_ts, student_T,
                                             cfg.num_sample_images, shape,
                                             stage_seed(run.seed, stage, "grid"), device,
                                             info.prediction, schedule),
                      sample_interval=cfg.sample_interval, bf16=o.bf16,
                      channels_last=o.channels_last, compile=o.compile)
            path = run_job(job, run)
            del student, job
        teacher, new = load_teacher(path, device)
        if (new.T, new.time_scale) != (student_T, 2 * ts):
            raise ValueError(f"{path} is a (T={new.T}, time_scale={new.time_scale}) sampler, "
                             f"not the (T={student_T}, time_scale={2 * ts}) student of this "
                             "round; delete it or pass overwrite=True")
        info, ts, source = new, new.time_scale, str(path)
        paths.append(path)
    return paths


def train_pd(cfg: PDStageConfig, teacher: Path, data: DatasetSpec | ImageDataset,
             run: RunContext) -> list[Path]:
    """Progressive distillation from ``teacher`` (``base/model.pt``, or any diffusion
    checkpoint of ours or the reference's) down to ``cfg.final_T`` steps. Returns
    ``[run_dir/pd/T<T/2>.pt, ..., run_dir/pd/T<final_T>.pt]``."""

    def make_loss(teacher_net, schedule, teacher_T, ts, prediction):
        def loss_fn(net, x, y, info):
            noise = draw_noise(info, x, 1, teacher_T // 2)
            out = pd_objective(net, teacher_net, x, schedule, ts, cfg.loss, prediction, noise)
            return out.loss, {}
        return loss_fn

    return distill_rounds(cfg, STAGE, teacher, data, run, make_loss)
