"""A folder of images (PNG/JPEG, searched recursively): decoded, converted to 8 bits,
resized and center-cropped once into memory. Unlabelled.

Which files:
  every ``.png``, ``.jpg`` and ``.jpeg`` (any case) under the folder. Symbolic links are
  followed, but each directory is entered once (by device and inode, so a link loop ends)
  and each file is read once (by device and inode: a symbolic or hard link to an image
  already found adds nothing; the first of its paths in sorted order names it).

Problems, each an error naming the file:
  a broken link with an image extension, a pipe or device with one, a folder that cannot
  be listed, a file that cannot be opened, an empty file, a file that is not an image, and
  an image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (a decompression bomb, or a
  photo too large to decode for a small training image; raise that limit to read it). All
  of them are reported together (a few named, the rest counted), so one run finds them all;
  nothing is skipped silently. A broken link without an image extension is skipped with a
  warning.

Pixels: every mode becomes 8 bits of the requested channels, computed from its own samples
(:func:`to_8bit`): ``v -> round(255 v / (2**bits - 1))`` (16-bit: ``v * 255 / 65535``;
Pillow itself keeps only the high byte of 16-bit colour, so those are re-read in full);
transparency (an alpha channel, a tRNS colour key, a palette's alpha) is composited over
white, ``c a + (1 - a)`` in ``[0, 1]`` units, so a transparent pixel reads as white; a
palette goes through RGB(A); CMYK through Pillow's CMYK -> RGB; grey to RGB is repeated;
RGB to grey is ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``; rounding happens once, last.
EXIF orientation is applied. Then the short side is resized to ``image_size`` (Pillow
bicubic, antialiased) and the center cropped.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rcfd.data.images import DatasetSpec, ImageDataset
from rcfd.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L" and images.set_channels
_CHUNK_PIXELS = 1 << 20  # float64 work per conversion step: <= 32 MiB
_SHOW = 5  # problems named in one error; the rest are counted
# 16-bit colour PNGs: Pillow's rawmode -> the rawmode that decodes the low bytes instead
_PNG16_LOW = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_GREY_BITS = {"1": 1, "L;2": 2, "L;4": 4}  # low-bit grey PNGs, scaled to 0..255 by Pillow
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, 3),
           7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


# --------------------------------------------------------------------------- pixels
def to_8bit(samples: np.ndarray, bits: int, alpha: bool, channels: int) -> np.ndarray:
    """``samples [H, W, K]`` of ``bits`` bits (colour channels, then alpha when ``alpha``)
    -> ``uint8 [H, W, channels]``: scaled to ``[0, 1]`` by ``2**bits - 1``, composited over
    white, grey <-> RGB (601 luma), times 255, rounded once. Converted in row blocks, so
    the float64 work stays small for any image."""
    colour = samples.shape[-1] - alpha
    if colour not in (1, 3) or channels not in (1, 3):
        raise ValueError(f"cannot convert {colour}-channel samples to {channels} channels")
    if bits == 8 and not alpha and colour == channels:
        return samples.astype(np.uint8)
    out = np.empty(samples.shape[:2] + (channels,), np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, samples.shape[1]))
    for r in range(0, samples.shape[0], rows):
        x = samples[r:r + rows].astype(np.float64) / (2 ** bits - 1)
        if alpha:
            a = x[..., -1:]
            x = x[..., :-1] * a + (1.0 - a)  # over white
        if colour == 3 and channels == 1:
            x = x @ LUMA[:, None]
        elif colour == 1 and channels == 3:
            x = np.repeat(x, 3, axis=-1)
        out[r:r + rows] = np.rint(x * 255.0)
    return out


def _rawmode(im: Image.Image) -> str:
    args = im.tile[0][3] if im.tile else None
    return args if isinstance(args, str) else (args[0] if args else "")


def _decode_as(path: str, rawmode: str) -> np.ndarray:
    """The first frame of a PNG decoded with another of Pillow's unpackers (same bytes per
    pixel, so the PNG filters undo the same way)."""
    with Image.open(path) as im:
        t = im.tile[0]
        im.tile = [t._replace(args=rawmode) if hasattr(t, "_replace") else (*t[:3], rawmode)]
        return np.asarray(im)


def _with_key(a: np.ndarray, key, bits: int) -> tuple[np.ndarray, int, bool]:
    """Samples plus an alpha channel from a tRNS colour key (0 where a pixel equals it)."""
    a = a.reshape(a.shape[:2] + (-1,))
    hit = np.all(a == np.asarray(key, dtype=np.int64).reshape(-1)[: a.shape[-1]], axis=-1)
    alpha = np.where(hit, 0, 2 ** bits - 1).astype(a.dtype)
    return np.concatenate([a, alpha[..., None]], axis=-1), bits, True


def read_samples(im: Image.Image, path: str) -> tuple[np.ndarray, int, bool]:
    """``(samples [H, W, K], bits, alpha)`` of an opened, not yet loaded image (the colour
    channels, then alpha when ``alpha``), each mode read in full (module docstring)."""
    mode, raw, key = im.mode, _rawmode(im), im.info.get("transparency")
    if raw in _PNG16_LOW:  # Pillow keeps the high bytes; decode the low ones too
        a = np.asarray(im).astype(np.uint16) * 256 + _decode_as(path, _PNG16_LOW[raw])
        return _with_key(a, key, 16) if isinstance(key, tuple) else (a, 16, mode == "RGBA")
    if raw == "LA;16B":  # grey + alpha, 16 bits: Pillow gives RGBA of high bytes
        b = _decode_as(path, "RGBA").astype(np.uint16)  # L hi, L lo, A hi, A lo
        return np.stack([b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]], -1), 16, True
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        a = np.clip(np.asarray(im), 0, 65535)[..., None]
        return _with_key(a, key, 16) if isinstance(key, int) else (a, 16, False)
    if mode in ("1", "L"):
        a = np.asarray(im.convert("L"))[..., None]
        if isinstance(key, int):  # the key is in the file's bit depth
            bits = _GREY_BITS.get(raw, 8)
            return _with_key(a, key * 255 // (2 ** bits - 1), 8)
        return a, 8, False
    if mode == "RGB" and isinstance(key, tuple):
        return _with_key(np.asarray(im), key, 8)
    if mode in ("LA", "La"):
        return np.asarray(im.convert("LA")), 8, True
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and key is not None):
        return np.asarray(im.convert("RGBA")), 8, True
    return np.asarray(im.convert("RGB")), 8, False  # RGB, P, CMYK, YCbCr, LAB, HSV, ...


def _too_large(path: str, what: str) -> DataError:
    return DataError(f"{path}: cannot read this image: too large to decode ({what}; the limit is "
                     f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): a decompression "
                     "bomb or an oversized photo; shrink it, or raise that limit if you trust it")


def _load_image(path: str, size: int, channels: int) -> np.ndarray:
    """Decode, convert (:func:`read_samples`, :func:`to_8bit`), honour EXIF orientation,
    resize the short side to ``size`` (PIL bicubic, antialiased) and center-crop:
    ``uint8 [C, size, size]``. Raises :class:`DataError` naming ``path``."""
    try:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: cannot read this image: the file is empty (0 bytes); fix "
                            "or remove it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(path) as im:
                w, h = im.size
                if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
                    raise _too_large(path, f"{w}x{h} = {w * h} pixels")
                samples, bits, alpha = read_samples(im, path)
                orientation = im.getexif().get(0x0112, 1)
        a = to_8bit(samples, bits, alpha, channels)
        a = np.ascontiguousarray(_ORIENT.get(orientation, lambda x: x)(a))
        img = Image.fromarray(a[..., 0] if channels == 1 else a)
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        a = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check, at twice the limit
        raise _too_large(path, str(e).split(",")[0]) from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: cannot read this image: not a PNG or JPEG that Pillow can "
                        "identify; fix or remove it") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise DataError(f"{path}: cannot read this image ({type(e).__name__}: {e}); fix or "
                        "remove it") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# --------------------------------------------------------------------------- files
def _scan(root: str) -> tuple[list[str], list[str]]:
    """``(images, problems)`` under ``root`` (module docstring: links, loops, duplicates)."""
    seen_dirs, files, problems, stack = set(), {}, [], [root]
    while stack:
        d = stack.pop()
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            problems.append(f"{d}: cannot list this folder ({e.strerror or e})")
            continue
        subdirs = []
        for entry in entries:
            image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                st = os.stat(entry.path)  # follows links
            except OSError as e:
                if not entry.is_symlink():
                    problems.append(f"{entry.path}: cannot read it ({e.strerror or e})")
                elif image:
                    problems.append(f"{entry.path}: a broken symbolic link (to "
                                    f"{os.readlink(entry.path)!r}); fix or remove it")
                else:
                    warnings.warn(f"{entry.path}: broken symbolic link skipped", stacklevel=3)
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.path)
            elif image and not stat.S_ISREG(st.st_mode):
                problems.append(f"{entry.path}: not a regular file (a pipe or a device?)")
            elif image:
                files.setdefault((st.st_dev, st.st_ino), []).append(entry.path)
        stack.extend(reversed(subdirs))
    return sorted(min(paths) for paths in files.values()), problems


def _problems(title: str, problems: list[str]) -> DataError:
    more = f"; ... and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
    return DataError(f"{title}: {len(problems)} problem(s): " + "; ".join(problems[:_SHOW]) + more)


def find_images(root: str) -> list[str]:
    """The ``.png/.jpg/.jpeg`` files under ``root`` (recursive, case-insensitive, each file
    once), sorted; a :class:`DataError` lists broken links and unreadable entries."""
    files, problems = _scan(root)
    if problems:
        raise _problems(f"image folder {root!r}", problems)
    return files


def load_folder(spec: DatasetSpec, split: str) -> ImageDataset:
    if split != "train":
        raise ValueError("a folder dataset has only split='train'; point a second spec at a held-out folder")
    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"image folder {spec.path!r} does not exist or is not a folder")
    files = find_images(spec.path)
    if not files:
        raise DataError(
            f"image folder {spec.path!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files (searched "
            "recursively); point path at a folder of images"
        )
    images, problems = [], []
    for f in files:
        try:
            images.append(_load_image(f, spec.image_size, spec.channels))
        except DataError as e:
            problems.append(str(e))
    if problems:
        raise _problems(f"image folder {spec.path!r}", problems)
    return ImageDataset(torch.from_numpy(np.stack(images)), None, 0, "folder", split)
