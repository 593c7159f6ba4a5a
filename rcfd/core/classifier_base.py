"""What every classifier of feature distillation shares (METHOD.md, "Classifiers"): its
configuration (:class:`ClassifierConfig`), the architectures' names and widths, and the base
module that owns the input normalisation. The networks are :mod:`rcfd.core.classifiers`
(CIFAR ResNets and DenseNets) and :mod:`rcfd.core.imagenet`.

Every classifier maps images in ``[-1, 1]``, shape ``[B, C, H, W]``, to ``(logits, features)``,
``features`` being the pooled activations before the final linear layer. It normalises its
input itself: ``normalize(x) = ((x + 1) / 2 - mean) / std`` with ``mean`` / ``std`` in
``[0, 1]`` pixel units, held in non-persistent buffers so that reference state dicts load
strictly; our own checkpoints keep them in :class:`ClassifierConfig`.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from rcfd.config import Float, PosFloat, PosInt, Section

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the reference classifiers' normalisation
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (family, residual block, blocks per stage, default width)
_CIFAR = {
    "resnet18": ("resnet", "basic", (2, 2, 2, 2), 64),
    "resnet34": ("resnet", "basic", (3, 4, 6, 3), 64),
    "resnet50": ("resnet", "bottleneck", (3, 4, 6, 3), 64),
    "densenet121": ("densenet", None, (6, 12, 24, 16), 32),
    "densenet201": ("densenet", None, (6, 12, 48, 32), 32),
    "densenet_small": ("densenet", None, (2, 4, 6, 4), 12),
}
# name -> default hidden width: a two-hidden-layer perceptron on the flattened pixels
_MLP = {"mlp": 256}
_IMAGENET = {"imagenet_resnet50": 2048, "imagenet_densenet201": 1920}  # name -> feature width
CLASSIFIER_NAMES = tuple(_CIFAR) + tuple(_MLP) + tuple(_IMAGENET)


class ClassifierConfig(Section):
    """Everything that builds a classifier. ``None`` fields resolve on construction:
    ``num_classes`` to 10 (1000 for ``imagenet_*``), ``width`` to the architecture default,
    ``mean``/``std`` to CIFAR-10's for 3 channels (ImageNet's for ``imagenet_*``) and to
    ``0.5``/``0.5`` (identity on ``[-1, 1]``) otherwise. ``input_size``, ``weights`` (a local
    torchvision weight file; ``None`` = torchvision's cache) and ``pretrained`` (``False`` =
    random init) apply to ``imagenet_*`` only. Sizes are bounded so that a config read from
    a file cannot ask for an absurd allocation. For ``mlp`` (:class:`rcfd.core.classifiers.MLPClassifier`)
    ``width`` is the hidden layers' width and ``input_size`` the side of the square images it
    takes (the classifier stage sets it from the data)."""

    name: Literal[CLASSIFIER_NAMES] = "resnet18"
    num_classes: Annotated[PosInt, Field(le=100_000)] | None = None
    in_channels: Annotated[PosInt, Field(le=64)] = 3
    width: Annotated[PosInt, Field(le=4096)] | None = None
    mean: tuple[Float, ...] | None = None
    std: tuple[PosFloat, ...] | None = None
    input_size: Annotated[PosInt, Field(le=4096)] = 224
    weights: str | None = None
    pretrained: bool = True

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_number(cls, v):
        return (v,) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _resolve(self) -> "ClassifierConfig":
        imagenet = self.name in _IMAGENET
        set_ = functools.partial(object.__setattr__, self)  # resolve defaults (frozen)
        if self.num_classes is None:
            set_("num_classes", 1000 if imagenet else 10)
        if self.width is None and not imagenet:
            set_("width", _MLP[self.name] if self.name in _MLP else _CIFAR[self.name][3])
        if imagenet and (self.num_classes != 1000 or self.in_channels not in (1, 3) or self.width):
            raise ValueError(f"{self.name} takes 1- or 3-channel images, predicts 1000 classes and "
                             f"has a fixed width; got num_classes={self.num_classes}, "
                             f"in_channels={self.in_channels}, width={self.width}")
        c = 3 if imagenet else self.in_channels
        defaults = ((IMAGENET_MEAN, IMAGENET_STD) if imagenet else
                    (CIFAR10_MEAN, CIFAR10_STD) if c == 3 else ((0.5,) * c, (0.5,) * c))
        for key, default in zip(("mean", "std"), defaults):
            v = getattr(self, key)
            v = default if v is None else v
            if len(v) not in (1, c):
                entries = "1 entry" if c == 1 else f"1 or {c} entries"
                raise ValueError(f"{key} must have {entries} for {self.name} with "
                                 f"in_channels={self.in_channels}, got {v}")
            set_(key, tuple(v))
        return self

    @property
    def feature_dim(self) -> int:
        """Width of ``features`` (512 for ResNet18, 1920 for DenseNet201 at reference width)."""
        if self.name in _IMAGENET:
            return _IMAGENET[self.name]
        if self.name in _MLP:
            return self.width
        family, block, stages, _ = _CIFAR[self.name]
        if family == "resnet":
            return 8 * self.width * (4 if block == "bottleneck" else 1)
        return _densenet_widths(stages, self.width)[-1]


def _densenet_widths(stages: Sequence[int], growth: int) -> list[int]:
    """Channels entering each dense block, then the final width (compression 0.5)."""
    widths, c = [], 2 * growth
    for i, n in enumerate(stages):
        widths.append(c)
        c += n * growth
        if i < len(stages) - 1:
            c //= 2
    return widths + [c]


def check_images(x: torch.Tensor, in_channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must be images [B, {in_channels}, H, W] in [-1, 1], "
                         f"got shape {tuple(x.shape)}")


class ClassifierBase(nn.Module):
    """Shared input normalisation: ``((x + 1) / 2 - mean) / std`` per channel."""

    def _setup(self, config: ClassifierConfig, feature_dim: int, norm_channels: int) -> None:
        self.config = config
        self.num_classes = config.num_classes
        self.in_channels = config.in_channels
        self.feature_dim = feature_dim
        shape = (1, norm_channels, 1, 1)
        # float64 (cast to the input's dtype on use), so a .double() model normalises exactly.
        mean = torch.tensor(config.mean, dtype=torch.float64).reshape(1, -1, 1, 1).expand(shape)
        std = torch.tensor(config.std, dtype=torch.float64).reshape(1, -1, 1, 1).expand(shape)
        # Not persistent: reference state dicts carry no normalisation; ours keep it in config.
        self.register_buffer("input_mean", mean.clone(), persistent=False)
        self.register_buffer("input_std", std.clone(), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[-1, 1]`` images to the network's normalised input."""
        return ((x + 1) * 0.5 - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


