"""A loaded diffusion model that samples in one call: :func:`load` wraps
:func:`rcfd.io.checkpoint.load_diffusion_checkpoint` and returns a :class:`Model` holding the
network, what its checkpoint says about it (:class:`~rcfd.io.checkpoint.DiffusionInfo`: ``T``,
``time_scale``, ``prediction``, the U-Net config) and its noise schedule, so no caller
re-passes them::

    model = rcfd.load("runs/digits/pd/T1.safetensors")
    x = model.sample(64, steps=1, sampler="ddim", seed=0)   # float [64, C, H, W] in [-1, 1]
    plan = model.plan(steps=1)                              # for a loop of one's own

Sampling goes through :func:`rcfd.samplers.generate`, the path ``python -m rcfd.sample`` and
the evaluation take (one captured CUDA graph per batch shape on a GPU), so
``to_uint8(model.sample(n, seed=s))`` are the images ``rcfd.sample --num n --seed s`` writes,
whatever either's batch size (image ``i``'s noise depends on the seed and ``i`` alone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from rcfd.core.schedule import Schedule, schedule_of
from rcfd.io.checkpoint import DiffusionInfo, load_diffusion_checkpoint
from rcfd.samplers import DTYPES, Plan, generate, get_sampler, make_plan, sample, sampling_dtype

__all__ = ["Model", "load", "schedule_of"]

DEFAULT_BATCH_SIZE = 256  # rcfd.sample's --batch-size (memory only: the images do not depend on it)


def default_device() -> torch.device:
    """CUDA when it is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Model:
    """A diffusion model ready to sample: ``net`` (our :class:`~rcfd.core.unet.UNet`, eval
    mode, on ``device``) maps ``(z_t, schedule index)`` to its prediction (``info.prediction``:
    ``"x0"``, ``"eps"`` or ``"v"``); ``info`` is its checkpoint's
    :class:`~rcfd.io.checkpoint.DiffusionInfo`; ``schedule`` its ``(alpha, sigma)`` tables."""

    net: nn.Module
    info: DiffusionInfo
    schedule: Schedule

    @property
    def device(self) -> torch.device:
        """The device the network's weights are on (and samples are made on)."""
        return next(self.net.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model makes."""
        cfg = self.info.config
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    def plan(self, steps: int | Sequence[int] | None = None, *, device: Any = None,
             dtype: torch.dtype = torch.float32, clip: bool = True) -> Plan:
        """The :class:`rcfd.samplers.Plan` of an ``steps``-step sampler (an int dividing
        ``T``; ``None``: ``T`` steps) or over an explicit strictly decreasing list of sampler
        steps in ``0..T``, on ``device`` (default: the model's). A plan serves every sampler
        of :data:`rcfd.samplers.SAMPLERS`: ``get_sampler(name)(model.net, x_T, plan)``."""
        info = self.info
        num, explicit = (None, list(steps)) if isinstance(steps, Sequence) else (steps or info.T, None)
        return make_plan(self.schedule, info.T, info.time_scale, num, steps=explicit,
                         prediction=info.prediction, clip=clip, dtype=dtype,
                         device=self.device if device is None else device)

    def sample(self, n: int, steps: int | Sequence[int] | None = None, sampler: str = "ddim", *,
               seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, noise: torch.Tensor | None = None,
               progress: bool = False, dtype: str = "auto", use_cuda_graph: bool = True) -> torch.Tensor:
        """``n`` images, float ``[n, C, H, W]`` in ``[-1, 1]`` on the model's device, from the
        ``steps``-step ``sampler`` (a name of :data:`rcfd.samplers.SAMPLERS`). Image ``i``'s
        noise (its ``x_T`` and the consistency sampler's re-noising) depends on ``seed``,
        ``i`` and the device type only (:func:`rcfd.samplers.generate`): ``batch_size`` sets
        the memory used, not the images, and ``sample(m)[:k]`` equals ``sample(k)``.
        ``noise`` (``[n, C, H, W]``) is used as ``x_T`` instead when given, sampled eagerly in
        one batch (a consistency sampler then re-noises from that batch's default noise).
        ``dtype``: the network's while sampling (``"auto"``: bf16 on CUDA, fp32 elsewhere);
        ``progress``: a progress bar."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        fn = get_sampler(sampler)
        plan = self.plan(steps)
        if noise is not None:
            if tuple(noise.shape) != (n, *self.image_shape) or not noise.is_floating_point():
                raise ValueError(f"noise must be a float tensor of shape {(n, *self.image_shape)}, "
                                 f"got {noise.dtype} {tuple(noise.shape)}")
            autocast_dtype = DTYPES[sampling_dtype(dtype, self.device)]
            return sample(self.net, noise.to(self.device), plan, fn, autocast_dtype=autocast_dtype)
        batches = generate(self.net, n, min(batch_size, n), shape=self.image_shape, plan=plan, sampler=fn,
                           device=self.device, seed=seed, dtype=dtype, use_cuda_graph=use_cuda_graph,
                           progress=progress)
        return torch.cat(list(batches))

    def __repr__(self) -> str:
        info = self.info
        return (f"Model(T={info.T}, time_scale={info.time_scale}, prediction={info.prediction!r}, "
                f"images={self.image_shape}, {info.source} format ({info.weights}), on {self.device})")


def load(path: str | os.PathLike, device: Any = None, *, use_ema: bool | None = None,
         image_size: int = 32) -> Model:
    """The diffusion model of checkpoint ``path`` (ours, the reference implementation's, or a
    diffusers model folder; whatever :func:`rcfd.io.checkpoint.load_diffusion_checkpoint`
    reads) as a :class:`Model`
    on ``device`` (default: CUDA when available, else the CPU). ``use_ema=None`` takes our
    checkpoints' EMA weights when present; ``image_size`` applies to reference checkpoints
    only (they do not record it). A file that is not a diffusion checkpoint raises
    :class:`rcfd.errors.CheckpointError` naming it."""
    device = default_device() if device is None else torch.device(device)
    net, info = load_diffusion_checkpoint(path, device, use_ema=use_ema, image_size=image_size)
    return Model(net=net, info=info, schedule=schedule_of(info))
