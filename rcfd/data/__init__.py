"""Data along its flow: a :class:`DatasetSpec` names the images, :func:`load_dataset` reads a
split of them into an in-memory :class:`ImageDataset` (the embedded digits in
:mod:`~rcfd.data.digits`, CIFAR-10 files in :mod:`~rcfd.data.cifar10`, image folders in
:mod:`~rcfd.data.folder`), :mod:`~rcfd.data.loader` turns it into training batches and
:mod:`~rcfd.data.augment` augments the classifiers' batches."""

from rcfd.data.datasets import load_dataset
from rcfd.data.digits import digits_split
from rcfd.data.images import DatasetSpec, ImageDataset, to_float, to_uint8

__all__ = ["DatasetSpec", "ImageDataset", "digits_split", "load_dataset", "to_float", "to_uint8"]
