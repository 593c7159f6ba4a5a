"""A diffusers model folder read as one of our diffusion checkpoints, as data: neither diffusers
nor the safetensors package need be installed (the configs are JSON, the weights are read by
:mod:`rcfd.io.safetensors`).

Layouts: a pipeline folder (``model_index.json``, or just ``unet/`` and ``scheduler/``) with
``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors`` (a ``UNet2DModel``) and
``scheduler/scheduler_config.json`` (a ``DDPMScheduler`` or ``DDIMScheduler``: the teacher's
``num_train_timesteps``, betas and ``prediction_type``).

The time grid (METHOD.md, "Teachers with their own schedule"). A ``K``-timestep teacher
(``K = 1000`` for DDPM) goes on our grid of ``G + 1`` indices, ``G = 1024`` by default (a
power of two, so halving rounds work): our index ``i`` is the teacher timestep
``tau = i * (K - 1) / G``, the U-Net is converted with ``time_input_scale = (K - 1) / G``
(so ``UNet(x, i) == UNet2DModel(x, tau)``, fractional ``tau`` included) and the schedule is
the teacher's ``alphas_cumprod`` interpolated in log-SNR between integer timesteps, exact at
them (:func:`rcfd.core.schedule.interpolated_abar`). The loaded model is a
``(T, time_scale = G / T)`` sampler: ``T = G`` unless asked for a coarser power of two
(``T = 64``: the teacher's 64-step DDIM on that grid, the first teacher of PD rounds that
start there). Its ``prediction`` is the scheduler's ``prediction_type`` (``epsilon`` ->
``eps``, ``sample`` -> ``x0``, ``v_prediction`` -> ``v``).

``alphas_cumprod`` is computed exactly as diffusers computes it (float32 betas and cumulative
product, the same formulas), then kept in float64: the teacher was trained on those values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from rcfd.core.schedule import MAX_GRID, MAX_TRAIN_TIMESTEPS, check_schedule_spec
from rcfd.errors import CheckpointError, ConfigError, UsageError
from rcfd.interop.diffusers_unet import state_dict_from_diffusers, unet_config_from_diffusers
from rcfd.io.safetensors import read_safetensors

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
DEFAULT_GRID = 1024
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MAX_JSON_BYTES = 16 << 20  # a config, trained_betas of MAX_TRAIN_TIMESTEPS included
_NOT_A_MODEL = ("is not a diffusers model folder (expected model_index.json or unet/config.json "
                "with unet/" + WEIGHTS_NAME + " and scheduler/scheduler_config.json, as "
                "save_pretrained writes them); give such a folder or a checkpoint file")


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (the loaders read a folder as a diffusers model only)."""
    return Path(path).is_dir()


def _read_json(path: Path, source: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{source} {_NOT_A_MODEL}: {path.name} is missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is over {MAX_JSON_BYTES} bytes: not a diffusers config")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore the folder") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a config dict")
    return obj


def folder_parts(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(unet folder, scheduler folder)`` of a diffusers pipeline folder, or a
    :class:`CheckpointError` saying what a diffusers model folder holds."""
    root = Path(path)
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json", str(root))
        if "unet" not in index or "scheduler" not in index:
            raise CheckpointError(f"{root}/model_index.json names no unet and scheduler "
                                  f"(found {sorted(index)[:8]}); {_NOT_A_MODEL}")
    unet, scheduler = root / "unet", root / "scheduler"
    if not (unet / "config.json").is_file():
        raise CheckpointError(f"{root} {_NOT_A_MODEL}")
    return unet, scheduler


def _int_field(cfg: Mapping[str, Any], key: str, default: int, high: int, source: str) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
        raise CheckpointError(f"{source}: {key}={v!r} must be an integer in 1..{high}")
    return v


def _float_field(cfg: Mapping[str, Any], key: str, default: float, source: str) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise CheckpointError(f"{source}: {key}={v!r} must be a number in [0, 1)")
    return float(v)


def _cosine_betas(n: int) -> list[float]:
    """diffusers' ``betas_for_alpha_bar(n)`` (``squaredcos_cap_v2``), in Python floats."""

    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)]


def betas_of(cfg: Mapping[str, Any], n: int, source: str) -> torch.Tensor:
    """The scheduler's betas as diffusers makes them (float32): ``trained_betas`` when
    given, else its ``beta_schedule`` (one of :data:`BETA_SCHEDULES`)."""
    trained = cfg.get("trained_betas")
    if trained is not None:
        if (not isinstance(trained, list) or len(trained) != n
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in trained)):
            raise CheckpointError(f"{source}: trained_betas must be a list of "
                                  f"num_train_timesteps={n} numbers")
        return torch.tensor(trained, dtype=torch.float32)
    kind = cfg.get("beta_schedule", "linear")
    start = _float_field(cfg, "beta_start", 0.0001, source)
    end = _float_field(cfg, "beta_end", 0.02, source)
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        return torch.tensor(_cosine_betas(n), dtype=torch.float32)
    raise CheckpointError(f"{source}: beta_schedule={kind!r} is not supported; supported: "
                          f"{', '.join(BETA_SCHEDULES)}, or trained_betas")


def scheduler_schedule(cfg: Mapping[str, Any], source: str, grid: int = DEFAULT_GRID
                       ) -> tuple[dict[str, Any], str]:
    """``(schedule spec, our prediction)`` of a ``DDPMScheduler`` / ``DDIMScheduler``
    config: its ``alphas_cumprod`` (as diffusers computes it) on our grid of ``grid + 1``
    indices (module docstring). Refuses other schedulers, beta schedules and prediction
    types naming the supported ones, and zero-terminal-SNR schedules."""
    name = cfg.get("_class_name")
    if name not in SCHEDULERS:
        raise CheckpointError(f"{source}: scheduler {name!r} is not supported; supported: "
                              f"{', '.join(SCHEDULERS)}")
    if cfg.get("rescale_betas_zero_snr"):
        raise CheckpointError(f"{source}: rescale_betas_zero_snr=true (alpha = 0 at the last "
                              "timestep) is not supported")
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise CheckpointError(f"{source}: prediction_type={kind!r} is not supported; supported: "
                              f"{', '.join(PREDICTIONS)}")
    n = _int_field(cfg, "num_train_timesteps", 1000, MAX_TRAIN_TIMESTEPS, source)
    if n < 2:
        raise CheckpointError(f"{source}: num_train_timesteps must be at least 2")
    abar = torch.cumprod(1.0 - betas_of(cfg, n, source), dim=0).to(torch.float64)
    spec = {"kind": "diffusers", "alphas_cumprod": abar.tolist(), "grid": grid,
            "num_train_timesteps": n, "scheduler": name,
            "beta_schedule": "trained_betas" if cfg.get("trained_betas") is not None
            else cfg.get("beta_schedule", "linear")}
    problem = check_schedule_spec(spec)
    if problem is not None:
        raise CheckpointError(f"{source}: the betas give an unusable schedule: {problem}")
    return spec, PREDICTIONS[kind]


def sampler_of(grid: int, T: int | None, source: str) -> tuple[int, int]:
    """``(T, time_scale)`` of the loaded teacher on a grid of ``grid`` steps: ``T = grid``
    when ``T`` is ``None``, else a power of two dividing it."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2 or grid & (grid - 1) or grid > MAX_GRID:
        raise UsageError(f"the time grid must be a power of two in 2..{MAX_GRID}, got {grid!r}")
    if T is None:
        return grid, 1
    if isinstance(T, bool) or not isinstance(T, int) or T < 1 or T & (T - 1) or T > grid:
        raise UsageError(f"{source}: a diffusers teacher runs as T = a power of two up to its "
                         f"grid of {grid} steps; got T={T!r}")
    return T, grid // T


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by our checked reader
    (:func:`rcfd.io.safetensors.read_safetensors`: no code runs, the header is checked in
    full before any tensor is allocated). Only safetensors weights are read (``.bin``
    weights are pickles)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the diffusers folder has no safetensors "
                              "weights (.bin weights are pickles and are not read)")
    return read_safetensors(path)[0]


def read_diffusers_config(path: str | os.PathLike, *, T: int | None = None,
                          grid: int = DEFAULT_GRID) -> dict[str, Any]:
    """What a diffusers folder's configs say, weights unread: ``model_config`` (our U-Net's,
    validated: nothing absurd is built from it), ``unet_config`` (diffusers'), ``T``,
    ``time_scale``, ``prediction`` and ``schedule`` (the spec)."""
    unet_dir, sched_dir = folder_parts(path)
    source = str(path)
    unet_cfg = _read_json(unet_dir / "config.json", source)
    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{source}: the unet is a {unet_cfg.get('_class_name')!r}; only "
                              "UNet2DModel is supported")
    spec, prediction = scheduler_schedule(
        _read_json(sched_dir / "scheduler_config.json", source), f"{source} (scheduler)", grid)
    T, time_scale = sampler_of(grid, T, source)
    n = spec["num_train_timesteps"]
    try:
        config = unet_config_from_diffusers(unet_cfg, num_time_indices=grid + 1,
                                            time_input_scale=(n - 1) / grid)
    except (ConfigError, TypeError, ValueError, KeyError, IndexError) as e:  # a malformed config
        raise CheckpointError(f"{source} (unet): {e}") from None
    return {"model_config": config, "unet_config": unet_cfg, "T": T, "time_scale": time_scale,
            "prediction": prediction, "schedule": spec, "unet_dir": unet_dir}


def import_diffusers_folder(path: str | os.PathLike, *, T: int | None = None,
                            grid: int = DEFAULT_GRID) -> dict[str, Any]:
    """The parts of one of our diffusion checkpoints from a diffusers folder (module
    docstring): :func:`read_diffusers_config`'s fields (``model_config`` as a dict) plus
    ``state_dict`` (ours, every key and shape checked against the config) and ``extra``."""
    parts = read_diffusers_config(path, T=T, grid=grid)
    config = parts["model_config"]
    sd = load_weights(parts["unet_dir"] / WEIGHTS_NAME)
    state = state_dict_from_diffusers(sd, config, diffusers_config=parts["unet_config"])
    spec = parts["schedule"]
    extra = {"diffusers": {"path": str(path), "scheduler": spec["scheduler"],
                           "beta_schedule": spec["beta_schedule"],
                           "num_train_timesteps": spec["num_train_timesteps"], "grid": grid}}
    return {**parts, "model_config": config.to_dict(), "state_dict": state, "extra": extra}
