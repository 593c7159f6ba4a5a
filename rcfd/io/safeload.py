"""``torch.save`` files on disk: the atomic save and the guarded load (the formats inside
them are :mod:`rcfd.io.checkpoint`'s).

**What is still a torch file.** Our models are written as safetensors
(:mod:`rcfd.io.modelfile`, read by :mod:`rcfd.io.safetensors`' checked reader, which runs no
code by construction). ``torch.save`` files remain for: the resumable training state
(``<unit>.train.pt``, written by :func:`save_checkpoint`), our checkpoints of earlier
versions (``<unit>.pt``), the reference code's checkpoints, and weight files from elsewhere
(Inception, torchvision's ImageNet classifiers). The guards below are for those.

**Loading.** Every torch file is read with ``torch.load(weights_only=True)``: tensors,
dicts, lists, tuples, str, int, float, bool and None only. A file that needs pickled code to
load is refused and never executed, and no error message repeats torch's advice to switch
that protection off. Before torch reads a zip-format file its members are checked: their
CRCs (flipped bytes) and their sizes (torch allocates each member's declared size, so a
small compressed or crafted archive could otherwise ask for gigabytes). A safetensors file
given here (by content, whatever its name) is read with our checked reader as
``{name: tensor}``, never by ``torch.load`` (which hands files named ``*.safetensors`` to
the safetensors package, with its own errors); to decode one of our model checkpoints use
:func:`rcfd.io.modelfile.load_model_file`.

**Saving** goes through :func:`rcfd.io.files.atomic_write` (atomic, stale temporary
files removed, refused writes raised as :class:`~rcfd.errors.EnvironmentFailure`).
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch

from rcfd.io.files import atomic_write
from rcfd.io.safetensors import is_safetensors_file, read_safetensors
from rcfd.errors import CheckpointError, UnsafeCheckpointError

_PLAIN_LEAVES = (torch.Tensor, str, int, float, bool, type(None))
_ZIP_SLACK = 1 << 20  # bytes a zip's members may expand beyond twice the file's size


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
    """Write ``obj`` with ``torch.save`` through :func:`rcfd.io.files.atomic_write` (atomic;
    stale temporary files of ``path`` removed). Raises ``FileNotFoundError`` when the
    directory does not exist, ``TypeError`` for a value a safe load would refuse (before
    touching any file) and :class:`~rcfd.errors.EnvironmentFailure` when the machine refuses
    the write."""
    check_weights_only(obj)
    return atomic_write(path, lambda f: torch.save(obj, f), create_parents=False)


# ----------------------------------------------------------------------------- load
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                    verify: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors, each naming ``path``, for
    a missing, unreadable, empty, truncated, corrupt, oversized or unsafe file. ``verify``
    checks the CRC of every member of a zip-format checkpoint first (one extra read), which
    catches flipped bytes that ``torch.load`` would load silently. A safetensors file
    (module docstring) gives its ``{name: tensor}`` (on ``map_location`` when that is a
    device or its name, else on the CPU)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe or a device?)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written "
                              "completely; use an earlier checkpoint")
    if is_safetensors_file(path):
        tensors = read_safetensors(path)[0]
        if isinstance(map_location, (str, torch.device)) and str(map_location) != "cpu":
            tensors = {k: v.to(map_location) for k, v in tensors.items()}
        return tensors
    if magic == b"PK\x03\x04":
        _check_zip(path, size, verify)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL\s+([\w.]+)", str(e)) or _foreign_globals(path)
        if found:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it pickles {', '.join(found[:3])}, and loading it "
                "would run that code, which could do anything; rcfd loads only tensors and "
                "plain values and never runs code from a file. Use a checkpoint written by "
                "rcfd. If you made this file yourself and trust it, keep only its tensors and "
                "plain values (numpy arrays -> torch.from_numpy) and save those with "
                "rcfd.io.checkpoint.save_checkpoint."
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (unreadable pickle: {torch_reason(e)})") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError,
            AttributeError, MemoryError) as e:
        raise CheckpointError(f"could not load checkpoint {path}: it is truncated, corrupt, "
                              f"or not a torch.save file ({torch_reason(e)})") from None


def torch_reason(e: BaseException) -> str:
    """``"Type: what failed"`` from a torch load error, without torch's advice on how to
    load the file anyway (which would run any code in it) and without terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.*)", text)
    line = m.group(1) if m else (text.splitlines() or [""])[0]
    line = re.split(r"\.?\s*(?:Please use|Re-running|To load|Do it only|if you trust)", line)[0]
    if re.search(r"weights_only|trust", line, re.IGNORECASE) or not line.strip():
        return type(e).__name__
    return f"{type(e).__name__}: {line.strip()}"


def _foreign_globals(path: Path, limit: int = 3) -> list[str]:
    """Names of non-torch code objects a pickle imports, read with ``pickletools`` (which
    parses the opcodes and executes nothing). Used to explain a refused load when
    ``torch.load`` stopped before reaching them."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(pkl)  # its size was bounded by _check_zip
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


def _check_zip(path: Path, size: int, verify: bool) -> None:
    """Refuse a zip whose members expand far beyond the file (torch.save stores them
    uncompressed, and torch allocates each member's declared size), then check CRCs."""
    try:
        with zipfile.ZipFile(path) as z:
            expanded = sum(i.file_size for i in z.infolist())
            if expanded > 2 * size + _ZIP_SLACK:
                raise CheckpointError(
                    f"checkpoint {path} is a {size}-byte archive whose members expand to "
                    f"{expanded} bytes; torch.save stores them uncompressed, so it is crafted "
                    "or re-compressed: refused (re-save it with torch.save)")
            bad = z.testzip() if verify else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError,
            OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a complete "
                              f"zip archive: {e}); use an earlier checkpoint") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: member {bad!r} fails its CRC "
                              "check (damaged on disk or in transfer); use another copy")
