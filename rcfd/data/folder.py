"""A folder of images (PNG/JPEG, searched recursively): decoded, resized and center-cropped
once into memory. Unlabelled."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from rcfd.data.images import DatasetSpec, ImageDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _load_image(path: str, size: int, channels: int) -> np.ndarray:
    """Decode, honour EXIF orientation, convert, resize the short side to ``size`` (PIL
    bicubic, antialiased) and center-crop: ``uint8 [C, size, size]``."""
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


def load_folder(spec: DatasetSpec, split: str) -> ImageDataset:
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
