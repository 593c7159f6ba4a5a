"""Classifier training augmentation (METHOD.md, "Classifiers"): random crop with padding,
horizontal flip, AutoAugment's CIFAR-10 policy, Cutout, in the reference's order.

Everything works on a batch ``[B, C, H, W]`` of float images in ``[-1, 1]`` on any device, draws
its randomness per image from an optional ``torch.Generator`` (same generator state, same
output), and returns a new tensor of the input's shape and dtype. Sizes scale with the image:
the crop pads by ``H / 8`` (4 at 32x32) and Cutout cuts one hole of a fraction of each
side (:func:`cutout_hole`; by default ``H/4 x W/4``, 2x2 at 8x8; the reference's is
``H/2 x W/2``, 16x16 at 32x32). Fill values are in image units: the crop pads with black
``-1`` by default (the digits' background, and what torchvision's ``RandomCrop`` pads with;
:func:`pad_value` reads a dataset's background; the reference pads with pixel value 128,
mid-grey ``0``) and Cutout fills with black ``-1`` (the reference zeroes ``[0, 1]`` pixels).

AutoAugment uses torchvision's CIFAR-10 policy table and per-op implementations on ``uint8``
(``round((x + 1) * 127.5)``), one sub-policy per image as torchvision's ``AutoAugment`` does,
but batched: images that draw the same ``(op, magnitude)`` are transformed in one call.
Images that no op touches are returned bit-exact. All ops accept 1-channel images.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.nn.functional as F
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

Decision = list[tuple[str, float]]  # the ops one image receives, in order


def _generator_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float batch [B, C, H, W] in [-1, 1], got "
                         f"{x.dtype} of shape {tuple(x.shape)}")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                fill: float = 0.0) -> torch.Tensor:
    """Pad each side by ``padding`` with ``fill`` and take an ``H x W`` window at an offset
    drawn uniformly from ``{0..2 padding}^2`` per image."""
    _check(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x.clone()
    B, C, H, W = x.shape
    dev = _generator_device(x, generator)
    offsets = torch.randint(0, 2 * padding + 1, (2, B), generator=generator, device=dev)
    offsets = offsets.to(x.device)
    padded = F.pad(x, (padding,) * 4, value=fill)
    rows = (offsets[0, :, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(W, device=x.device))[:, None, None, :]
    out = padded.gather(2, rows.expand(B, C, H, W + 2 * padding))
    return out.gather(3, cols.expand(B, C, H, W))


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    _check(x)
    dev = _generator_device(x, generator)
    flip = torch.rand(x.shape[0], generator=generator, device=dev).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_cutout(x: torch.Tensor, size: int | tuple[int, int],
                  generator: torch.Generator | None = None, fill: float = -1.0) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): one ``size`` hole per image, centred at a uniformly
    drawn pixel and clipped at the border, set to ``fill``."""
    _check(x)
    sh, sw = (size, size) if isinstance(size, int) else size
    if sh < 1 or sw < 1:
        raise ValueError(f"size must be positive, got {size}")
    B, _, H, W = x.shape
    dev = _generator_device(x, generator)
    cy = torch.randint(0, H, (B,), generator=generator, device=dev).to(x.device)
    cx = torch.randint(0, W, (B,), generator=generator, device=dev).to(x.device)
    ys, xs = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    y0, x0 = (cy - sh // 2)[:, None], (cx - sw // 2)[:, None]
    in_rows = (ys >= y0) & (ys < y0 + sh)
    in_cols = (xs >= x0) & (xs < x0 + sw)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(hole[:, None], fill)


# ------------------------------------------------------------------ AutoAugment


@functools.lru_cache(maxsize=None)
def _cifar10_policy(height: int, width: int):
    """torchvision's CIFAR-10 sub-policies ``((op, p, magnitude_bin), (op, p, magnitude_bin))``
    and magnitude table ``op -> (bins, signed)`` for an ``height x width`` image."""
    aa = AutoAugment(AutoAugmentPolicy.CIFAR10)
    space = aa._augmentation_space(10, (height, width))
    space = {k: (bins.tolist() if bins.dim() else 0.0, signed)
             for k, (bins, signed) in space.items()}
    return tuple(aa.policies), space


def autoaugment_decisions(batch: int, height: int, width: int,
                          generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> list[Decision]:
    """Per image: a sub-policy drawn uniformly, each of its two ops kept with its probability,
    signed magnitudes negated with probability 1/2 (torchvision ``AutoAugment.forward``)."""
    policies, space = _cifar10_policy(height, width)
    dev = generator.device if generator is not None else device
    which = torch.randint(0, len(policies), (batch, 1), generator=generator, device=dev)
    probs = torch.rand(batch, 2, generator=generator, device=dev)
    signs = torch.randint(0, 2, (batch, 2), generator=generator, device=dev)
    draws = torch.cat([which.double(), probs.double(), signs.double()], 1)
    draws = draws.cpu().tolist()  # the one host sync: grouping happens on the host
    decisions = []
    for row in draws:
        ops = []
        for i, (name, p, bin_) in enumerate(policies[int(row[0])]):
            if row[1 + i] <= p:
                bins, signed = space[name]
                magnitude = float(bins[bin_]) if bin_ is not None else 0.0
                ops.append((name, -magnitude if signed and row[3 + i] == 0 else magnitude))
        decisions.append(ops)
    return decisions


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats -> ``uint8`` pixels ``round((x + 1) * 127.5)``, clamped."""
    return ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def from_uint8(u: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` pixels -> ``[-1, 1]``: ``u / 127.5 - 1``."""
    return u.to(dtype) / 127.5 - 1


def apply_autoaugment(u: torch.Tensor, decisions: list[Decision], fill: int = 0) -> torch.Tensor:
    """Apply per-image op lists to a ``uint8`` batch, one torchvision call per distinct
    ``(op, magnitude)`` at each position (geometric ops: nearest, ``fill`` outside)."""
    if u.dtype != torch.uint8 or u.dim() != 4 or len(decisions) != u.shape[0]:
        raise ValueError(f"u must be a uint8 batch [B, C, H, W] with one decision per image; got "
                         f"{u.dtype} {tuple(u.shape)} and {len(decisions)} decisions")
    u = u.clone()
    fill_c = [float(fill)] * u.shape[1]
    for step in range(max((len(d) for d in decisions), default=0)):
        groups: dict[tuple[str, float], list[int]] = defaultdict(list)
        for b, ops in enumerate(decisions):
            if step < len(ops):
                groups[ops[step]].append(b)
        for (name, magnitude), idx in groups.items():
            index = torch.tensor(idx, device=u.device)
            u[index] = _apply_op(u[index], name, magnitude,
                                 interpolation=InterpolationMode.NEAREST, fill=fill_c)
    return u


def autoaugment_cifar10(x: torch.Tensor, generator: torch.Generator | None = None,
                        fill: float = 0.0) -> torch.Tensor:
    """AutoAugment, CIFAR-10 policy (Cubuk et al., 2019), per image, on ``[-1, 1]`` floats.
    Geometric ops fill with ``fill`` (image units; the reference's policy fills with 128)."""
    _check(x)
    B, _, H, W = x.shape
    decisions = autoaugment_decisions(B, H, W, generator, device=x.device)
    touched = [b for b, ops in enumerate(decisions) if ops]
    if not touched:
        return x.clone()
    index = torch.tensor(touched, device=x.device)
    fill_u8 = int(to_uint8(torch.tensor(float(fill))))
    u = apply_autoaugment(to_uint8(x[index]), [decisions[b] for b in touched], fill=fill_u8)
    out = x.clone()
    out[index] = from_uint8(u, x.dtype)
    return out


def classifier_augment(x: torch.Tensor, generator: torch.Generator | None = None, *,
                       crop: bool = True, flip: bool = True, autoaugment: bool = True,
                       cutout: bool = True, padding: int | None = None,
                       cutout_size: int | tuple[int, int] | None = None, cutout_fraction: float = 0.25,
                       pad_fill: float = -1.0, cutout_fill: float = -1.0) -> torch.Tensor:
    """The classifier training augmentation: random crop (``padding``, default ``H / 8``; the
    border and AutoAugment's uncovered pixels filled with ``pad_fill``) -> horizontal flip ->
    AutoAugment CIFAR-10 -> Cutout (``cutout_size``, default :func:`cutout_hole` of
    ``cutout_fraction``). ``x``: ``[B, C, H, W]`` floats in ``[-1, 1]``; returns the same shape
    and dtype."""
    _check(x)
    H, W = x.shape[-2:]
    if crop:
        x = random_crop(x, max(1, round(min(H, W) / 8)) if padding is None else padding,
                        generator, fill=pad_fill)
    if flip:
        x = random_flip(x, generator)
    if autoaugment:
        x = autoaugment_cifar10(x, generator, fill=pad_fill)
    if cutout:
        size = cutout_hole(H, W, cutout_fraction) if cutout_size is None else cutout_size
        x = random_cutout(x, size, generator, fill=cutout_fill)
    return x


def pad_value(pad_fill: str | float, images: torch.Tensor) -> float:
    """The crop's fill in image units: ``pad_fill`` itself, or for ``"background"`` the
    smallest pixel value of ``images`` (``uint8``, as datasets hold them) in ``[-1, 1]``: black
    (-1) for the digits, whose background is black. Padding with it adds no border the data
    never shows (a mid-grey border teaches a classifier to ignore grey specks)."""
    if pad_fill != "background":
        return float(pad_fill)
    if images.dtype != torch.uint8 or images.numel() == 0:
        raise ValueError(f"pad_fill='background' needs uint8 training images, got {images.dtype} "
                         f"of shape {tuple(images.shape)}")
    return float(from_uint8(images.min().reshape(1))[0])


def cutout_hole(height: int, width: int, fraction: float = 0.5) -> tuple[int, int]:
    """The Cutout hole of an ``height x width`` image: ``fraction`` of each side, rounded
    down, at least 1 pixel (``0.5``: the reference's 16x16 at 32x32, 4x4 at 8x8)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"cutout fraction must be in (0, 1], got {fraction}")
    return max(1, int(height * fraction)), max(1, int(width * fraction))
