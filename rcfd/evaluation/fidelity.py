"""The standard Inception as a panel extractor: torch-fidelity's ``inception-v3-compat``
network (pool features ``2048``, logits ``logits_unbiased``), from a local weights file only.

The weights file is a path passed as ``inception_weights``, else torch hub's cache
(``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where
torch-fidelity itself would put it). Nothing is ever downloaded: without the file, the
extractor is unavailable and says where it looked. The file is checked with
``torch.load(weights_only=True)`` before torch-fidelity loads it (it unpickles with
``weights_only=False``, which is safe only for a file that passes this check).

One-channel images are replicated to three; the network resizes them to 299x299 itself.
The metrics are ours (:mod:`rcfd.evaluation.metrics`), as for every other extractor.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from rcfd.io.safeload import load_checkpoint
from rcfd.errors import CheckpointError, UsageError
from rcfd.evaluation.features import FeatureExtractor

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = os.path.basename(URL_INCEPTION_V3)
INCEPTION_FEATURES = ("2048", "logits_unbiased")
INCEPTION_CHECK = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inception_cache_path() -> str:
    """Where torch-fidelity would download the Inception weights to (torch hub's cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def find_inception_weights(inception_weights: str | os.PathLike | None = None) -> str | None:
    """The Inception weights file to use, or ``None``: the given path (which then must
    exist), else torch hub's cache file if present. Looks at files only; never downloads."""
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise UsageError(f"inception_weights={os.fspath(inception_weights)!r} does not exist: pass "
                             f"torch-fidelity's {INCEPTION_FILE} (from {URL_INCEPTION_V3})")
        return os.fspath(inception_weights)
    path = inception_cache_path()
    return path if os.path.isfile(path) else None


def check_inception_weights(path: str) -> None:
    """Refuse a file that is not torch-fidelity's Inception state dict, loading it with
    ``weights_only=True`` (so nothing in it runs)."""
    try:
        sd = load_checkpoint(path)  # safe, and its errors never advise disabling that
    except CheckpointError as e:
        raise UsageError(f"--inception-weights / eval.inception_weights: {e}") from None
    ok = isinstance(sd, dict) and all(
        torch.is_tensor(sd.get(k)) and tuple(sd[k].shape) == s for k, s in INCEPTION_CHECK.items())
    if not ok:
        raise UsageError(f"{path}: not torch-fidelity's Inception weights ({INCEPTION_FILE})")


class InceptionExtractor(FeatureExtractor):
    """``"inception"``: torch-fidelity's Inception pool features (2048) and logits (1008),
    from uint8 images of 1 or 3 channels."""

    has_logits = True

    def __init__(self, inception_weights: str | os.PathLike | None = None):
        path = find_inception_weights(inception_weights)
        if path is None:
            raise UsageError(f"the Inception weights are not on this machine (looked for "
                             f"{inception_cache_path()}): put {INCEPTION_FILE} there, or pass "
                             "inception_weights=PATH; nothing is downloaded")
        check_inception_weights(path)
        self.path, self.fingerprint = path, sha256_file(path)
        self.name, self.detail = "inception", f"{INCEPTION}:{self.fingerprint[:12]}"
        self.net = FeatureExtractorInceptionV3(INCEPTION, list(INCEPTION_FEATURES),
                                               feature_extractor_weights_path=path)

    def to(self, device):
        self.net.to(device)
        return self

    def batch(self, images):
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"the Inception takes 1- or 3-channel images, got {images.shape[1]} channels")
        feats, logits = self.net(images.contiguous())
        return feats, logits
