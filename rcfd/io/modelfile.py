"""Model checkpoints on disk: written as safetensors, read in either format by content.

**Writing** (:func:`save_model_checkpoint`): a checkpoint dict (our format,
:mod:`rcfd.io.checkpoint`) becomes one safetensors file. Every tensor in it, at any depth
(``state_dict``, ``ema_state_dict``, a tensor in ``extra``), is stored as a tensor named by
its path (``state_dict.conv.weight``, ``extra.x_T``); every top-level field is one
``__metadata__`` entry holding its value as JSON, each tensor replaced by
``{"__tensor__": "<its name>"}``, and ``__rcfd__`` gives the encoding's version. Any field
holding JSON values and tensors is carried as it is, so a new field needs no change here.
Tuples are stored as lists (our configs' ``to_dict`` already gives lists).

**Reading** (:func:`load_model_file`) goes by content, not by name: a safetensors file
(:func:`rcfd.io.safetensors.is_safetensors_file`) is read with our checked reader and, if it
carries ``__rcfd__``, decoded back to the checkpoint dict (every tensor reference checked
against the header, and every tensor referenced once, before any tensor is read); one
without it (a plain state dict) reads as ``{name: tensor}``. Anything else (our older
``.pt`` checkpoints, the reference code's files) goes to
:func:`rcfd.io.safeload.load_checkpoint`, the guarded ``torch.load``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from rcfd.errors import CheckpointError
from rcfd.io.safeload import load_checkpoint
from rcfd.io.safetensors import (METADATA_KEY, is_safetensors_file, read_safetensors,
                                 read_safetensors_header, save_safetensors)

ENCODING_KEY = "__rcfd__"
ENCODING_VERSION = "1"
TENSOR_KEY = "__tensor__"
MODEL_SUFFIX = ".safetensors"


# ----------------------------------------------------------------------------- encode
class _Encoder:
    """Replaces tensors by references, collecting them under unique path names."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def name(self, path: list[str]) -> str:
        base = ".".join(path) or "tensor"
        name, i = base, 1
        while name in self.tensors or name in (METADATA_KEY, ENCODING_KEY):
            name, i = f"{base}#{i}", i + 1
        return name

    def __call__(self, v: Any, path: list[str]) -> Any:
        where = "checkpoint" + "".join(f"[{p!r}]" for p in path)
        if isinstance(v, torch.Tensor):
            name = self.name(path)
            self.tensors[name] = v
            return {TENSOR_KEY: name}
        if v is None or isinstance(v, (str, bool, int, float)):
            return v
        if isinstance(v, Mapping):
            bad = next((k for k in v if not isinstance(k, str)), None)
            if bad is not None:
                raise TypeError(f"{where}: key {bad!r} must be a str (a safetensors "
                                "checkpoint stores its fields as JSON)")
            if list(v) == [TENSOR_KEY]:
                raise TypeError(f"{where}: a dict whose only key is {TENSOR_KEY!r} is reserved "
                                "for tensor references")
            return {k: self(x, path + [k]) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [self(x, path + [str(i)]) for i, x in enumerate(v)]
        raise TypeError(f"{where} is a {type(v).__module__}.{type(v).__qualname__}; a "
                        "safetensors checkpoint holds tensors and JSON values (str, int, float, "
                        "bool, None, lists, dicts with str keys) only")


def checkpoint_to_safetensors(ckpt: Mapping[str, Any]
                              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a checkpoint dict (module docstring). Raises
    ``TypeError`` naming the first value that is neither a tensor nor JSON."""
    encode, metadata = _Encoder(), {ENCODING_KEY: ENCODING_VERSION}
    for key, value in ckpt.items():
        if not isinstance(key, str) or key in (ENCODING_KEY, METADATA_KEY):
            raise TypeError(f"checkpoint field {key!r} must be a str other than "
                            f"{ENCODING_KEY!r} and {METADATA_KEY!r}")
        metadata[key] = json.dumps(encode(value, [key]), ensure_ascii=False)
    return encode.tensors, metadata


def save_model_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint dict as one safetensors file, atomically
    (:func:`rcfd.io.files.atomic_write`). ``TypeError`` for a value a safetensors
    checkpoint cannot hold and ``FileNotFoundError`` for a missing directory, both before
    any file is touched; :class:`~rcfd.errors.EnvironmentFailure` when the machine refuses
    the write."""
    tensors, metadata = checkpoint_to_safetensors(ckpt)
    return save_safetensors(path, tensors, metadata, create_parents=False)


# ----------------------------------------------------------------------------- decode
def _decode(v: Any, lookup: Callable[[str], Any], seen: set[str]) -> Any:
    if isinstance(v, dict):
        if list(v) == [TENSOR_KEY]:
            name = v[TENSOR_KEY]
            if not isinstance(name, str) or name in seen:
                raise ValueError(f"tensor reference {str(name)[:80]!r} is not a name or is "
                                 "used twice")
            seen.add(name)
            return lookup(name)
        return {k: _decode(x, lookup, seen) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x, lookup, seen) for x in v]
    return v


def checkpoint_from_safetensors(tensors: Mapping[str, Any], metadata: Mapping[str, str],
                                source: Any = "checkpoint") -> dict[str, Any]:
    """The checkpoint dict that :func:`checkpoint_to_safetensors` encoded. ``tensors`` may
    be the header's entries (to check a file before reading its tensors). Raises
    :class:`~rcfd.errors.CheckpointError` naming ``source`` and the field for an unknown
    encoding version, a field that is not JSON, a reference to a missing tensor or one
    used twice, or a tensor no field references."""
    version = metadata.get(ENCODING_KEY)
    if version != ENCODING_VERSION:
        raise CheckpointError(f"{source} is an rcfd safetensors checkpoint of encoding "
                              f"{str(version)[:20]!r}; this rcfd reads {ENCODING_VERSION!r}: "
                              "upgrade rcfd")

    def lookup(name: str) -> Any:
        if name not in tensors:
            raise ValueError(f"it refers to tensor {name[:80]!r}, which the file does not hold")
        return tensors[name]

    ckpt, seen = {}, set()
    for key, text in metadata.items():
        if key == ENCODING_KEY:
            continue
        try:
            ckpt[key] = _decode(json.loads(text), lookup, seen)
        except RecursionError:
            raise CheckpointError(f"{source}: field {key[:80]!r} is nested too deeply; the "
                                  "file is damaged") from None
        except ValueError as e:  # json.JSONDecodeError and the reference checks
            raise CheckpointError(f"{source}: field {key[:80]!r} is invalid ({str(e)[:120]}); "
                                  "the file is damaged or was not written by rcfd") from None
    unused = [k for k in tensors if k not in seen]
    if unused:
        raise CheckpointError(f"{source} holds {len(unused)} tensors no field refers to "
                              f"({', '.join(repr(k[:60]) for k in unused[:3])}); the file is "
                              "damaged or was not written by rcfd")
    return ckpt


def load_model_file(path: str | os.PathLike) -> Any:
    """What a checkpoint file holds, the format found by content (module docstring): a
    checkpoint dict (safetensors of ours, or any ``.pt`` through the guarded ``torch.load``),
    or ``{name: tensor}`` for a plain safetensors file. Every problem is a
    :class:`~rcfd.errors.CheckpointError` naming the file (a missing one a
    ``FileNotFoundError``, as :func:`~rcfd.io.safeload.load_checkpoint` raises)."""
    path = Path(path)
    if not (path.is_file() and is_safetensors_file(path)):
        return load_checkpoint(path)
    entries, metadata = read_safetensors_header(path)
    if ENCODING_KEY not in metadata:
        return read_safetensors(path)[0]
    checkpoint_from_safetensors(entries, metadata, path)  # refuse before reading any tensor
    tensors, metadata = read_safetensors(path)
    return checkpoint_from_safetensors(tensors, metadata, path)
