"""Measuring images in one call: :func:`measure` runs the evaluation panel
(:mod:`rcfd.evaluation`: extractors, reference features, FID / KID / precision / recall / IS)
on a sample set against a reference, without a run directory::

    m = rcfd.measure(x, "digits", extractors=["random-conv"])
    m["random-conv"]["test"]["fid"]

The reference is a dataset name (its held-out ``test`` split and its ``train`` split are
both measured against), an :class:`~rcfd.data.ImageDataset` or an image tensor (measured as
one ``train`` split).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from rcfd.data import DatasetSpec, ImageDataset, to_uint8
from rcfd.errors import UsageError
from rcfd.evaluation import References, build_panel, load_references, measure_panel, panel_features

__all__ = ["measure", "as_uint8"]

DEFAULT_EXTRACTORS = ("random-conv", "pixels")  # the two that need no file


def as_uint8(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """``[N, C, H, W]`` images as uint8 pixels on the CPU: uint8 as they are, floats in
    ``[-1, 1]`` through :func:`rcfd.data.to_uint8`."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UsageError(f"{what} must be a [N, C, H, W] tensor, got {got}")
    if images.dtype == torch.uint8:
        return images.cpu()
    if not images.is_floating_point():
        raise UsageError(f"{what} must be uint8 or float in [-1, 1], got {images.dtype}")
    return to_uint8(images.detach().float().cpu())


def reference_splits(reference: Any, image_shape: tuple[int, ...],
                     data_path: str | os.PathLike | None = None) -> dict[str, ImageDataset]:
    """``{"test": ..., "train": ...}`` for a dataset name (at ``data_path`` unless embedded),
    ``{"train": reference}`` for an :class:`ImageDataset`, ``{"train": <the images>}`` for a
    tensor."""
    if isinstance(reference, str):
        c, size = image_shape[0], image_shape[-1]
        try:
            spec = DatasetSpec(name=reference, path=None if data_path is None else str(data_path),
                               image_size=size, channels=c)
        except ValueError as e:
            raise UsageError(f"reference {reference!r}: {e}") from None
        return load_references(spec)
    if isinstance(reference, ImageDataset):
        return {"train": reference}
    if isinstance(reference, torch.Tensor):
        return {"train": ImageDataset(images=as_uint8(reference, "reference"), labels=None,
                                      num_classes=0, name="tensor", split="train")}
    raise UsageError(f"reference must be a dataset name, an ImageDataset or an image tensor, "
                     f"got {type(reference).__name__}")


def measure(images: torch.Tensor, reference: Any, extractors: Sequence[str] = DEFAULT_EXTRACTORS, *,
            data_path: str | os.PathLike | None = None, classifier: str | os.PathLike | None = None,
            inception_weights: str | os.PathLike | None = None, device: Any = "cpu",
            batch_size: int = 500, seed: int = 0, mlp_classifier: str | os.PathLike | None = None) -> dict:
    """Metrics of ``images`` (float ``[N, C, H, W]`` in ``[-1, 1]`` or uint8; at least 20)
    against ``reference`` (module docstring), per extractor of ``extractors`` (names of
    :data:`rcfd.evaluation.EXTRACTOR_NAMES`; ``"classifier"`` needs ``classifier``, the
    evaluation classifier's checkpoint, ``"mlp-classifier"`` needs ``mlp_classifier``, a run's
    ``classifier/mlp.safetensors``; ``"inception"`` its weights on this machine)::

        {name: {"test": {"fid", "kid", "kid_std", "precision", "recall"}, "train": {...},
                "is": float | None, "is_std": float | None}}

    (``"test"`` only for a dataset with a held-out split; IS where the extractor has logits).
    The numbers are those ``python -m rcfd.evaluate`` reports for the same images."""
    u8 = as_uint8(images)
    shape = tuple(u8.shape[1:])
    refs = References(reference_splits(reference, shape, data_path), device=device, batch_size=batch_size)
    if tuple(refs.image_shape) != shape:
        raise UsageError(f"the images are {shape} but the reference holds {tuple(refs.image_shape)} ones")
    panel = build_panel(list(extractors), shape, train_images=refs.datasets["train"].images,
                        classifier=classifier, inception_weights=inception_weights, device=device,
                        mlp_classifier=mlp_classifier)
    feats = panel_features(u8, panel, device=device, batch_size=batch_size)
    return measure_panel(feats, panel, refs, seed=seed)
