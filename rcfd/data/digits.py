"""The embedded default dataset: scikit-learn's bundled 8x8 digits (never downloaded),
upsampled, with a fixed per-class train/test split."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits as _sklearn_digits  # bundled: never downloads

from rcfd.data.images import DatasetSpec, ImageDataset, resize, set_channels, to_uint8

DIGITS_TEST_PER_CLASS = 30  # 10 classes -> 300 test / 1,497 train


def digits_split(labels: np.ndarray, seed: int = 0, per_class: int = DIGITS_TEST_PER_CLASS) -> np.ndarray:
    """Boolean test mask: ``per_class`` images of each class, drawn with numpy's legacy
    ``RandomState(seed)`` (a stream numpy keeps frozen, so the split is the same everywhere)."""
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[idx[rng.permutation(len(idx))[:per_class]]] = True
    return test


def load_digits(spec: DatasetSpec, split: str) -> ImageDataset:
    d = _sklearn_digits()
    test = digits_split(d.target, spec.split_seed)
    keep = test if split == "test" else ~test
    x = torch.from_numpy(d.images[keep]).to(torch.float64).unsqueeze(1) / 8 - 1  # 0..16 -> [-1, 1]
    images = set_channels(to_uint8(resize(x, spec.image_size)), spec.channels)
    labels = torch.from_numpy(d.target[keep]).to(torch.int64)
    return ImageDataset(images, labels, 10, "digits", split, tuple(str(i) for i in range(10)))
