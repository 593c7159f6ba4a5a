"""The feature extractors of the evaluation panel: uint8 images ``[N, C, H, W]`` in, float64
features ``[N, D]`` out (and class logits ``[N, K]`` where the extractor has them, for IS),
computed on a device in batches.

* :class:`ClassifierExtractor` (``"classifier"``): a trained digit classifier's pooled
  features and logits. It must not be the classifier RCFD distilled into
  (:mod:`rcfd.evaluation.extractors` refuses it);
* :class:`PixelExtractor` (``"pixels"``): the pixels themselves in ``[-1, 1]``, flattened;
  (``"pca"``): their projection on the top principal components of the reference training
  split, whitened. No classifier in either;
* :class:`RandomConvExtractor` (``"random-conv"``): a randomly initialised convolutional
  network with a fixed seed, no training, no classifier; its features are the global
  average of each of its three ReLU stages, concatenated (a random embedding in the sense
  of Naeem et al. 2020);
* the standard Inception is :class:`rcfd.evaluation.fidelity.InceptionExtractor`.

Every extractor has a short ``name`` (the key of every number it produces, the same in every
seed of a study), a ``detail`` (what exactly it is: architecture, weights hash, seed) and a
``fingerprint`` (names its reference features in caches).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcfd.data import to_float

BATCH_SIZE = 500
RANDOM_CONV_WIDTHS = (32, 64, 128)


@dataclass(frozen=True)
class Features:
    """What an extractor makes of a set of images: ``features [N, D]`` and, for extractors
    with a classification head, ``logits [N, K]`` (else ``None``), float64 numpy."""

    features: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def subset(self, index: np.ndarray) -> Features:
        return Features(self.features[index], None if self.logits is None else self.logits[index])


def check_images(images: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    """``images`` must be uint8 ``[N, C, H, W]`` (``[N, *shape]`` when ``shape`` is given)."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        what = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be uint8 [N, C, H, W] (convert float samples with "
                         f"rcfd.data.to_uint8), got {what}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"images must be [N, {', '.join(map(str, shape))}] for this extractor, "
                         f"got {tuple(images.shape)}")


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureExtractor:
    """Base class: subclasses set ``name``, ``detail``, ``fingerprint``, ``image_shape``
    (``(C, H, W)`` they take; ``None``: any) and implement :meth:`batch`."""

    name: str = "?"
    detail: str = "?"
    fingerprint: str = ""
    image_shape: tuple[int, int, int] | None = None
    has_logits: bool = False

    def batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features [B, D], logits [B, K] or None)`` of uint8 images on the device."""
        raise NotImplementedError

    def to(self, device) -> FeatureExtractor:
        """Move whatever the extractor holds to ``device``; returns itself."""
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, device="cpu", batch_size: int = BATCH_SIZE) -> Features:
        """:class:`Features` of uint8 ``images [N, C, H, W]``, computed on ``device`` in
        batches of ``batch_size``."""
        check_images(images, self.image_shape)
        if images.shape[0] < 1 or batch_size < 1:
            raise ValueError(f"need at least one image and batch_size >= 1, got {images.shape[0]}, {batch_size}")
        self.to(device)
        feats, logits = [], []
        for i in range(0, images.shape[0], batch_size):
            f, z = self.batch(images[i:i + batch_size].to(device))
            feats.append(f.flatten(1).double().cpu())
            if z is not None:
                logits.append(z.double().cpu())
        return Features(torch.cat(feats).numpy(), torch.cat(logits).numpy() if logits else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail})"


class ClassifierExtractor(FeatureExtractor):
    """A classifier ``module(float images in [-1, 1]) -> (logits, features)`` in eval mode
    (a snapshot of it: later training does not change the measure)."""

    has_logits = True

    def __init__(self, module: nn.Module, arch: str, image_shape: tuple[int, int, int], *,
                 name: str = "classifier", fingerprint: str | None = None):
        self.net = _snapshot(module)
        self.fingerprint = fingerprint or module_fingerprint(self.net)
        self.name, self.image_shape = name, tuple(image_shape)
        self.detail = f"classifier:{arch}:{self.fingerprint[:12]}"

    def to(self, device):
        self.net.to(device)
        return self

    def batch(self, images):
        out = self.net(to_float(images))
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError("the evaluation classifier must return (logits, features)")
        logits, feats = out
        return feats.float(), logits.float()


def _snapshot(module: nn.Module) -> nn.Module:
    """A private copy of the weights in eval mode, detached from the caller's."""
    net = copy.deepcopy(module).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class PixelExtractor(FeatureExtractor):
    """The pixels in ``[-1, 1]``, flattened to ``C*H*W`` features (``"pixels"``); with
    ``pca_dims`` set, their coordinates on the top ``pca_dims`` principal components of
    ``fit_images`` (the reference training split), each divided by its standard deviation
    (``"pca"``: PCA-whitened pixels)."""

    def __init__(self, image_shape: tuple[int, int, int], *, pca_dims: int | None = None,
                 fit_images: torch.Tensor | None = None):
        self.image_shape = tuple(image_shape)
        self.mean = self.basis = None
        if pca_dims is None:
            self.name, self.detail, self.fingerprint = "pixels", "pixels", "pixels"
            return
        if fit_images is None:
            raise ValueError("the PCA pixel extractor needs fit_images (the reference training split)")
        check_images(fit_images, self.image_shape)
        x = to_float(fit_images, torch.float64).flatten(1)
        if not 1 <= pca_dims <= min(x.shape):
            raise ValueError(f"pca_dims must be in [1, {min(x.shape)}] for {x.shape[0]} images of "
                             f"{x.shape[1]} pixels, got {pca_dims}")
        self.mean = x.mean(0)
        _, s, vt = torch.linalg.svd(x - self.mean, full_matrices=False)
        std = s[:pca_dims] / (x.shape[0] - 1) ** 0.5
        if not bool((std > 0).all()):
            raise ValueError(f"the fit images have fewer than {pca_dims} directions of variance")
        self.basis = vt[:pca_dims].T / std  # [P, pca_dims]: project, then whiten
        h = hashlib.sha256(fit_images.contiguous().numpy().tobytes())
        self.name, self.detail = "pca", f"pixels-pca{pca_dims}-whitened:{h.hexdigest()[:12]}"
        self.fingerprint = f"pca{pca_dims}-{h.hexdigest()}"

    def batch(self, images):
        if self.basis is None:
            return to_float(images).flatten(1), None
        x = to_float(images, torch.float64).flatten(1)  # as the basis was fitted
        return (x - self.mean.to(x.device)) @ self.basis.to(x.device), None


class RandomConv(nn.Module):
    """Three 3x3 conv + ReLU stages (``widths``), 2x2 average pooling between them; the
    features are each stage's global average, concatenated (``sum(widths)`` of them)."""

    def __init__(self, in_channels: int, widths=RANDOM_CONV_WIDTHS):
        super().__init__()
        chans = (in_channels, *widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in itertools.pairwise(chans))

    def forward(self, x):
        out = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x if i == 0 else F.avg_pool2d(x, 2, ceil_mode=True)))
            out.append(x.mean((2, 3)))
        return torch.cat(out, 1)


def random_conv(in_channels: int, seed: int = 0, widths=RANDOM_CONV_WIDTHS) -> RandomConv:
    """A :class:`RandomConv` whose weights are drawn from ``torch.Generator().manual_seed(seed)``
    on the CPU (He-normal: ``N(0, 2 / fan_in)``, zero biases), whatever the global RNG state:
    the same network on every machine and in every run."""
    net = RandomConv(in_channels, widths)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in net.convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            conv.bias.zero_()
    return net.eval().requires_grad_(False)


class RandomConvExtractor(FeatureExtractor):
    """``"random-conv"``: :func:`random_conv` features of images in ``[-1, 1]``, standardised
    on ``fit_images`` (the reference training split) by one affine map, ``(f - m) * c`` with
    ``m`` their mean and ``c = 1 / sqrt(mean_d Var_d)``, so that they are centred with unit
    variance on average there. A random network's raw features are small and far from 0;
    FID does not see the shift and only scales with ``c^2``, but KID's cubic kernel
    ``(x.y / D + 1)^3`` is meant for features of this order (it blows up and becomes noisy
    on uncentred ones)."""

    def __init__(self, image_shape: tuple[int, int, int], *, seed: int = 0, widths=RANDOM_CONV_WIDTHS,
                 fit_images: torch.Tensor | None = None):
        self.image_shape = tuple(image_shape)
        self.net = random_conv(image_shape[0], seed, tuple(widths))
        self.name, self.scale, self.shift = "random-conv", 1.0, torch.zeros(sum(widths), dtype=torch.float64)
        h = hashlib.sha256(module_fingerprint(self.net).encode())
        if fit_images is not None:
            f = torch.from_numpy(FeatureExtractor.__call__(self, fit_images).features)
            var = float(f.var(0).mean()) if f.shape[0] > 1 else 0.0
            if not var > 0:
                raise ValueError("the fit images give constant random-conv features; pass the training split")
            self.shift, self.scale = f.mean(0), var ** -0.5
            h.update(self.shift.numpy().tobytes() + repr(self.scale).encode())
        self.detail = f"random-conv:seed{seed}:{'-'.join(map(str, widths))}" + (
            f":standardised-on-{fit_images.shape[0]}-images" if fit_images is not None else "")
        self.fingerprint = h.hexdigest()

    def to(self, device):
        self.net.to(device)
        return self

    def batch(self, images):
        f = self.net(to_float(images)).double()
        return (f - self.shift.to(f.device)) * self.scale, None
