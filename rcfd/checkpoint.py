"""Checkpoints: atomic save, safe load, and import of the reference implementation's files.

Every file is read with ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples,
str, int, float, bool and None only. A file that needs arbitrary pickled code to load is
refused, never executed. Saves are atomic: the old file stays intact until the new one is
completely on disk.

Our format (``kind`` is ``"diffusion"`` or ``"classifier"``)::

    {"format": "rcfd", "version": 1, "kind": ..., "model_config": {...},
     "state_dict": {...}, "ema_state_dict": {...} | None, "T": int | None,
     "time_scale": int | None, "prediction": "x0" | "eps" | None, "extra": {...}}

Reference formats: ``{"net_model" | "ema_model": state_dict, "T", "time_scale", "x_T", ...}``
for diffusion models (METHOD.md: the EMA weights when ``time_scale == 1``, the trained
weights otherwise) and ``{"model": state_dict}`` for classifiers.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

FORMAT = "rcfd"
VERSION = 1
KINDS = ("diffusion", "classifier")
PREDICTIONS = ("x0", "eps")
_PLAIN_LEAVES = (torch.Tensor, str, int, float, bool, type(None))
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class CheckpointError(RuntimeError):
    """A checkpoint file is missing pieces, damaged, or not of a format we read."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that can only be loaded by running arbitrary pickled code."""


class StateDictMismatchError(RuntimeError):
    """A state dict does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------- save
def check_weights_only(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value that ``torch.load(weights_only=True)``
    would refuse (so we never write a file we will not read back)."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int, got {type(k).__name__}")
            check_weights_only(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_weights_only(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a safe "
            "(weights_only) load refuses; store tensors, dicts, lists, str, int, float, bool "
            "or None (e.g. torch.from_numpy(array), or a config's to_dict())"
        )


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` atomically: to a temporary file in the same
    directory, flushed and fsynced, then ``os.replace``-d over ``path`` and the directory
    fsynced. A failure (or a kill) at any point leaves the previous file intact; a killed
    writer may leave a ``.<name>.*.tmp`` file behind, which is safe to delete."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: directory {directory} "
                                "does not exist (create it first)")
    check_weights_only(obj)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as an ordinary open() would create it
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return path


def _umask() -> int:
    try:  # Linux: read it without the racy set-and-restore dance
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- load
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                    verify: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors for a missing, empty,
    truncated, corrupt or unsafe file. ``verify`` checks the CRC of every member of a
    zip-format checkpoint first (one extra read), which catches flipped bytes that
    ``torch.load`` would load silently."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written "
                              "completely; use an earlier checkpoint")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        _check_zip(path, verify)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL\s+([\w.]+)", str(e)) or _foreign_globals(path)
        if found:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it pickles {', '.join(found[:3])}, and loading it would "
                "run that code, which could do anything. rcfd only loads tensors and plain "
                "values. If you trust where the file came from, convert it once yourself: "
                "load it with torch.load(weights_only=False) in a separate session, keep only "
                "tensors and plain values (numpy arrays -> torch.from_numpy), and save that "
                "with rcfd.checkpoint.save_checkpoint."
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (unreadable pickle: {_first_line(e)})") from e
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"could not load checkpoint {path}: it is truncated, corrupt, "
                              f"or not a torch.save file ({type(e).__name__}: "
                              f"{_first_line(e)})") from e


def _foreign_globals(path: Path, limit: int = 3) -> list[str]:
    """Names of non-torch code objects a pickle imports, read with ``pickletools`` (which
    parses the opcodes and executes nothing). Used to explain a refused load when
    ``torch.load`` stopped before reaching them."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(pkl)
        else:
            data = path.read_bytes()
        stream, strings = io.BytesIO(data), []
        for _ in range(4):  # the legacy format is a few pickles in a row
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - garbage after the pickles, or no pickle at all
        pass
    safe = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")
    return list(dict.fromkeys(n for n in found if not n.startswith(safe)))[:limit]


def _check_zip(path: Path, verify: bool) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if verify else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a complete "
                              f"zip archive: {e}); use an earlier checkpoint") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: member {bad!r} fails its CRC "
                              "check (damaged on disk or in transfer); use another copy")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (torch.compile)
    prefix carried by every key."""
    sd = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        while sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any],
                           what: str = "model", *, show: int = 5) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, but a mismatch raises a
    :class:`StateDictMismatchError` that names the missing, unexpected and shape-mismatched
    keys (``show`` of each, then counts)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items()
              if k in state_dict and isinstance(v, torch.Tensor)
              and tuple(getattr(state_dict[k], "shape", ())) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{what}: the state dict does not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f" ... and {len(items) - show} more" if len(items) > show else ""
                parts.append(f"{len(items)} {title}: " + ", ".join(items[:show]) + more)
        if any(k.startswith(_WRAPPER_PREFIXES) for k in unexpected):
            parts.append("hint: strip the wrapper prefix with strip_wrapper_prefixes()")
        raise StateDictMismatchError("; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- our format
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def make_checkpoint(kind: str, model_config: Mapping[str, Any], state_dict: Mapping[str, Any],
                    *, ema_state_dict: Mapping[str, Any] | None = None, T: int | None = None,
                    time_scale: int | None = None, prediction: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble (and validate) a checkpoint dict of our format."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "diffusion":
        for name, v in (("T", T), ("time_scale", time_scale)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"a diffusion checkpoint needs a positive integer {name}, "
                                 f"got {v!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    ckpt = {"format": FORMAT, "version": VERSION, "kind": kind,
            "model_config": dict(model_config), "state_dict": dict(state_dict),
            "ema_state_dict": None if ema_state_dict is None else dict(ema_state_dict),
            "T": T, "time_scale": time_scale, "prediction": prediction,
            "extra": dict(extra or {})}
    check_weights_only(ckpt)
    return ckpt


def save_diffusion_checkpoint(path: str | os.PathLike, model: nn.Module, *, T: int,
                              time_scale: int, prediction: str = "x0",
                              ema_model: nn.Module | None = None,
                              extra: Mapping[str, Any] | None = None) -> Path:
    """Save a :class:`~rcfd.core.unet.UNet` (wrappers removed) and its EMA copy atomically."""
    model = unwrap_model(model)
    ema = None if ema_model is None else unwrap_model(ema_model).state_dict()
    return save_checkpoint(make_checkpoint(
        "diffusion", model.config.to_dict(), model.state_dict(), ema_state_dict=ema, T=T,
        time_scale=time_scale, prediction=prediction, extra=extra), path)


def is_rcfd_checkpoint(ckpt: Any) -> bool:
    return isinstance(ckpt, Mapping) and ckpt.get("format") == FORMAT


def check_rcfd_checkpoint(ckpt: Mapping[str, Any], kind: str, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` is one of ours, of ``kind``, readable
    by this version."""
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{source} has format version {version!r}; this rcfd reads up "
                              f"to {VERSION}: upgrade rcfd")
    if ckpt.get("kind") != kind:
        raise CheckpointError(f"{source} holds a {ckpt.get('kind')!r} model, not a {kind!r} one")
    for key in ("model_config", "state_dict"):
        if not isinstance(ckpt.get(key), Mapping):
            raise CheckpointError(f"{source} has no {key!r} dict; it is incomplete")


# ----------------------------------------------------------------------------- reference format
@dataclass(frozen=True)
class DiffusionInfo:
    """What a diffusion checkpoint says about its model besides the weights."""

    T: int
    time_scale: int
    prediction: str
    config: Any  # rcfd.core.unet.UNetConfig
    source: str  # "rcfd" or "reference"
    weights: str  # which state dict was loaded: "state_dict", "ema_state_dict", "net_model", ...
    extra: dict = field(default_factory=dict)


def import_reference_diffusion(ckpt: Mapping[str, Any], *, image_size: int = 32,
                               dropout: float = 0.0, prediction: str = "x0",
                               source: str = "checkpoint") -> dict[str, Any]:
    """Convert a reference diffusion checkpoint to our format. Its weights are ``ema_model``
    when ``time_scale == 1`` (a base model) and ``net_model`` otherwise (a distilled one);
    the architecture is read off the state dict; ``x_T`` and other entries go to ``extra``.
    The result's ``extra["reference_weights"]`` names the state dict used."""
    from rcfd.core.unet import UNetConfig

    missing = [k for k in ("T", "time_scale") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}: not a reference diffusion checkpoint")
    T, time_scale = int(ckpt["T"]), int(ckpt["time_scale"])
    wanted, other = ("ema_model", "net_model") if time_scale == 1 else ("net_model", "ema_model")
    if wanted not in ckpt:
        if other not in ckpt:
            raise CheckpointError(f"{source} has neither 'net_model' nor 'ema_model' weights")
        warnings.warn(f"{source}: no {wanted!r} (expected for time_scale={time_scale}); "
                      f"using {other!r}", stacklevel=2)
        wanted = other
    sd = strip_wrapper_prefixes(ckpt[wanted])
    try:
        config = UNetConfig.from_state_dict(sd, image_size=image_size, dropout=dropout)
    except ValueError as e:
        raise CheckpointError(f"{source} ({wanted}): {e}") from e
    extra = {k: v for k, v in ckpt.items()
             if k not in ("net_model", "ema_model", "T", "time_scale")}
    extra["reference_weights"] = wanted
    return make_checkpoint("diffusion", config.to_dict(), sd, T=T, time_scale=time_scale,
                           prediction=prediction, extra=extra)


def load_diffusion_checkpoint(path: str | os.PathLike, device: Any = "cpu", *,
                              use_ema: bool | None = None, image_size: int = 32,
                              prediction: str = "x0") -> tuple[nn.Module, DiffusionInfo]:
    """Build the :class:`~rcfd.core.unet.UNet` of a checkpoint of either format and load its
    weights strictly; returns ``(model in eval mode on device, info)``. For our format,
    ``use_ema=None`` takes the EMA weights when present. ``image_size`` and ``prediction``
    apply to reference checkpoints only (they do not record them)."""
    from rcfd.core.unet import UNet, UNetConfig

    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if is_rcfd_checkpoint(ckpt):
        source = "rcfd"
        weights = "state_dict"
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
    check_rcfd_checkpoint(ckpt, "diffusion", str(path))
    try:
        config = UNetConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model_config: {e}") from e
    T, time_scale = ckpt.get("T"), ckpt.get("time_scale")
    if (not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (T, time_scale))
            or ckpt.get("prediction") not in PREDICTIONS):
        raise CheckpointError(f"{path}: invalid T={T!r}, time_scale={time_scale!r} or "
                              f"prediction={ckpt.get('prediction')!r}")
    if T * time_scale >= config.num_time_indices:
        raise CheckpointError(f"{path}: schedule index T * time_scale = {T * time_scale} "
                              f"is outside the time table ({config.num_time_indices} rows)")
    model = UNet(config)
    state = ckpt["state_dict"] if source == "reference" else ckpt[weights]
    load_state_dict_strict(model, state, what=f"{path} ({weights})")
    info = DiffusionInfo(T=T, time_scale=time_scale, prediction=ckpt["prediction"],
                         config=config, source=source, weights=weights,
                         extra=dict(ckpt.get("extra") or {}))
    return model.to(device).eval(), info


def load_classifier_state_dict(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The classifier weights of a reference ``{'model': state_dict}`` file or of one of
    ours (``kind="classifier"``): ``(state_dict, model_config)``, the config being ``{}``
    for a reference file."""
    ckpt = load_checkpoint(path)
    if is_rcfd_checkpoint(ckpt):
        check_rcfd_checkpoint(ckpt, "classifier", str(path))
        return dict(ckpt["state_dict"]), dict(ckpt["model_config"])
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        return strip_wrapper_prefixes(ckpt["model"]), {}
    found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise CheckpointError(f"{path} is neither an rcfd classifier checkpoint nor a reference "
                          f"one ({{'model': state_dict}}); found: {found}")
