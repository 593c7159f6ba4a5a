"""What the training methods share: execution options, the training data of a unit, sample
grids, the checks that an earlier stage's output is there and fits, and
:func:`train_unit`, the one way a method trains a unit (skip it when it is finished, else
build its :class:`~rcfd.training.loop.Job` and run it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from rcfd.config import Section
from rcfd.core.schedule import Schedule
from rcfd.data import DatasetSpec, ImageDataset, load_dataset
from rcfd.data.loader import batches
from rcfd.errors import UsageError
from rcfd.io.grids import display_scale, save_grid
from rcfd.samplers import get_sampler, make_plan
from rcfd.training.loop import Job, log_line, run_job
from rcfd.training.rundir import RunContext, checkpoint_path, unit_done
from rcfd.training.state import stage_seed


class TrainOptions(Section):
    """Execution options shared by every training stage; they only take effect on CUDA (on
    the CPU they are ignored: bf16 autocast and channels_last slow a CPU step down, and
    compiling costs minutes there). ``bf16``: autocast; ``channels_last``: the networks and
    images in that layout; ``fused``: the fused optimizer; ``compile``: the fast step
    (:mod:`rcfd.training.fast_step`): the whole objective compiled by ``torch.compile``,
    teacher target, student and classifier (the classifier stage compiles its model); a
    compile that fails logs one line and the step runs eagerly; ``False`` runs the eager
    step. ``cudnn.benchmark`` is not set here: ``python -m rcfd.train`` turns it on on CUDA
    (and says so), the library functions leave it as the caller set it."""

    bf16: bool = True
    channels_last: bool = True
    fused: bool = True
    compile: bool = True


def load_train(data: DatasetSpec | ImageDataset) -> ImageDataset:
    """The training split of ``data`` (a spec, or a dataset already in memory)."""
    return data if isinstance(data, ImageDataset) else load_dataset(data, "train")


def data_identity(data: DatasetSpec | ImageDataset, dataset: ImageDataset) -> dict:
    """What a checkpoint records of its training data, and what a resume must match: the
    spec (or the in-memory dataset's name and shape) and a fingerprint of the images."""
    spec = (data.to_dict() if isinstance(data, DatasetSpec) else
            {"name": dataset.name, "image_size": dataset.image_size, "channels": dataset.channels})
    return {**spec, "split": dataset.split, "num_images": len(dataset),
            "fingerprint": dataset.fingerprint()[:16]}


def data_spec_dict(identity: dict) -> dict:
    """The :class:`DatasetSpec` fields of a :func:`data_identity` (what a checkpoint's
    ``extra["data"]`` holds, for tools that rebuild the dataset from it)."""
    return {k: v for k, v in identity.items() if k in DatasetSpec.model_fields}


def check_images_fit(unet_config, dataset: ImageDataset, what: str = "the model") -> None:
    """Clear error when the U-Net's image size / channels differ from the data's."""
    want = (unet_config.in_channels, unet_config.image_size)
    got = (dataset.channels, dataset.image_size)
    if want != got:
        raise UsageError(f"{what} takes {want[0]}-channel {want[1]}x{want[1]} images but the "
                         f"{dataset.name} data is {got[0]}-channel {got[1]}x{got[1]}; set the "
                         "U-Net's in_channels / image_size (or the data spec) to match")


def data_batches(dataset: ImageDataset, batch_size: int, run: RunContext, *key, flip=True):
    """The training batches of a unit: order and flips seeded from ``(seed, *key)``, this
    rank's share of each global batch, on the run's device."""
    if batch_size > len(dataset):
        raise UsageError(f"batch_size={batch_size} is larger than the {len(dataset)} training "
                         f"images of {dataset.name}; set a batch size of at most {len(dataset)}")
    if batch_size % run.dist.world_size:
        raise UsageError(f"batch_size={batch_size} (the global batch) must be divisible by the "
                         f"{run.dist.world_size} processes")
    return batches(dataset, batch_size, stage_seed(run.seed, *key, "data"), flip=flip,
                   device=run.torch_device, rank=run.dist.rank, world_size=run.dist.world_size)


def grid_sampler(schedule: Schedule, T: int, time_scale: int, num_steps: int, n: int, shape,
                 seed: int, device: torch.device, prediction: str = "x0", sampler: str = "ddim"):
    """``(model, path) -> path``: ``n`` images from a fixed ``x_T`` (drawn once on the CPU
    from ``seed``) by the ``num_steps``-step ``sampler`` (DDIM; CD's ``"consistency"``),
    written as a PNG grid (the periodic sample grid of a stage); ``None`` when ``n == 0``."""
    if n < 1:
        return None
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    plan = make_plan(schedule, T, time_scale, num_steps, prediction=prediction, device=device)
    fn = get_sampler(sampler)

    def sample(model, path):
        with torch.no_grad():
            images = fn(model, x_T, plan)
        return save_grid(images, path, scale=display_scale(shape[-1]))
    return sample


def require(run_dir: Path, stage: str, unit: str) -> Path:
    """The checkpoint ``<stage>/<unit>.safetensors`` of an earlier stage, or a usage error saying
    which stage to run first."""
    path = checkpoint_path(run_dir, stage, unit)
    if not path.is_file():
        raise UsageError(f"{path} does not exist: run the {stage} stage first "
                         f"(python -m rcfd.train {stage} --out {run_dir})")
    return path


def train_unit(run: RunContext, stage: str, unit: str, make_job: Callable[[], Job]) -> Path:
    """The checkpoint ``<stage>/<unit>.safetensors`` of one unit of training: when it is finished
    (:func:`rcfd.training.rundir.unit_done`: a ``--resume`` of a run that has it) it is
    used as it is, with one line saying so; otherwise ``make_job()`` builds the unit's
    :class:`~rcfd.training.loop.Job` (only then: building loads data and networks) and
    :func:`~rcfd.training.loop.run_job` trains it (resuming its state when asked). A run
    directory holding the unit without ``--resume`` or ``--overwrite`` is refused by
    ``unit_done`` before anything is built."""
    if unit_done(run, stage, unit):
        path = checkpoint_path(run.run_dir, stage, unit)
        log_line(run, f"{stage}/{unit} is finished; using {path}")
        return path
    job = make_job()
    if (job.stage, job.unit) != (stage, unit):
        raise ValueError(f"train_unit({stage!r}, {unit!r}) was given a job for "
                         f"{job.stage!r}/{job.unit!r}")
    return run_job(job, run)
