"""Datasets: the embedded ``digits`` default, CIFAR-10 from a local copy, and image folders.

Every dataset is held in memory as ``uint8 [N, C, H, W]`` (CIFAR-10 is 150 MiB; a folder is
decoded, resized and cropped once, after which it is ``N * C * size**2`` bytes, so loading it
eagerly costs one pass of decoding and makes every training step a tensor gather instead of
file I/O). Images map to ``[-1, 1]`` with :func:`to_float` and back with :func:`to_uint8`;
the two are exact inverses on the 256 levels.

The training iterator over a dataset (:func:`rcfd.loader.batches`) is in :mod:`rcfd.loader`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ("digits", "cifar10", "folder")
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32}
DEFAULT_CHANNELS = {"digits": 1, "cifar10": 3, "folder": 3}
DIGITS_TEST_PER_CLASS = 30  # 10 classes -> 300 test / 1,497 train
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_DIR, CIFAR_ARCHIVE = "cifar-10-batches-py", "cifar-10-python.tar.gz"
_MAX_MEMBER_BYTES = 256 << 20  # an official batch is ~31 MiB


# --------------------------------------------------------------------------- conversions


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` in ``0..255`` -> float in ``[-1, 1]``: ``x = u / 127.5 - 1``, computed once
    per dtype on the CPU and looked up, so every device gives the same bits (a GPU divides
    by a scalar as a multiplication by its reciprocal, one rounding off)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    return _float_table(dtype, images.device)[images.int()]


@functools.lru_cache(maxsize=None)
def _float_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (torch.arange(256, dtype=torch.uint8).to(dtype) / 127.5 - 1).to(device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in ``[-1, 1]`` -> ``uint8``: ``u = clamp(round((x + 1) * 127.5), 0, 255)``, the
    exact inverse of :func:`to_float`. torch-fidelity takes uint8 images as they are (its
    Inception maps ``u -> (u - 128) / 128`` itself); its example generator truncates instead
    of rounding, which biases every pixel by half a level. No host sync (graph-safe); NaN is
    undefined, so callers that may produce it check first."""
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 takes float images in [-1, 1], got {x.dtype}")
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of float ``[N, C, h, w]`` in [-1, 1] (antialiased when shrinking),
    clamped back to [-1, 1] (bicubic overshoots at edges)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def _set_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` to 1 channel (ITU-R 601 luma, as PIL's ``L``) or 3 (replicated)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
        return (images.to(torch.float64) * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


# --------------------------------------------------------------------------- spec and dataset


@dataclass(frozen=True)
class DatasetSpec:
    """Which images to train on. ``image_size`` and ``channels`` default to the dataset's own
    (digits: 16 px, 1 channel; cifar10: 32 px, 3 channels); a folder needs ``image_size``.
    ``path``: the CIFAR-10 copy (``cifar-10-batches-py`` folder, a folder holding it, or
    ``cifar-10-python.tar.gz``) or the image folder. ``split_seed``: digits' fixed split."""

    name: str = "digits"
    path: str | None = None
    image_size: int | None = None
    channels: int | None = None
    split_seed: int = 0

    def __post_init__(self):
        if self.name not in DATASET_NAMES:
            raise ValueError(f"DatasetSpec.name must be one of {DATASET_NAMES}, got {self.name!r}")
        if self.name == "digits" and self.path is not None:
            raise ValueError("DatasetSpec.path: the digits dataset is embedded; leave path unset")
        if self.name != "digits" and not self.path:
            raise ValueError(f"DatasetSpec.path is required for {self.name!r}: point it at the local copy")
        size = DEFAULT_IMAGE_SIZE.get(self.name) if self.image_size is None else self.image_size
        if size is None:
            raise ValueError("DatasetSpec.image_size is required for a folder dataset (e.g. 32 or 64)")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"DatasetSpec.image_size must be a positive integer, got {size!r}")
        channels = DEFAULT_CHANNELS[self.name] if self.channels is None else self.channels
        if channels not in (1, 3):
            raise ValueError(f"DatasetSpec.channels must be 1 or 3, got {channels!r}")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "channels", channels)
        if self.path is not None:  # "~/data/cifar" works from a config file or --set too
            object.__setattr__(self, "path", os.path.expanduser(os.fspath(self.path)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetSpec":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"DatasetSpec: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """In-memory images ``uint8 [N, C, H, W]``, labels ``int64 [N]`` (``None`` when
    unlabeled, with ``num_classes == 0``)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    name: str
    split: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"images must be uint8 [N, C, H, H], got {x.dtype} {tuple(x.shape)}")
        if y is not None and (y.dtype != torch.int64 or y.shape != (x.shape[0],)):
            raise ValueError(f"labels must be int64 [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}")
        if (y is None) != (self.num_classes == 0):
            raise ValueError("num_classes must be 0 exactly when labels are None")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def to_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return to_float(self.images, dtype)

    def fingerprint(self) -> str:
        """sha256 of the images and labels: names this exact data in caches."""
        h = hashlib.sha256(repr(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()


def load_dataset(spec: DatasetSpec, split: str = "train") -> ImageDataset:
    """Load ``spec``'s ``split`` ("train" or "test"; a folder has only "train")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    loader = {"digits": _load_digits, "cifar10": _load_cifar10, "folder": _load_folder}[spec.name]
    return loader(spec, split)


# --------------------------------------------------------------------------- digits


def digits_split(labels: np.ndarray, seed: int = 0, per_class: int = DIGITS_TEST_PER_CLASS) -> np.ndarray:
    """Boolean test mask: ``per_class`` images of each class, drawn with numpy's legacy
    ``RandomState(seed)`` (a stream numpy keeps frozen, so the split is the same everywhere)."""
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[idx[rng.permutation(len(idx))[:per_class]]] = True
    return test


def _load_digits(spec: DatasetSpec, split: str) -> ImageDataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: never downloads

    d = load_digits()
    test = digits_split(d.target, spec.split_seed)
    keep = test if split == "test" else ~test
    x = torch.from_numpy(d.images[keep]).to(torch.float64).unsqueeze(1) / 8 - 1  # 0..16 -> [-1, 1]
    images = _set_channels(to_uint8(_resize(x, spec.image_size)), spec.channels)
    labels = torch.from_numpy(d.target[keep]).to(torch.int64)
    return ImageDataset(images, labels, 10, "digits", split, tuple(str(i) for i in range(10)))


# --------------------------------------------------------------------------- CIFAR-10


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
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:  # truncated or garbage stream
        raise ValueError(f"{where}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()} if isinstance(obj, dict) else {}
    data = d.get("data")
    try:
        labels = np.asarray(d.get("labels"), dtype=np.int64)
    except (TypeError, ValueError):
        labels = np.zeros(0, np.int64)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"keys {sorted(map(str, d))}, b'data' {getattr(data, 'dtype', type(data).__name__)} " \
              f"{getattr(data, 'shape', '')}" if d else type(obj).__name__
        raise ValueError(f"{where}: expected a dict with b'data' = uint8 array [N, 3072] and b'labels' = N "
                         f"ints in 0..9 (the official python-format batch); got {got}")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"{where}: b'labels' must be {data.shape[0]} ints in 0..9 (the official python-format batch)")
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
                    raise ValueError(f"{path}: member {m.name} is {m.size} bytes, too large for a CIFAR-10 batch")
                blobs[n] = tar.extractfile(m).read()  # read in memory; nothing is extracted to disk
            return blobs
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(
            f"{path}: unreadable or truncated archive ({type(e).__name__}: {e}); expected the official "
            f"{CIFAR_ARCHIVE}: download it again, or extract it and pass the {CIFAR_DIR} folder"
        ) from None


def _load_cifar10(spec: DatasetSpec, split: str) -> ImageDataset:
    src, names = _cifar_source(spec.path), CIFAR_FILES[split]
    wanted = names + ("batches.meta",)
    if os.path.isdir(src):
        blobs = {}
        for n in wanted:
            if os.path.isfile(os.path.join(src, n)):
                with open(os.path.join(src, n), "rb") as fh:
                    blobs[n] = fh.read()
    else:
        blobs = _read_archive(src, wanted)
    missing = [n for n in names if n not in blobs]
    if missing:
        raise ValueError(
            f"{src}: missing CIFAR-10 batch file(s) {missing} for split {split!r}; expected "
            f"{list(names)} (the {CIFAR_DIR} folder of the official {CIFAR_ARCHIVE})"
        )
    parts = [_unpickle_batch(blobs[n], f"{src}:{n}") for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)  # rows: R, G, B planes
    images = torch.from_numpy(data)
    if spec.image_size != 32:
        images = to_uint8(_resize(to_float(images, torch.float64), spec.image_size))
    images = _set_channels(images, spec.channels)
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


# --------------------------------------------------------------------------- image folders


def _load_image(path: str, size: int, channels: int) -> np.ndarray:
    """Decode, honour EXIF orientation, convert, resize the short side to ``size`` (PIL
    bicubic, antialiased) and center-crop: ``uint8 [C, size, size]``."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except Exception as e:
        raise ValueError(f"{path}: cannot read this image ({type(e).__name__}: {e}); fix or remove it") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def find_images(root: str) -> list[str]:
    """All ``.png/.jpg/.jpeg`` files under ``root`` (recursive, case-insensitive), sorted."""
    out = []
    for d, _, files in os.walk(root, followlinks=True):
        out += [os.path.join(d, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(out)


def _load_folder(spec: DatasetSpec, split: str) -> ImageDataset:
    if split != "train":
        raise ValueError("a folder dataset has only split='train'; point a second spec at a held-out folder")
    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"image folder {spec.path!r} does not exist or is not a folder")
    files = find_images(spec.path)
    if not files:
        raise ValueError(
            f"image folder {spec.path!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files (searched "
            "recursively); point path at a folder of images"
        )
    images = torch.from_numpy(np.stack([_load_image(f, spec.image_size, spec.channels) for f in files]))
    return ImageDataset(images, None, 0, "folder", split)
