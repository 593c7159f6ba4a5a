"""Sample grids: images tiled into one PNG (a stage's periodic samples, the rows of a
results table). Pure functions of a tensor plus the file they write."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rcfd.data import to_uint8
from rcfd.io.files import atomic_write


def grid_shape(n: int, image_size: int, nrow: int | None = None, pad: int = 2,
               scale: int = 1) -> tuple[int, int]:
    """``(width, height)`` in pixels of the grid :func:`image_grid` makes of ``n`` images:
    ``nrow`` per row (default ``ceil(sqrt(n))``), ``pad`` pixels around every image, each
    image ``scale`` times its size."""
    if n < 1 or image_size < 1 or pad < 0 or scale < 1:
        raise ValueError(f"need n, image_size, scale >= 1 and pad >= 0; got {n}, {image_size}, {scale}, {pad}")
    cols = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cell = image_size * scale + pad
    return cols * cell + pad, rows * cell + pad


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2,
               scale: int = 1) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` (float in [-1, 1] or uint8, ``C`` 1 or 3) into one
    ``uint8 [height, width]`` (grey) or ``[height, width, 3]`` array on a white background,
    row-major, each image enlarged ``scale`` times (nearest neighbour)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be [N, 1 or 3, H, H], got {tuple(images.shape)}")
    u8 = images if images.dtype == torch.uint8 else to_uint8(images.detach().float().cpu())
    u8 = u8.cpu()
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, size = u8.shape[0], u8.shape[1], u8.shape[-1]
    width, height = grid_shape(n, images.shape[-1], nrow, pad, scale)
    cols = (width - pad) // (size + pad)
    canvas = np.full((c, height, width), 255, dtype=np.uint8)
    for i, img in enumerate(u8.numpy()):
        r, k = divmod(i, cols)
        y, x = pad + r * (size + pad), pad + k * (size + pad)
        canvas[:, y:y + size, x:x + size] = img
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
              pad: int = 2, scale: int = 1) -> Path:
    """Write :func:`image_grid` as a PNG (written to a temporary name, then renamed)."""
    grid = Image.fromarray(image_grid(images, nrow, pad, scale))
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))


def display_scale(image_size: int, target: int = 32) -> int:
    """How much to enlarge small images in a grid so each is at least ``target`` pixels."""
    return max(1, target // image_size)
