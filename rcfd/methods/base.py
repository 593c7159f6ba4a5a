"""Base diffusion training (METHOD.md, "Base training"): the ``(T, 1)`` model every
distillation starts from, trained on :class:`rcfd.losses.DenoisingLoss`. Its samplers for
evaluation are the training-free ones (DDIM, DPM-Solver, PNDM: ``eval.samplers``) at
``eval.base_steps``.

The noise of a step (``t``, ``eps``) is drawn for the whole GLOBAL batch from the stage's
generator and each rank keeps its rows (the same rows the data loader gives it), so N
processes see exactly the data and noise of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator

from rcfd.io.checkpoint import save_diffusion_checkpoint
from rcfd.config import Decay, NonNegInt, PosFloat, PosInt, Pow2, Section
from rcfd.core.schedule import cosine_schedule
from rcfd.core.unet import UNet, UNetConfig
from rcfd.losses import DenoisingLoss
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
from rcfd.methods.registry import Method, Row
from rcfd.training.fast_step import ObjectiveStep
from rcfd.training.loop import Job
from rcfd.training.optim import OptimSpec
from rcfd.training.rundir import RunContext
from rcfd.training.state import stage_seed

STAGE, UNIT = "base", "model"
SAMPLER_LABELS = {"ddim": "DDIM", "dpm-solver": "DPM-Solver++(2M)", "pndm": "PNDM"}


class BaseStageConfig(Section):
    """The base diffusion model (METHOD.md, "Base training"): sampler ``(T, 1)``, Adam with
    a linear ``warmup``, EMA ``ema_decay`` (``None``: no EMA), grad-norm clip ``grad_clip``
    (``None``: no clipping), random horizontal ``flip`` of the data. Dropout is
    ``unet.dropout``. ``sample_steps``: DDIM steps of the periodic sample grid (``None``:
    ``T``)."""

    unet: UNetConfig = UNetConfig.cifar10()
    T: Pow2 = 1024
    loss: Literal["both", "x", "eps"] = "both"
    prediction: Literal["x0", "eps"] = "x0"
    lr: PosFloat = 2e-4
    warmup: NonNegInt = 5000
    batch_size: PosInt = 128
    steps: PosInt = 800_000
    ema_decay: Decay | None = 0.9999
    grad_clip: PosFloat | None = 1.0
    flip: bool = True
    sample_interval: PosInt = 20_000
    sample_steps: Pow2 | None = None
    num_sample_images: NonNegInt = 64
    checkpoint_interval: PosInt = 10_000
    log_interval: PosInt = 10
    options: TrainOptions = TrainOptions()

    @model_validator(mode="after")
    def _check(self) -> "BaseStageConfig":
        if self.T < 2:
            raise ValueError(f"T must be >= 2 (a base model of at least two steps), got {self.T}")
        if self.unet.num_time_indices < self.T + 1:
            raise ValueError(f"unet.num_time_indices={self.unet.num_time_indices} is too small "
                             f"for T={self.T}: it needs T + 1 = {self.T + 1} rows")
        if self.sample_steps is not None and self.sample_steps > self.T:
            raise ValueError(f"sample_steps={self.sample_steps} exceeds T={self.T}")
        return self


def train_base(cfg: BaseStageConfig, data, run: RunContext) -> Path:
    """Train the base model ``(T, 1)``: ``t ~ U{0..T}``, the ``cfg.loss`` denoising loss,
    Adam with linear warmup, EMA, grad-norm clipping, a sample grid every
    ``sample_interval`` steps. Returns ``run_dir/base/model.safetensors`` (weights and EMA weights;
    :func:`rcfd.io.checkpoint.load_diffusion_checkpoint` picks the EMA)."""
    return train_unit(run, STAGE, UNIT, lambda: _base_job(cfg, data, run))


def _base_job(cfg: BaseStageConfig, data, run: RunContext) -> Job:
    """The base model's :class:`~rcfd.training.loop.Job` (see :func:`train_base`)."""
    dataset = load_train(data)
    check_images_fit(cfg.unet, dataset, "base.unet")
    torch.manual_seed(stage_seed(run.seed, STAGE, UNIT, "init"))
    model = UNet(cfg.unet)
    schedule = cosine_schedule(cfg.T, 1)
    objective = DenoisingLoss(schedule, cfg.T, 1, cfg.loss, cfg.prediction)
    identity = data_identity(data, dataset)

    def finalize(net, ema_net, extra, path):
        return save_diffusion_checkpoint(
            path, net, T=cfg.T, time_scale=1, prediction=cfg.prediction, ema_model=ema_net,
            extra={"stage": STAGE, "finished": True, "steps": extra["steps"],
                   "skipped_steps": extra["skipped_steps"], "config": cfg.to_dict(),
                   "data": data_spec_dict(identity)})

    o = cfg.options
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    job = Job(stage=STAGE, unit=UNIT, model=model, loss_fn=ObjectiveStep(objective),
              batches=data_batches(dataset, cfg.batch_size, run, STAGE, UNIT, flip=cfg.flip),
              steps=cfg.steps, config=cfg.to_dict(), finalize=finalize, data=identity,
              optim=OptimSpec("adam", cfg.lr, "constant", warmup=cfg.warmup, fused=o.fused),
              ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip, log_interval=cfg.log_interval,
              checkpoint_interval=cfg.checkpoint_interval,
              sample_fn=grid_sampler(schedule, cfg.T, 1, cfg.sample_steps or cfg.T,
                                     cfg.num_sample_images, shape,
                                     stage_seed(run.seed, STAGE, "grid"), run.torch_device,
                                     cfg.prediction),
              sample_interval=cfg.sample_interval, bf16=o.bf16,
              channels_last=o.channels_last, compile=o.compile)
    return job


# --------------------------------------------------------------------------- the method


# What the base model reads of the evaluation section: its training-free samplers' settings.
READS = {"eval_samplers": "eval.samplers", "eval_base_steps": "eval.base_steps"}


def _rows(view) -> list[Row]:
    """The base model with each training-free sampler of ``eval.samplers`` at
    ``eval.base_steps``, and with DDIM at its full ``T`` (the distillation teacher, the upper
    bound of every distilled row)."""
    rows = [Row(STAGE, f"{SAMPLER_LABELS[sampler]} (base model)", s, STAGE, UNIT, sampler)
            for sampler in view.eval_samplers for s in sorted(view.eval_base_steps)]
    if not any(r.sampler == "ddim" and r.steps == view.base.T for r in rows):
        rows.append(Row(STAGE, f"{SAMPLER_LABELS['ddim']} (base model)", view.base.T, STAGE, UNIT))
    return rows


def _check(view) -> None:
    u, data = view.base.unet, view.data
    if (u.image_size, u.in_channels) != (data.image_size, data.channels):
        raise ValueError(f"base.unet takes {u.in_channels}x{u.image_size}x{u.image_size} images "
                         f"but data gives {data.channels}x{data.image_size}x{data.image_size}; "
                         "set base.unet.image_size / in_channels to match")
    for name, steps in (("steps", view.eval_steps), ("base_steps", view.eval_base_steps)):
        for s in steps:
            if s > view.base.T:
                raise ValueError(f"eval.{name} {s} exceed the base model's T={view.base.T}")


METHOD = Method(
    name=STAGE, sections={"base": (BaseStageConfig, BaseStageConfig)}, reads=READS,
    train=lambda view, run: [train_base(view.base, view.data, run)],
    describe=lambda view: f"T={view.base.T}, {view.base.steps} steps, batch {view.base.batch_size}",
    rows=_rows, check=_check, help="the base diffusion model")
