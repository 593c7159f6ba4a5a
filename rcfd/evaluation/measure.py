"""Sampling for metrics and the reference data: images from a diffusion checkpoint (split over
the ranks of a torchrun job and gathered), and the dataset splits they are measured against."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rcfd import distributed
from rcfd.core.schedule import schedule_of
from rcfd.data import DatasetSpec, ImageDataset, load_dataset, to_uint8
from rcfd.errors import CheckpointError, DataError, UsageError
from rcfd.samplers import generate, make_plan, shard_samples

# --------------------------------------------------------------------------- sampling


def sample_images(model: nn.Module, info, *, num_samples: int, num_steps: int, batch_size: int,
                  sampler: str = "ddim", device: Any = "cpu", seed: int = 0, dist=None,
                  use_cuda_graph: bool = True, progress: bool = True, dtype: str = "auto") -> torch.Tensor | None:
    """``num_samples`` images (uint8 ``[N, C, H, W]`` on the CPU) from a diffusion model
    (``info``: its :class:`rcfd.io.checkpoint.DiffusionInfo`) with the ``num_steps``-step
    ``sampler``, through :func:`rcfd.samplers.generate`. Under ``torchrun`` (``dist``: a
    :class:`rcfd.distributed.DistInfo`) each rank makes a contiguous block of the images
    (:func:`rcfd.samplers.shard_samples`) and rank 0 gets them all, in rank order (the other
    ranks get ``None``). Image ``i``'s noise (its ``x_T`` and any re-noising) depends only on
    ``seed``, ``i`` and the device type, not on ``num_samples``, ``batch_size`` or the number
    of processes, so rank ``r`` makes exactly the images one process makes at those
    indices, and rows sampled with the same ``seed`` start from the same noise.
    ``dtype``: the model's (:func:`rcfd.samplers.sampling_dtype`; ``"auto"``: bf16 on CUDA).
    The images stay on the device until the last batch (one copy to the host, no sync per
    batch); on CUDA the model is compiled inside the sampler's graph."""
    dist = dist or distributed.SINGLE
    device = torch.device(device)
    batch_size = min(batch_size, num_samples)
    block = shard_samples(num_samples, dist.rank, dist.world_size)
    n = len(block)
    cfg = info.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    plan = make_plan(schedule_of(info), info.T, info.time_scale,
                     num_steps, prediction=info.prediction, device=device)
    out, bad = [], torch.zeros((), dtype=torch.int64, device=device)
    if n:
        for x in generate(model, num_samples, batch_size, shape=shape, dtype=dtype,
                          plan=plan, sampler=sampler, device=device, seed=seed,
                          use_cuda_graph=use_cuda_graph, progress=progress and dist.is_main,
                          indices=block):
            bad += (~torch.isfinite(x).flatten(1).all(1)).sum()  # stays on the device: no sync
            out.append(to_uint8(torch.nan_to_num(x, nan=0.0)))
    images = torch.cat(out).cpu() if out else torch.empty((0, *shape), dtype=torch.uint8)
    bad = int(bad)  # one host sync, after the last batch
    if bad:
        warnings.warn(f"{bad} of {n} samples ({num_steps} steps) hold NaN or inf: the sampler diverged; "
                      "they are measured with NaN set to 0", RuntimeWarning, stacklevel=2)
    return distributed.gather_cat(images, dist, dst=0)


# --------------------------------------------------------------------------- reference data


def dataset_spec_for(info, data: str | None = None, data_path: str | None = None,
                     image_size: int | None = None):
    """The training set to measure against: ``data`` (+ ``data_path``) when given, else the
    dataset the checkpoint records (``extra["data"]``, checked here as a
    :class:`~rcfd.data.DatasetSpec`: an invalid record is a :class:`CheckpointError`), else
    ``digits`` for a 16 px, one-channel model; anything else must be named."""
    cfg = info.config
    size = image_size or cfg.image_size
    if data is not None:
        return DatasetSpec(name=data, path=data_path, image_size=size, channels=cfg.in_channels)
    recorded = info.extra.get("data") or info.extra.get("dataset")
    if isinstance(recorded, Mapping):
        try:
            return DatasetSpec.from_dict(dict(recorded))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's field extra['data'] (the dataset the model was "
                                  f"trained on) is invalid: {e}; name the data with --data and "
                                  f"--data-path") from None
    if (cfg.image_size, cfg.in_channels) == (16, 1):
        return DatasetSpec(name="digits")
    raise UsageError(f"the checkpoint does not record its dataset ({cfg.in_channels} channels, "
                     f"{cfg.image_size} px): name it with --data (cifar10 or folder) and --data-path")


def load_references(spec: DatasetSpec) -> dict[str, ImageDataset]:
    """``{"test": held-out split, "train": training split}`` of ``spec`` (a folder dataset
    has no test split: ``{"train": ...}`` only), with a clear error for unreadable data."""
    out = {}
    for split in ("test", "train"):
        try:
            out[split] = load_dataset(spec, split)
        except FileNotFoundError:
            raise
        except ValueError as e:
            if split == "test" and spec.name == "folder":
                continue
            raise DataError(f"cannot read the {split} split of the {spec.name} data at {spec.path}: {e}") from None
    return out
