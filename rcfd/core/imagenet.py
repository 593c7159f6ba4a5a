"""ImageNet-pretrained classifiers (``imagenet_resnet50``, ``imagenet_densenet201``) for
:mod:`rcfd.core.classifiers`: torchvision's networks behind the same ``(logits, features)``
interface. Inputs are resized bilinearly to ``input_size`` (224); weights come from a local
file or torchvision's cache and are never downloaded here. Built through
:func:`rcfd.core.classifiers.build`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import torch
import torch.nn.functional as F

from rcfd.io.safeload import load_checkpoint
from rcfd.core.classifier_base import _IMAGENET, ClassifierBase, ClassifierConfig, check_images


def _models():
    """``torchvision.models``, imported on first use: torchvision imports torch._dynamo and
    with it Triton, which loading a diffusion checkpoint (it imports this module through
    :mod:`rcfd.core.classifiers`) must not pay for."""
    import torchvision.models

    return torchvision.models


def _imagenet_state_dict(arch: str, weights: str | None) -> dict[str, torch.Tensor]:
    """Load torchvision's ImageNet weights from ``weights`` or from torchvision's cache
    (``torch.hub.get_dir()/checkpoints``); never downloads."""
    models = _models()
    url = {"resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
           "densenet201": models.DenseNet201_Weights.IMAGENET1K_V1}[arch].url
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet weights for {arch} not found at {path!r}; weights are never downloaded at "
            f"run time. Fetch {url} to that path (or pass weights=<local file>), or use "
            f"pretrained=False for a randomly initialised network.")
    sd = load_checkpoint(path)
    if isinstance(sd.get("model"), Mapping):
        sd = sd["model"]
    # torchvision's DenseNet files use the legacy names "denselayerN.norm.1" -> "norm1".
    legacy = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.(\d)\.")
    return {legacy.sub(r"\1\2.", k): v for k, v in sd.items()}


class ImageNetClassifier(ClassifierBase):
    """torchvision ResNet50 / DenseNet201 with ImageNet weights. ``[-1, 1]`` images (1-channel
    ones repeated to RGB) are resized bilinearly to ``input_size`` and normalised with the
    ImageNet mean/std; returns (logits over 1000 classes, pooled 2048 / 1920 features)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        arch = config.name.removeprefix("imagenet_")
        self._setup(config, _IMAGENET[config.name], 3)
        self.input_size = config.input_size
        self.net = getattr(_models(), arch)(weights=None)
        if config.pretrained:
            self.net.load_state_dict(_imagenet_state_dict(arch, config.weights))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` in ``[-1, 1]`` -> normalised ``[B, 3, input_size, input_size]``."""
        check_images(x, self.in_channels)
        x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.input_size)
        return self.normalize(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net, h = self.net, self.preprocess(x)
        if not hasattr(net, "fc"):  # DenseNet: features -> relu -> pool -> classifier
            h = F.relu(net.features(h))
            features = h.mean(dim=(2, 3))
            return net.classifier(features), features
        h = net.maxpool(net.relu(net.bn1(net.conv1(h))))
        h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        features = h.mean(dim=(2, 3))
        return net.fc(features), features
