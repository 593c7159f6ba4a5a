"""CIFAR-10 from the user's local copy (the python-format batches, as a folder or the
``.tar.gz``), read with a restricted unpickler that admits only arrays: nothing is downloaded,
and nothing in a file can run."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib

import numpy as np
import torch

from rcfd.data.images import DatasetSpec, ImageDataset, resize, set_channels, to_float, to_uint8
from rcfd.errors import DataError

CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_DIR, CIFAR_ARCHIVE = "cifar-10-batches-py", "cifar-10-python.tar.gz"
_MAX_MEMBER_BYTES = 256 << 20  # an official batch is ~31 MiB


class _Refused(pickle.UnpicklingError):
    """A global (or codec) outside what the official CIFAR-10 files use."""


def _latin1_encode(text, encoding="latin1"):
    """The one use Python-3 pickles make of ``_codecs.encode``: bytes as latin-1 text."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,  # the official (numpy 1) name
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,  # numpy >= 2 re-pickles
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,  # bytes in protocol-2 pickles written by Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR-10 batches hold (dicts, lists, strings, ints and
    uint8 numpy arrays); any other global is refused before it is looked up, so nothing in
    the file can run."""

    def find_class(self, module, name):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only numpy "
                "arrays, lists and strings, so this file is not an official batch (or was "
                "tampered with); use the cifar-10-python.tar.gz from the CIFAR-10 site"
            ) from None


def _unpickle_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # truncated or garbage stream
        raise DataError(f"{where}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()} if isinstance(obj, dict) else {}
    data = d.get("data")
    raw = d.get("labels")
    ints = (isinstance(raw, np.ndarray) and raw.dtype.kind in "iu") or (
        isinstance(raw, (list, tuple)) and all(type(v) is int for v in raw))  # no floats, bools
    try:
        labels = np.asarray(raw, dtype=np.int64) if ints else np.zeros(0, np.int64)
    except OverflowError:  # ints beyond int64
        labels = np.zeros(0, np.int64)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"keys {sorted(map(str, d))}, b'data' {getattr(data, 'dtype', type(data).__name__)} " \
              f"{getattr(data, 'shape', '')}" if d else type(obj).__name__
        raise DataError(f"{where}: expected a dict with b'data' = uint8 array [N, 3072] and b'labels' = N "
                        f"ints in 0..9 (the official python-format batch); got {got}")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{where}: b'labels' must be {data.shape[0]} ints in 0..9 (the official python-format batch)")
    return data, labels


def _cifar_source(path: str) -> str:
    """The batches folder or archive that ``path`` names or holds."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"CIFAR-10 path {path!r} does not exist: pass the extracted {CIFAR_DIR} folder or "
            f"the {CIFAR_ARCHIVE} archive (download it yourself; nothing is fetched)"
        )
    if os.path.isdir(path):
        for inner in (CIFAR_DIR, CIFAR_ARCHIVE):
            if os.path.exists(os.path.join(path, inner)) and not os.path.exists(os.path.join(path, "test_batch")):
                return os.path.join(path, inner)
    return path


def _read_archive(path: str, names: tuple[str, ...]) -> dict[str, bytes]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            found = {n: members[n] for n in names if n in members}
            blobs = {}
            for n, m in found.items():
                if m.size > _MAX_MEMBER_BYTES:
                    raise DataError(f"{path}: member {m.name} is {m.size} bytes, too large for a CIFAR-10 batch")
                blobs[n] = tar.extractfile(m).read()  # read in memory; nothing is extracted to disk
            return blobs
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"{path}: unreadable or truncated archive ({type(e).__name__}: {e}); expected the official "
            f"{CIFAR_ARCHIVE}: download it again, or extract it and pass the {CIFAR_DIR} folder"
        ) from None


def _read_folder(folder: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The named regular files of ``folder`` (absent ones are left out), each checked for
    size before it is read."""
    blobs = {}
    for n in names:
        path = os.path.join(folder, n)
        if not os.path.isfile(path):
            continue
        try:
            if os.path.getsize(path) > _MAX_MEMBER_BYTES:
                raise DataError(f"{path} is {os.path.getsize(path)} bytes, too large for a "
                                "CIFAR-10 batch (~31 MiB); it is not an official batch file")
            with open(path, "rb") as fh:
                blobs[n] = fh.read()
        except OSError as e:
            raise DataError(f"{path}: cannot read this CIFAR-10 file ({e.strerror or e})") from None
    return blobs


def load_cifar10(spec: DatasetSpec, split: str) -> ImageDataset:
    src, names = _cifar_source(spec.path), CIFAR_FILES[split]
    wanted = names + ("batches.meta",)
    blobs = _read_folder(src, wanted) if os.path.isdir(src) else _read_archive(src, wanted)
    missing = [n for n in names if n not in blobs]
    if missing:
        raise DataError(
            f"{src}: missing CIFAR-10 batch file(s) {missing} for split {split!r}; expected "
            f"{list(names)} (the {CIFAR_DIR} folder of the official {CIFAR_ARCHIVE})"
        )
    parts = [_unpickle_batch(blobs[n], f"{src}:{n}") for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)  # rows: R, G, B planes
    images = torch.from_numpy(data)
    if spec.image_size != 32:
        images = to_uint8(resize(to_float(images, torch.float64), spec.image_size))
    images = set_channels(images, spec.channels)
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageDataset(images, labels, 10, "cifar10", split, _cifar_class_names(blobs.get("batches.meta")))


def _cifar_class_names(blob: bytes | None) -> tuple[str, ...]:
    """``label_names`` from ``batches.meta`` (read with the same restricted unpickler); the
    names are cosmetic, so a missing or odd meta file gives ``()`` rather than an error."""
    try:
        meta = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load() if blob else {}
        names = meta.get(b"label_names", meta.get("label_names", ()))
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        return names if len(names) == 10 else ()
    except Exception:
        return ()
