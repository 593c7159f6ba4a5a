"""A student out to diffusers: a ``UNet2DModel`` + ``DDIMScheduler`` folder (the
``save_pretrained`` layout, safetensors weights) that samples in the student's own steps.

The scheduler. Our DDIM plan of a ``(T, time_scale)`` student visits the schedule indices
``T s, (T-1) s, ..., 0`` (``s = time_scale``). diffusers' ``DDIMScheduler`` computes the
previous timestep by a fixed stride (``t - num_train_timesteps // n``), so we choose its
configuration to make that stride ours: ``num_train_timesteps = T s + 1`` (our indices
``0 .. T s``), ``timestep_spacing="leading"`` with ``steps_offset = s`` (timesteps
``T s, ..., s``), and ``set_alpha_to_one=False`` (the last step, to index ``0`` or to the
"negative" timestep of a one-step student, uses ``alphas_cumprod[0]``: our index 0, which
is not noise-free). ``set_timesteps(n)`` reproduces our plan for ``n = T`` only; any other
``n`` visits timesteps the student was not distilled for. The schedule goes in by table:
``trained_betas`` chosen so that diffusers' float32 ``alphas_cumprod`` is our ``alpha**2``
at every index. ``clip_sample`` (range 1) with ``use_clipped_model_output=True`` is our
clipped sampler (the x0 estimate clipped, the noise estimate re-derived from it).

Sampling the student with diffusers (``x`` a noise batch, e.g. ``torch.randn``)::

    scheduler.set_timesteps(T)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, use_clipped_model_output=True).prev_sample

then ``x.clamp(-1, 1)`` are the images (what ``DDIMPipeline`` does with
``num_inference_steps=T, use_clipped_model_output=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcfd.core.schedule import Schedule, check_sampler, check_sampler_fits, schedule_of
from rcfd.core.unet import UNetConfig
from rcfd.errors import ConfigError, EnvironmentFailure, UsageError
from rcfd.io.files import _umask
from rcfd.io.safetensors import safetensors_bytes
from rcfd.interop.diffusers_unet import diffusers_config_from_unet, state_dict_to_diffusers

DIFFUSERS_VERSION = "0.21.0"  # the oldest release whose UNet2DModel/DDIMScheduler read these
PREDICTION_TYPES = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def betas_for_alphas_cumprod(abar: torch.Tensor) -> list[float]:
    """``trained_betas`` whose float32 ``cumprod(1 - beta)`` (as ``DDIMScheduler`` builds
    ``alphas_cumprod``) is ``abar`` at every index: each factor is chosen against the
    running float32 product so rounding does not accumulate over a thousand steps."""
    abar = abar.to(torch.float64)
    betas, running = [], 1.0
    for target in abar.tolist():
        beta = torch.tensor(1.0 - target / running, dtype=torch.float32)
        factor = float(1.0 - beta)  # what diffusers computes from the float32 beta
        running *= factor
        betas.append(float(beta))
    return betas


def scheduler_config(schedule: Schedule, T: int, time_scale: int, prediction: str,
                     clip: bool = True) -> dict[str, Any]:
    """The ``DDIMScheduler`` config that samples a ``(T, time_scale)`` student over our
    DDIM plan (module docstring); ``prediction`` is ours (``"x0"``, ``"eps"``, ``"v"``)."""
    check_sampler(T, time_scale)
    check_sampler_fits(schedule, T, time_scale)
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"cannot export prediction={prediction!r} to diffusers; supported: "
                          f"{', '.join(PREDICTION_TYPES)}")
    n = T * time_scale + 1
    abar = schedule.alpha[:n].to(torch.float64) ** 2
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": n, "beta_start": 0.0001, "beta_end": 0.02,
        "beta_schedule": "linear", "trained_betas": betas_for_alphas_cumprod(abar),
        "clip_sample": clip, "clip_sample_range": 1.0, "set_alpha_to_one": False,
        "steps_offset": time_scale, "prediction_type": PREDICTION_TYPES[prediction],
        "thresholding": False, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not an empty folder; choose a new one")


def export_diffusers(model: nn.Module, info: Any, out_dir: str | os.PathLike, *,
                     schedule: Schedule | None = None, clip: bool = True) -> Path:
    """Write ``out_dir`` with ``unet/`` (``UNet2DModel``: ``config.json`` and safetensors
    weights), ``scheduler/`` (``DDIMScheduler``: ``scheduler_config.json``) and a
    ``model_index.json`` (``DDIMPipeline``), so ``from_pretrained`` loads each. ``info``
    is the checkpoint's :class:`~rcfd.io.checkpoint.DiffusionInfo` (``T``, ``time_scale``,
    ``prediction``, ``config``); ``schedule`` is the model's (default:
    :func:`~rcfd.core.schedule.schedule_of` ``info``). Written whole into a temporary sibling
    folder and renamed into place: a failure leaves nothing at ``out_dir``. Refuses an
    existing non-empty ``out_dir``."""
    config = getattr(model, "config", None)
    if not isinstance(config, UNetConfig):
        raise UsageError(f"export_diffusers needs our UNet, got {type(model).__name__}")
    if info.config != config:
        raise UsageError("info.config does not describe this model")
    if schedule is None:
        schedule = schedule_of(info)
    out_dir = Path(out_dir)
    _check_target(out_dir)
    unet_cfg = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
                **diffusers_config_from_unet(config)}
    files = {
        "model_index.json": _json({"_class_name": "DDIMPipeline",
                                   "_diffusers_version": DIFFUSERS_VERSION,
                                   "scheduler": ["diffusers", "DDIMScheduler"],
                                   "unet": ["diffusers", "UNet2DModel"]}),
        "scheduler/scheduler_config.json": _json(scheduler_config(
            schedule, info.T, info.time_scale, info.prediction, clip)),
        "unet/config.json": _json(unet_cfg),
        f"unet/{WEIGHTS_NAME}": safetensors_bytes(
            state_dict_to_diffusers(model.state_dict(), config)),
    }
    _write_folder(out_dir, files)
    return out_dir


def _write_folder(out_dir: Path, files: dict[str, bytes]) -> None:
    """``files`` (relative path -> bytes) into a temporary sibling of ``out_dir``, fsynced,
    then renamed to ``out_dir`` (an empty ``out_dir`` is replaced)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp",
                                    dir=out_dir.parent))
    except OSError as e:
        raise EnvironmentFailure(out_dir, e) from e
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _write(tmp / rel, data)
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise EnvironmentFailure(out_dir, e) from e
        raise
