"""The safetensors format, read and written by our own code: model weights as raw tensor
bytes behind a JSON header, so loading a file runs no code and allocates no more than the
file's own size.

The format (https://github.com/huggingface/safetensors)::

    8 bytes   N, the header's length (unsigned little-endian)
    N bytes   a UTF-8 JSON object: {"<name>": {"dtype": "F32", "shape": [2, 3],
              "data_offsets": [begin, end]}, ..., "__metadata__": {"<key>": "<str>"}}
              (optionally padded with spaces)
    the rest  the data section: each tensor's bytes, little-endian, C order, at
              [begin, end) relative to the section's start

**Reading a hostile file.** Everything the header says is checked before any tensor memory
is allocated, and a violation is a :class:`~rcfd.errors.CheckpointError` naming the file
and the problem: the header length fits the file and :data:`MAX_HEADER_BYTES`; the header
is UTF-8, one JSON object, no name twice; every entry has a known dtype, a shape of
non-negative integers and two integer offsets; each entry's bytes (dtype size x elements)
are its offsets' span; the entries, sorted, tile the data section exactly from its start to
the end of the file (no overlap, no hole, nothing after); ``__metadata__`` maps strings to
strings. The tensors read then total the file's size less its header, at most.

**Writing** (:func:`save_safetensors`) goes through :func:`rcfd.io.files.atomic_write`;
entries are laid out by decreasing element size (then name), so each tensor's bytes are
aligned to its element size, as the safetensors package writes them.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch

from rcfd.errors import CheckpointError
from rcfd.io.files import atomic_write

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package's own cap (100 MB)
METADATA_KEY = "__metadata__"

# safetensors dtype names -> torch dtypes (those this torch build has)
_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "I32": "int32", "F32": "float32",
    "C64": "complex64", "U64": "uint64", "I64": "int64", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items()
                                  if isinstance(getattr(torch, v, None), torch.dtype)}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (checked: see the module docstring)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# ----------------------------------------------------------------------------- write
def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's values as little-endian bytes in C order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:
        raw = raw.reshape(-1, t.element_size()).flip(-1).reshape(-1)
    return memoryview(raw.numpy()).cast("B")


def write_safetensors_to(f: BinaryIO, tensors: Mapping[str, torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> tensor, any device; shared or strided ones are copied)
    and ``metadata`` (str -> str) to the binary stream ``f`` in the safetensors format.
    Raises ``TypeError`` for a name, tensor or metadata value of the wrong type and
    ``ValueError`` for a dtype the format has no name for, before writing anything."""
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; {bad[0]!r} does not")
    for k, v in tensors.items():
        if not isinstance(k, str) or k == METADATA_KEY:
            raise TypeError(f"a safetensors tensor name must be a str other than "
                            f"{METADATA_KEY!r}, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"safetensors entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.dtype not in _NAMES:
            raise ValueError(f"safetensors has no dtype for {k!r} ({v.dtype})")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {METADATA_KEY: meta} if meta else {}
    offset = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)  # the data section starts 8-byte aligned
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for k in order:
        if tensors[k].numel():
            f.write(_raw_bytes(tensors[k]))


def safetensors_bytes(tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` and ``metadata`` as bytes
    (:func:`write_safetensors_to`)."""
    buf = io.BytesIO()
    write_safetensors_to(buf, tensors, metadata)
    return buf.getvalue()


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None, *,
                     create_parents: bool = True) -> Path:
    """Write a safetensors file atomically (:func:`rcfd.io.files.atomic_write`: the old file
    or the new one, never a torn one). Bad input raises before any file is touched."""
    data = safetensors_bytes(tensors, metadata)
    return atomic_write(path, lambda f: f.write(data), create_parents=create_parents)


# ----------------------------------------------------------------------------- read
def _refuse(path: Any, problem: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file: {problem}; it is damaged, "
                           "truncated or crafted: use another copy")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {dup[:80]!r} appears twice")
    return d


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(path: Any, name: str, spec: Any, data_len: int) -> TensorEntry:
    where = f"entry {name[:80]!r}"
    if not isinstance(spec, dict):
        raise _refuse(path, f"{where} is not an object")
    unknown = set(spec) - {"dtype", "shape", "data_offsets"}
    if unknown or len(spec) != 3:
        raise _refuse(path, f"{where} must have exactly 'dtype', 'shape' and 'data_offsets' "
                            f"(has {sorted(spec)[:5]})")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise _refuse(path, f"{where} has unknown dtype {str(spec['dtype'])[:40]!r} (known: "
                            f"{', '.join(DTYPES)})")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _refuse(path, f"{where}: shape must be a list of non-negative integers, got "
                            f"{str(shape)[:60]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)):
        raise _refuse(path, f"{where}: data_offsets must be two non-negative integers, got "
                            f"{str(offsets)[:60]}")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise _refuse(path, f"{where}: data_offsets [{begin}, {end}] are outside the "
                            f"{data_len}-byte data section")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != end - begin:
        raise _refuse(path, f"{where}: shape {shape} of {spec['dtype']} is {numel * itemsize} "
                            f"bytes but its data_offsets span {end - begin}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_tiling(path: Any, entries: Mapping[str, TensorEntry], data_len: int) -> None:
    """The entries cover the data section exactly: no overlap, no hole, nothing after."""
    at, last = 0, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != at:
            what = (f"overlaps {last[:80]!r}" if e.begin < at
                    else f"leaves a hole of {e.begin - at} bytes before it")
            raise _refuse(path, f"entry {name[:80]!r} at [{e.begin}, {e.end}] {what}")
        at, last = e.end, name
    if at != data_len:
        raise _refuse(path, f"the tensors end at byte {at} of a {data_len}-byte data section "
                            "(trailing bytes)")


def _read_header(f: BinaryIO, path: Any, size: int) -> tuple[dict, int]:
    """The parsed JSON header and the data section's length."""
    if size < 8:
        raise _refuse(path, f"it is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise _refuse(path, f"its header length {n} exceeds the file's {size - 8} bytes after "
                            "the length field (truncated?)")
    if n > MAX_HEADER_BYTES:
        raise _refuse(path, f"its header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    raw = f.read(n)
    if len(raw) != n:
        raise _refuse(path, "it ended while its header was read (truncated)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _refuse(path, "its header is not UTF-8 text") from None
    except RecursionError:
        raise _refuse(path, "its header is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and _no_duplicates
        raise _refuse(path, f"its header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise _refuse(path, f"its header is a JSON {type(header).__name__}, not an object")
    return header, size - 8 - n


def _check_metadata(path: Any, meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _refuse(path, f"{METADATA_KEY} must map strings to strings")
    return meta


def _open(path: Path):
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a directory? pass the file)")
    try:
        return open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _header_from(f: BinaryIO, path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    size = os.fstat(f.fileno()).st_size
    header, data_len = _read_header(f, path, size)
    metadata = _check_metadata(path, header.pop(METADATA_KEY, None))
    entries = {k: _entry(path, k, v, data_len) for k, v in header.items()}
    _check_tiling(path, entries, data_len)
    return entries, metadata, size - data_len


def read_safetensors_header(path: str | os.PathLike
                            ) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The checked header of a safetensors file: ``({name: TensorEntry}, metadata)``,
    reading only the header. Raises :class:`~rcfd.errors.CheckpointError` naming the file
    and the problem (module docstring) for a missing, unreadable or invalid file."""
    path = Path(path)
    with _open(path) as f:
        entries, metadata, _ = _header_from(f, path)
    return entries, metadata


def _read_tensor(f: BinaryIO, path: Path, e: TensorEntry) -> torch.Tensor:
    raw = torch.empty(e.nbytes, dtype=torch.uint8)
    if e.nbytes and f.readinto(memoryview(raw.numpy())) != e.nbytes:
        raise _refuse(path, "it ended while its tensors were read (the file changed?)")
    itemsize = torch.empty((), dtype=e.dtype).element_size()
    if sys.byteorder == "big" and itemsize > 1:
        raw = raw.reshape(-1, itemsize).flip(-1).reshape(-1).contiguous()
    return raw.view(e.dtype).reshape(e.shape)


def read_safetensors(path: str | os.PathLike
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (CPU, each in its own memory) and its metadata:
    ``({name: tensor}, {key: str})``. The header is checked in full before any tensor is
    allocated (module docstring); a problem is a :class:`~rcfd.errors.CheckpointError`
    naming the file."""
    path = Path(path)
    with _open(path) as f:
        entries, metadata, start = _header_from(f, path)
        tensors = {}
        for name, e in sorted(entries.items(), key=lambda kv: kv[1].begin):
            f.seek(start + e.begin)
            tensors[name] = _read_tensor(f, path, e)
    return {k: tensors[k] for k in entries}, metadata


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is to be read as safetensors, by content: its ninth byte (the
    header's first) is ``{``, or it is named ``*.safetensors`` (so a truncated one is
    reported as such). A torch.save zip starts with ``PK`` and a legacy torch file with a
    pickle opcode, so neither is taken for one. Unreadable files are ``False``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if head[:2] == b"PK":
        return False
    return head[8:9] == b"{" or Path(path).suffix == ".safetensors"
