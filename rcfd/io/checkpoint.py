"""Checkpoint formats: ours, the reference implementation's, and models built from them. The
file IO is :mod:`rcfd.io.modelfile` (our checkpoints as safetensors; either format read by
content) and :mod:`rcfd.io.safeload` (the guarded ``torch.load``), re-exported here.

Our format (``kind`` is ``"diffusion"`` or ``"classifier"``)::

    {"format": "rcfd", "version": 1, "kind": ..., "model_config": {...},
     "state_dict": {...}, "ema_state_dict": {...} | None, "T": int | None,
     "time_scale": int | None, "prediction": "x0" | "eps" | "v" | None, "extra": {...},
     "schedule": {...} (optional)}

A diffusers model folder (``rcfd.interop.diffusers_load``) loads as if it were one of ours.
``schedule`` (optional; absent: cosine) is the noise schedule's spec
(:func:`rcfd.core.schedule.check_schedule_spec`).

Reference formats: ``{"net_model" | "ema_model": state_dict, "T", "time_scale", "x_T", ...}``
for diffusion models (METHOD.md: the EMA weights when ``time_scale == 1``, the trained
weights otherwise) and ``{"model": state_dict}`` for classifiers.

Nothing read from a file sizes an allocation before it is checked. Every field a loader
reads is validated first (an error names the file and the field). The model is then built
on the ``meta`` device (no memory), each of its parameters and buffers compared with the
state dict (name, shape, kind of dtype, and that the tensor's values are all in the file,
not a broadcast view of a few bytes), and only then built for real and loaded: a file
cannot make a loader allocate more than the tensors it holds. A floating-point tensor of
another precision loads (converted), as ``load_state_dict`` does.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from rcfd.io.files import json_problem, short_repr
from rcfd.io.files import remove_stale_temp_files, temp_file_pattern  # re-exported
from rcfd.io.modelfile import load_model_file, save_model_checkpoint  # re-exported
from rcfd.io.safeload import (  # re-exported: the package imports them from here
    check_weights_only,
    load_checkpoint,
    save_checkpoint,
    torch_reason,
)
from rcfd.core.classifiers import ClassifierConfig, build as build_classifier, load_reference_classifier
from rcfd.core.schedule import PREDICTIONS, check_schedule_spec
from rcfd.interop.diffusers_load import import_diffusers_folder, is_diffusers_folder
from rcfd.io.statedict import (  # re-exported
    _dtype_kind,
    build_checked,
    check_state_dict,
    load_state_dict_strict,
    strip_wrapper_prefixes,
    unwrap_model,
)
from rcfd.core.unet import UNet, UNetConfig
from rcfd.errors import CheckpointError, StateDictMismatchError, UnsafeCheckpointError

__all__ = [
    "CheckpointError", "DiffusionInfo", "StateDictMismatchError", "UnsafeCheckpointError",
    "build_checked", "check_rcfd_checkpoint", "check_state_dict", "check_weights_only",
    "import_reference_diffusion", "is_rcfd_checkpoint", "load_checkpoint",
    "load_classifier_checkpoint", "load_classifier_state_dict", "load_diffusion_checkpoint",
    "load_model_file", "load_state_dict_strict", "make_checkpoint", "remove_stale_temp_files",
    "save_checkpoint", "save_diffusion_checkpoint", "save_model_checkpoint",
    "strip_wrapper_prefixes", "temp_file_pattern", "torch_reason",
    "unwrap_model",
]

FORMAT = "rcfd"
VERSION = 1
KINDS = ("diffusion", "classifier")
_DAMAGED = "the file is damaged or was not written by rcfd; use another copy"


# ----------------------------------------------------------------------------- our format
def make_checkpoint(kind: str, model_config: Mapping[str, Any], state_dict: Mapping[str, Any],
                    *, ema_state_dict: Mapping[str, Any] | None = None, T: int | None = None,
                    time_scale: int | None = None, prediction: str | None = None,
                    extra: Mapping[str, Any] | None = None,
                    schedule: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble (and validate) a checkpoint dict of our format (``schedule``: the noise
    schedule's spec, recorded when given; ``None`` is cosine)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "diffusion":
        for name, v in (("T", T), ("time_scale", time_scale)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"a diffusion checkpoint needs a positive integer {name}, "
                                 f"got {v!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if schedule is not None and check_schedule_spec(schedule) is not None:
        raise ValueError(f"invalid noise schedule: {check_schedule_spec(schedule)}")
    ckpt = {"format": FORMAT, "version": VERSION, "kind": kind,
            "model_config": dict(model_config), "state_dict": dict(state_dict),
            "ema_state_dict": None if ema_state_dict is None else dict(ema_state_dict),
            "T": T, "time_scale": time_scale, "prediction": prediction,
            "extra": dict(extra or {})}
    if schedule is not None:
        ckpt["schedule"] = dict(schedule)
    check_weights_only(ckpt)
    return ckpt


def save_diffusion_checkpoint(path: str | os.PathLike, model: nn.Module, *, T: int,
                              time_scale: int, prediction: str = "x0",
                              ema_model: nn.Module | None = None,
                              extra: Mapping[str, Any] | None = None,
                              noise_schedule: Mapping[str, Any] | None = None) -> Path:
    """Save a :class:`~rcfd.core.unet.UNet` (wrappers removed) and its EMA copy atomically,
    as safetensors (:func:`rcfd.io.modelfile.save_model_checkpoint`), with its noise
    schedule's spec when it is not cosine (a diffusers teacher's students)."""
    model = unwrap_model(model)
    ema = None if ema_model is None else unwrap_model(ema_model).state_dict()
    return save_model_checkpoint(make_checkpoint(
        "diffusion", model.config.to_dict(), model.state_dict(), ema_state_dict=ema, T=T,
        time_scale=time_scale, prediction=prediction, extra=extra,
        schedule=noise_schedule), path)


def is_rcfd_checkpoint(ckpt: Any) -> bool:
    return isinstance(ckpt, Mapping) and ckpt.get("format") == FORMAT


def _positive_int(v: Any, source: str, name: str) -> int:
    if isinstance(v, torch.Tensor) and v.dim() == 0 and _dtype_kind(v.dtype) == "integer":
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CheckpointError(f"{source}: field {name!r} must be a positive integer, got "
                              f"{short_repr(v)}; {_DAMAGED}")
    return v


def _tensor_dict(v: Any, source: str, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(v, Mapping):
        raise CheckpointError(f"{source} has no {name!r} dict (found {short_repr(v)}); it is incomplete")
    bad = [f"{k!r}: {short_repr(t, 30)}" for k, t in v.items()
           if not isinstance(k, str) or not isinstance(t, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: field {name!r} must map names to tensors; "
                              f"{len(bad)} entries do not ({', '.join(bad[:3])}); {_DAMAGED}")
    return dict(v)


def _check_extra(extra: Any, source: str) -> None:
    """``extra`` is a dict; its ``"data"`` (the dataset the model was trained on) is ``None``
    or a dict of plain JSON values. What the record means is checked where a dataset is
    made from it (:func:`rcfd.evaluation.dataset_spec_for`), not here: io knows no datasets."""
    if extra is None:
        return
    if not isinstance(extra, Mapping):
        raise CheckpointError(f"{source}: field 'extra' must be a dict, got {short_repr(extra)}; {_DAMAGED}")
    data = extra.get("data")
    if data is None:
        return
    problem = (f"a dict of plain JSON values, got {short_repr(data)}" if not isinstance(data, Mapping)
               else json_problem(data))
    if problem is not None:
        raise CheckpointError(f"{source}: field extra['data'] (the dataset the model was "
                              f"trained on) is invalid: {problem}; {_DAMAGED}")


def check_rcfd_checkpoint(ckpt: Mapping[str, Any], kind: str, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError`, naming ``source`` and the field, unless ``ckpt`` is one
    of ours, of ``kind``, readable by this version, with every field a loader reads well
    formed (the architecture itself is checked against the weights when it is built)."""
    version = ckpt.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: field 'version' must be a positive integer, got "
                              f"{short_repr(version)}; {_DAMAGED}")
    if version > VERSION:
        raise CheckpointError(f"{source} has format version {version}; this rcfd reads up "
                              f"to {VERSION}: upgrade rcfd")
    if ckpt.get("kind") != kind:
        raise CheckpointError(f"{source} holds a {short_repr(ckpt.get('kind'))} model, not a {kind!r} one")
    config = ckpt.get("model_config")
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise CheckpointError(f"{source} has no 'model_config' dict of named fields (found "
                              f"{short_repr(config)}); it is incomplete")
    _tensor_dict(ckpt.get("state_dict"), source, "state_dict")
    if ckpt.get("ema_state_dict") is not None:
        _tensor_dict(ckpt["ema_state_dict"], source, "ema_state_dict")
    _check_extra(ckpt.get("extra"), source)
    if kind == "diffusion":
        _positive_int(ckpt.get("T"), source, "T")
        _positive_int(ckpt.get("time_scale"), source, "time_scale")
        if not isinstance(ckpt.get("prediction"), str) or ckpt["prediction"] not in PREDICTIONS:
            raise CheckpointError(f"{source}: field 'prediction' must be one of {PREDICTIONS}, "
                                  f"got {short_repr(ckpt.get('prediction'))}; {_DAMAGED}")
        if ckpt.get("schedule") is not None and check_schedule_spec(ckpt["schedule"]):
            raise CheckpointError(f"{source}: field 'schedule' must be "
                                  f"{check_schedule_spec(ckpt['schedule'])}; {_DAMAGED}")


def _time_table_check(T: int, time_scale: int, config: UNetConfig, source: str) -> None:
    if T * time_scale >= config.num_time_indices:
        raise CheckpointError(f"{source}: schedule index T * time_scale = {T} * {time_scale} "
                              f"is outside the time table ({config.num_time_indices} rows); "
                              f"{_DAMAGED}")


# ----------------------------------------------------------------------------- reference format
@dataclass(frozen=True)
class DiffusionInfo:
    """What a diffusion checkpoint says about its model besides the weights."""

    T: int
    time_scale: int
    prediction: str
    config: Any  # rcfd.core.unet.UNetConfig
    source: str  # "rcfd", "reference" or "diffusers"
    weights: str  # which state dict was loaded: "state_dict", "ema_state_dict", "net_model", ...
    extra: dict = field(default_factory=dict)
    noise_schedule: dict | None = field(default=None, repr=False)  # the spec; None: cosine


def import_reference_diffusion(ckpt: Mapping[str, Any], *, image_size: int = 32,
                               dropout: float = 0.0, prediction: str = "x0",
                               source: str = "checkpoint") -> dict[str, Any]:
    """Convert a reference diffusion checkpoint to our format. Its weights are ``ema_model``
    when ``time_scale == 1`` (a base model) and ``net_model`` otherwise (a distilled one);
    the architecture is read off the state dict; ``x_T`` and other entries go to ``extra``.
    The result's ``extra["reference_weights"]`` names the state dict used. Raises
    :class:`CheckpointError` naming ``source`` and the field for anything malformed."""
    missing = [k for k in ("T", "time_scale") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}: not a reference diffusion checkpoint")
    T = _positive_int(ckpt["T"], source, "T")
    time_scale = _positive_int(ckpt["time_scale"], source, "time_scale")
    wanted, other = ("ema_model", "net_model") if time_scale == 1 else ("net_model", "ema_model")
    if wanted not in ckpt:
        if other not in ckpt:
            raise CheckpointError(f"{source} has neither 'net_model' nor 'ema_model' weights")
        warnings.warn(f"{source}: no {wanted!r} (expected for time_scale={time_scale}); "
                      f"using {other!r}", stacklevel=2)
        wanted = other
    sd = strip_wrapper_prefixes(_tensor_dict(ckpt[wanted], source, wanted))
    try:
        config = UNetConfig.from_state_dict(sd, image_size=image_size, dropout=dropout)
    except (ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{source} ({wanted}): {e}") from None
    _time_table_check(T, time_scale, config, source)
    extra = {k: v for k, v in ckpt.items()
             if k not in ("net_model", "ema_model", "T", "time_scale")}
    extra["reference_weights"] = wanted
    return make_checkpoint("diffusion", config.to_dict(), sd, T=T, time_scale=time_scale,
                           prediction=prediction, extra=extra)


# ----------------------------------------------------------------------------- loading models
def _config(cls: type, d: Mapping[str, Any], path: Any) -> Any:
    try:
        return cls.from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model_config: {e}") from None


def load_diffusion_checkpoint(path: str | os.PathLike, device: Any = "cpu", *,
                              use_ema: bool | None = None, image_size: int = 32,
                              prediction: str = "x0", diffusers_T: int | None = None
                              ) -> tuple[nn.Module, DiffusionInfo]:
    """Build the :class:`~rcfd.core.unet.UNet` of a checkpoint of any format (ours, the
    reference's, a diffusers folder) and load its weights strictly (checked on the ``meta``
    device first: module docstring); returns ``(model in eval mode on device, info)``. For
    our format, ``use_ema=None`` takes the EMA weights when present. ``image_size`` and
    ``prediction`` apply to reference checkpoints only (they do not record them);
    ``diffusers_T`` to diffusers folders only (their sampler ``T`` on the time grid; ``None``:
    the grid's)."""
    if is_diffusers_folder(path):
        parts = import_diffusers_folder(path, T=diffusers_T)
        ckpt = make_checkpoint("diffusion", parts["model_config"], parts["state_dict"],
                               T=parts["T"], time_scale=parts["time_scale"],
                               prediction=parts["prediction"], extra=parts["extra"],
                               schedule=parts["schedule"])
        return _build_diffusion(ckpt, path, "diffusers", "unet", device)
    ckpt = load_model_file(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if is_rcfd_checkpoint(ckpt):
        source, weights = "rcfd", "state_dict"
        check_rcfd_checkpoint(ckpt, "diffusion", str(path))
        if use_ema is not False and ckpt.get("ema_state_dict") is not None:
            weights = "ema_state_dict"
        elif use_ema:
            raise CheckpointError(f"{path} has no EMA weights; pass use_ema=False or None")
    elif "net_model" in ckpt or "ema_model" in ckpt:
        source = "reference"
        ckpt = import_reference_diffusion(ckpt, image_size=image_size, prediction=prediction,
                                          source=str(path))
        weights = ckpt["extra"]["reference_weights"]
    else:
        keys = sorted(map(str, ckpt))[:10]
        raise CheckpointError(f"{path} is neither an rcfd checkpoint nor a reference "
                              f"diffusion checkpoint; its top-level keys: {keys}")
    return _build_diffusion(ckpt, path, source, weights, device)


def _build_diffusion(ckpt: Mapping[str, Any], path: Any, source: str, weights: str,
                     device: Any) -> tuple[nn.Module, DiffusionInfo]:
    config = _config(UNetConfig, ckpt["model_config"], path)
    _time_table_check(ckpt["T"], ckpt["time_scale"], config, str(path))
    state = ckpt[weights] if source == "rcfd" else ckpt["state_dict"]
    model = build_checked(lambda: UNet(config), state, what=f"{path} ({weights})")
    info = DiffusionInfo(T=ckpt["T"], time_scale=ckpt["time_scale"],
                         prediction=ckpt["prediction"], config=config, source=source,
                         weights=weights, extra=dict(ckpt.get("extra") or {}),
                         noise_schedule=ckpt.get("schedule"))
    return model.to(device).eval(), info


def _meta_classifier_config(config: ClassifierConfig) -> ClassifierConfig:
    """The config to build a shape-only copy from: ``imagenet_*`` without reading the
    ImageNet weight file (the checkpoint's weights replace them anyway)."""
    if getattr(config, "pretrained", False):
        return type(config).from_dict({**config.to_dict(), "pretrained": False})
    return config


def load_classifier_state_dict(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The classifier weights of a reference ``{'model': state_dict}`` file or of one of
    ours (``kind="classifier"``): ``(state_dict, model_config)``, the config being ``{}``
    for a reference file. For ours, the config is validated and the weights checked
    against it on the ``meta`` device, so building ``model_config`` afterwards is safe."""
    ckpt = load_model_file(path)
    if is_rcfd_checkpoint(ckpt):
        check_rcfd_checkpoint(ckpt, "classifier", str(path))
        sd, cfg = dict(ckpt["state_dict"]), dict(ckpt["model_config"])
        meta_config = _meta_classifier_config(_config(ClassifierConfig, cfg, path))
        with torch.device("meta"):
            shell = build_classifier(meta_config)
        check_state_dict(shell, sd, f"classifier {path}")
        return sd, cfg
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        return strip_wrapper_prefixes(_tensor_dict(ckpt["model"], str(path), "model")), {}
    found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise CheckpointError(f"{path} is neither an rcfd classifier checkpoint nor a reference "
                          f"one ({{'model': state_dict}}); found: {found}")


def load_classifier_checkpoint(path: str | os.PathLike, device: Any = "cpu",
                               arch: str | None = None) -> nn.Module:
    """The one loader of classifier checkpoints: a classifier in eval mode on ``device`` from
    one of our checkpoints (rebuilt from its config) or a reference ``{'model': state_dict}``
    file (``arch`` names its architecture, e.g. ``"resnet18"``; CIFAR-10 normalisation),
    checked on the ``meta`` device before any memory is spent on it. A missing file is a
    :class:`CheckpointError` (a user mistake, like every other bad classifier path)."""
    if not Path(path).exists():
        raise CheckpointError(f"classifier checkpoint {path} does not exist")
    sd, cfg = load_classifier_state_dict(path)
    if cfg:  # validated and checked against the weights by load_classifier_state_dict
        model = build_classifier(ClassifierConfig.from_dict(cfg))
        model.load_state_dict(sd, strict=True)
        return model.to(device).eval()
    if arch is None:
        raise CheckpointError(f"{path} is a reference classifier checkpoint ({{'model': state_dict}}), "
                              "which does not record its architecture: name it (e.g. arch='resnet18', "
                              "or --classifier-arch resnet18 on the command line)")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op"
            shell = load_reference_classifier({"model": sd}, arch)
    except (ValueError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_state_dict(shell, sd, f"classifier {path}")
    return load_reference_classifier({"model": sd}, arch).to(device).eval()
