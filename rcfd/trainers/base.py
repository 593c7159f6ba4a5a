"""Base diffusion training (METHOD.md, "Base training"), and the pieces every diffusion
stage shares: the noise of a step, the explicit-noise objectives, sample grids.

The noise of a step (``t``, ``eps``) is drawn for the whole GLOBAL batch from the stage's
generator, in the order :mod:`rcfd.losses` draws it, and each rank keeps its own share
(the same rows :class:`rcfd.data.loader.Batches` gives it). So a run on ``N`` processes sees
exactly the data and noise of a single process with the same global batch, and on one
process :func:`base_objective` / :func:`pd_objective` equal ``losses.base_loss`` /
``losses.pd_loss`` called with the same generator (tests/test_trainers.py checks both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from rcfd.checkpoint import save_diffusion_checkpoint
from rcfd.config import BaseStageConfig
from rcfd.data import DatasetSpec, ImageDataset, load_dataset
from rcfd.data.loader import batches
from rcfd.losses import PDOutput, denoising_loss, pd_target, predict, schedule_at
from rcfd.sampling import sample_ddim
from rcfd.core.schedule import Schedule, cosine_schedule
from rcfd.trainers.loop import Job, StepInfo, run_job, stage_seed
from rcfd.trainers.optim import OptimSpec
from rcfd.trainers.rundir import RunContext, checkpoint_path, unit_done
from rcfd.core.unet import UNet

STAGE = "base"
UNIT = "model"


# --------------------------------------------------------------------------- shared pieces


def load_train(data: DatasetSpec | ImageDataset) -> ImageDataset:
    return data if isinstance(data, ImageDataset) else load_dataset(data, "train")


def check_images_fit(unet_config, dataset: ImageDataset, what: str = "the model") -> None:
    """Clear error when the U-Net's image size / channels differ from the data's."""
    want = (unet_config.in_channels, unet_config.image_size)
    got = (dataset.channels, dataset.image_size)
    if want != got:
        raise ValueError(f"{what} takes {want[0]}-channel {want[1]}x{want[1]} images but the "
                         f"{dataset.name} data is {got[0]}-channel {got[1]}x{got[1]}; set the "
                         "U-Net's in_channels / image_size (or the DatasetSpec) to match")


def draw_noise(info: StepInfo, x0: torch.Tensor, low: int, high: int):
    """``(t ~ U{low..high}, eps ~ N(0, I))`` for the global batch, in that order from
    ``info.generator`` (as ``losses.base_loss`` draws them), then this rank's rows."""
    g, b = info.generator, info.global_batch
    t = torch.randint(low, high + 1, (b,), generator=g, device=g.device)
    eps = torch.randn((b, *x0.shape[1:]), generator=g, device=g.device, dtype=x0.dtype)
    per = b // info.world_size
    rows = slice(info.rank * per, info.rank * per + per)
    return t[rows].to(x0.device), eps[rows].to(x0.device)


def _per_sample(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (x.dim() - 1)))


def diffuse(x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor, schedule: Schedule):
    """``z_t = alpha_t x0 + sigma_t eps`` at schedule index ``index`` (METHOD.md, "Base
    training"); returns ``(z_t, alpha_t, sigma_t)``."""
    alpha_t, sigma_t = schedule_at(schedule, index, x0)
    z_t = (_per_sample(alpha_t, x0) * x0 + _per_sample(sigma_t, x0) * eps).to(x0.dtype)
    return z_t, alpha_t, sigma_t


def base_objective(model: Callable, x0: torch.Tensor, schedule: Schedule, time_scale: int,
                   kind: str, prediction: str, noise) -> torch.Tensor:
    """``losses.base_loss`` with the noise ``(t, eps)`` given: the denoising loss of
    ``kind`` at schedule index ``t * time_scale``."""
    t, eps = noise
    index = t * time_scale
    z_t, alpha_t, sigma_t = diffuse(x0, eps, index, schedule)
    x0_hat, eps_hat = predict(model, z_t, index, alpha_t, sigma_t, prediction)
    return denoising_loss(x0_hat, eps_hat, x0, eps, kind)


def pd_objective(student: Callable, teacher: Callable, x0: torch.Tensor, schedule: Schedule,
                 teacher_ts: int, kind: str, prediction: str, noise) -> PDOutput:
    """``losses.pd_loss`` with the noise ``(half, eps)`` given (``t = 2 * half`` teacher
    steps): the student's prediction at ``t * teacher_ts`` against the two-step teacher
    target of ``losses.pd_target``."""
    half, eps = noise
    t = 2 * half
    index = t * teacher_ts
    z_t, alpha_t, sigma_t = diffuse(x0, eps, index, schedule)
    x_target, eps_target = pd_target(teacher, z_t, t, schedule, teacher_ts, prediction)
    x0_hat, eps_hat = predict(student, z_t, index, alpha_t, sigma_t, prediction)
    loss = denoising_loss(x0_hat, eps_hat, x_target, eps_target, kind)
    return PDOutput(loss, x0_hat, eps_hat, x_target, eps_target, z_t, t)


def grid_sampler(T: int, time_scale: int, num_steps: int, n: int, shape, seed: int,
                 device: torch.device, prediction: str = "x0", schedule: Schedule | None = None):
    """``(model, path) -> path``: ``n`` images from a fixed ``x_T`` (drawn once on the CPU
    from ``seed``) by the ``num_steps``-step DDIM sampler, written as a PNG grid (the
    periodic sample grid of a stage); ``None`` when ``n == 0``."""
    if n < 1:
        return None
    from rcfd.report import display_scale, save_grid

    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)

    def sample(model, path):
        images = sample_ddim(model, x_T, T, time_scale, num_steps, schedule, prediction=prediction)
        return save_grid(images, path, scale=display_scale(shape[-1]))
    return sample


def data_batches(dataset: ImageDataset, batch_size: int, run: RunContext, *key, flip=True):
    """The training batches of a unit: order and flips seeded from ``(seed, *key)``, this
    rank's share of each global batch, on the run's device."""
    return batches(dataset, batch_size, stage_seed(run.seed, *key, "data"), flip=flip,
                   device=run.torch_device, rank=run.dist.rank, world_size=run.dist.world_size)


# --------------------------------------------------------------------------- entry point


def train_base(cfg: BaseStageConfig, data: DatasetSpec, run: RunContext) -> Path:
    """Train the base model ``(T, 1)`` (METHOD.md, "Base training"): ``t ~ U{0..T}``, the
    ``cfg.loss`` denoising loss, Adam with linear warmup, EMA, grad-norm clipping, a sample
    grid every ``sample_interval`` steps. Returns ``run_dir/base/model.pt`` (weights and
    EMA weights; :func:`rcfd.checkpoint.load_diffusion_checkpoint` picks the EMA)."""
    if unit_done(run, STAGE, UNIT):
        return checkpoint_path(run.run_dir, STAGE, UNIT)
    dataset = load_train(data)
    check_images_fit(cfg.unet, dataset, "base.unet")
    torch.manual_seed(stage_seed(run.seed, STAGE, UNIT, "init"))
    model = UNet(cfg.unet)
    schedule = cosine_schedule(cfg.T, 1)
    device = run.torch_device

    def loss_fn(net, x, y, info):
        noise = draw_noise(info, x, 0, cfg.T)
        return base_objective(net, x, schedule, 1, cfg.loss, cfg.prediction, noise), {}

    def finalize(net, ema_net, extra, path):
        return save_diffusion_checkpoint(
            path, net, T=cfg.T, time_scale=1, prediction=cfg.prediction, ema_model=ema_net,
            extra={"stage": STAGE, "finished": True, "steps": extra["steps"],
                   "skipped_steps": extra["skipped_steps"], "config": cfg.to_dict(),
                   "data": _data_dict(data, dataset)})

    o = cfg.options
    job = Job(stage=STAGE, unit=UNIT, model=model, loss_fn=loss_fn,
              batches=data_batches(dataset, cfg.batch_size, run, STAGE, UNIT, flip=cfg.flip),
              steps=cfg.steps, config=cfg.to_dict(), finalize=finalize,
              optim=OptimSpec("adam", cfg.lr, "constant", warmup=cfg.warmup, fused=o.fused),
              ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip, log_interval=cfg.log_interval,
              checkpoint_interval=cfg.checkpoint_interval,
              sample_fn=grid_sampler(cfg.T, 1, cfg.sample_steps or cfg.T, cfg.num_sample_images,
                                     (dataset.channels, dataset.image_size, dataset.image_size),
                                     stage_seed(run.seed, STAGE, "grid"), device,
                                     cfg.prediction, schedule),
              sample_interval=cfg.sample_interval, bf16=o.bf16,
              channels_last=o.channels_last, compile=o.compile)
    return run_job(job, run)


def _data_dict(data, dataset: ImageDataset) -> dict:
    if isinstance(data, DatasetSpec):
        return data.to_dict()
    return {"name": dataset.name, "image_size": dataset.image_size, "channels": dataset.channels}


def student_config(teacher_config, dropout: float):
    """The student's U-Net: the teacher's architecture with ``dropout``."""
    return dataclasses.replace(teacher_config, dropout=dropout)
