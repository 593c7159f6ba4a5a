"""Classifiers for classifier-based feature distillation (METHOD.md, "Classifiers").

Every classifier maps images in ``[-1, 1]``, shape ``[B, C, H, W]``, to ``(logits, features)``,
``features`` being the pooled activations before the final linear layer (the ``f`` of
``L_CFD = KL(softmax(f_T / tau) || softmax(f_S))``). A classifier owns its input
normalisation: ``normalize(x) = ((x + 1) / 2 - mean) / std`` with ``mean`` / ``std`` in
``[0, 1]`` pixel units, held in non-persistent buffers so that reference state dicts
(``{'model': state_dict}``) load strictly; our own checkpoints keep them in
:class:`ClassifierConfig`.

CIFAR-style networks (3x3 stride-1 stem, no max-pool) take any ``in_channels`` and a base
``width`` (ResNet: channels of the first stage, 64 in the reference; DenseNet: growth rate, 32
in the reference), so ``resnet18`` at width 16 and ``densenet_small`` train on 16x16 digits in
seconds on a CPU. ``imagenet_*`` wrap torchvision's ImageNet networks: inputs are resized
bilinearly to ``input_size`` (224); weights come from a local file or torchvision's cache and
are never downloaded here. The wrapper and its weight loading are in :mod:`rcfd.core.imagenet`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rcfd.core.classifier_base import (
    _CIFAR,
    _IMAGENET,
    _MLP,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSIFIER_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassifierBase,
    ClassifierConfig,
    _densenet_widths,
    check_images,
)
from rcfd.core.imagenet import ImageNetClassifier

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CLASSIFIER_NAMES", "IMAGENET_MEAN", "IMAGENET_STD",
           "ClassifierConfig", "CifarDenseNet", "CifarResNet", "FrozenClassifier", "MLPClassifier", "build",
           "build_classifier", "frozen", "load_reference_classifier"]


def build(config: ClassifierConfig) -> nn.Module:
    """A freshly initialised classifier of ``config`` (``imagenet_*``: with the ImageNet
    weights)."""
    if config.name in _IMAGENET:
        return ImageNetClassifier(config)
    if config.name in _MLP:
        return MLPClassifier(config)
    return CifarResNet(config) if _CIFAR[config.name][0] == "resnet" else CifarDenseNet(config)


def build_classifier(name: str, num_classes: int | None = None, in_channels: int = 3,
                     width: int | None = None,
                     normalization: tuple[Sequence[float], Sequence[float]] | None = None,
                     **imagenet: Any) -> nn.Module:
    """Registry entry point: ``build_classifier("resnet18", width=16, in_channels=1)``.
    ``normalization = (mean, std)`` in ``[0, 1]`` pixel units; ``imagenet`` keywords are
    ``input_size``, ``weights``, ``pretrained`` (see :class:`ClassifierConfig`)."""
    mean, std = normalization if normalization is not None else (None, None)
    return build(ClassifierConfig(name=name, num_classes=num_classes, in_channels=in_channels,
                            width=width, mean=mean, std=std, **imagenet))


# ---------------------------------------------------------------- CIFAR ResNet


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.downsample = _shortcut(cin, planes * 4, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(ClassifierBase):
    """ResNet with a 3x3 stride-1 stem and no max-pool; stages of ``width * (1, 2, 4, 8)``
    channels, the last three at stride 2. ``features`` = global average of the last stage."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        _, block_name, stages, _ = _CIFAR[config.name]
        block = BasicBlock if block_name == "basic" else Bottleneck
        self._setup(config, config.feature_dim, config.in_channels)
        w = config.width
        self.conv1, self.bn1 = _conv(config.in_channels, w, 3), nn.BatchNorm2d(w)
        cin = w
        for i, n in enumerate(stages):
            planes, blocks = w * 2**i, []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, config.num_classes)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(x, self.in_channels)
        h = F.relu(self.bn1(self.conv1(self.normalize(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        features = h.mean(dim=(2, 3))
        return self.fc(features), features


# -------------------------------------------------------------- CIFAR DenseNet


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (to ``4 * growth``) then BN-ReLU-Conv3x3 (to ``growth``)."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, 4 * growth, 1)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), _conv(4 * growth, growth, 3)

    def forward(self, x):
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, cin: int, n: int, growth: int):
        super().__init__({f"denselayer{i + 1}": _DenseLayer(cin + i * growth, growth)
                          for i in range(n)})

    def forward(self, x):
        feats = [x]
        for layer in self.values():
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class _Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(cin), _conv(cin, cout, 1)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class CifarDenseNet(ClassifierBase):
    """DenseNet-BC (bottleneck 4, compression 0.5) with a 3x3 stride-1 stem of
    ``2 * growth`` channels and no max-pool; ``features`` = global average of
    ``relu(final_norm(.))``."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        stages, g = _CIFAR[config.name][2], config.width
        widths = _densenet_widths(stages, g)
        self._setup(config, widths[-1], config.in_channels)
        self.features = nn.Sequential(OrderedDict(conv0=_conv(config.in_channels, 2 * g, 3),
                                                  norm0=nn.BatchNorm2d(2 * g), relu0=nn.ReLU()))
        for i, n in enumerate(stages):
            self.add_module(f"block{i + 1}", _DenseBlock(widths[i], n, g))
            if i < len(stages) - 1:
                self.add_module(f"trans{i + 1}", _Transition(widths[i] + n * g, widths[i + 1]))
        self.final_norm = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], config.num_classes)
        self._num_stages = len(stages)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(x, self.in_channels)
        h = self.features(self.normalize(x))
        for i in range(1, self._num_stages):
            h = getattr(self, f"trans{i}")(getattr(self, f"block{i}")(h))
        h = F.relu(self.final_norm(getattr(self, f"block{self._num_stages}")(h)))
        features = h.mean(dim=(2, 3))
        return self.fc(features), features


# ------------------------------------------------------------------------ MLP


class MLPClassifier(ClassifierBase):
    """A two-hidden-layer perceptron on the flattened normalised pixels: ``Linear(C * S * S,
    width) -> ReLU -> Linear(width, width) -> ReLU -> Linear(width, num_classes)`` for
    ``S = config.input_size``. ``features`` = the second hidden layer's activations (the
    penultimate layer, ``width`` wide). No convolution, no batch norm, no pooling: a judge
    built differently from the ResNets and DenseNets RCFD distills into."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self._setup(config, config.width, config.in_channels)
        self.input_size, w = config.input_size, config.width
        self.hidden1 = nn.Linear(config.in_channels * config.input_size ** 2, w)
        self.hidden2 = nn.Linear(w, w)
        self.fc = nn.Linear(w, config.num_classes)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(x, self.in_channels)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"this MLP classifier takes {self.input_size}x{self.input_size} images, "
                             f"got {tuple(x.shape[-2:])}")
        h = F.relu(self.hidden1(self.normalize(x).flatten(1)))
        features = F.relu(self.hidden2(h))
        return self.fc(features), features


# ----------------------------------------------------------- import & freezing


def load_reference_classifier(checkpoint: Mapping[str, Any], name: str,
                              normalization: tuple[Sequence[float], Sequence[float]]
                              = (CIFAR10_MEAN, CIFAR10_STD)) -> nn.Module:
    """Build ``name`` from a reference checkpoint ``{'model': state_dict}`` (or a bare state
    dict), loading strictly. ``num_classes``, ``in_channels`` and ``width`` are read from the
    weights; ``normalization = (mean, std)`` is the one the checkpoint was trained with
    (default: the reference's CIFAR-10 mean/std)."""
    if name not in _CIFAR:
        raise ValueError(f"name must be a CIFAR classifier {tuple(_CIFAR)}, got {name!r}")
    sd = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    resnet = _CIFAR[name][0] == "resnet"
    stem, width_key = (("conv1.weight", "conv1.weight") if resnet
                       else ("features.conv0.weight", "block1.denselayer1.conv2.weight"))
    missing = [k for k in (stem, width_key, "fc.weight") if k not in sd]
    if missing:
        raise ValueError(f"checkpoint is not a reference {name} state dict: missing {missing}")
    mean, std = normalization
    config = ClassifierConfig(name=name, num_classes=sd["fc.weight"].shape[0],
                              in_channels=sd[stem].shape[1], width=sd[width_key].shape[0],
                              mean=mean, std=std)
    model = build(config)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint does not match a reference {name}: {e}") from e
    return model


class FrozenClassifier(nn.Module):
    """A classifier fixed for distillation: eval mode forever (``train()`` is a no-op, also
    when called through a parent module), no parameter gradients; gradients still flow
    through it to its input (METHOD.md, CFD: ``f_S = features(x0_hat)``)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenClassifier":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.classifier.training:  # someone called .train() on the classifier itself
            self.classifier.train(False)
        return self.classifier(x)

    @property
    def feature_dim(self) -> int:
        return self.classifier.feature_dim

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def config(self) -> ClassifierConfig:
        return self.classifier.config


def frozen(classifier: nn.Module) -> FrozenClassifier:
    """Freeze ``classifier`` for distillation (see :class:`FrozenClassifier`)."""
    if isinstance(classifier, FrozenClassifier):
        classifier.classifier.requires_grad_(False)
        return classifier.train(False)
    return FrozenClassifier(classifier)
