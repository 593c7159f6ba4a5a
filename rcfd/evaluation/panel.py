"""Measuring with the panel: reference features per (extractor, split) computed once, every
metric of a sample set against both splits, and the two noise floors.

* :class:`References`: the reference splits (``"test"``, the held-out images, and
  ``"train"``) and their features under each extractor, computed on first use and kept in
  memory (and in ``cache_dir``, named by the data's and the extractor's fingerprints);
* :func:`measure_features`: FID, KID, precision and recall of one feature set against
  another (:mod:`rcfd.evaluation.metrics`);
* :func:`measure_panel`: every extractor x reference split for one sample set, plus IS where
  the extractor has logits;
* :func:`data_floor` (test split against train split: what held-out real images score) and
  :func:`two_seed_floor` (two independent sample sets of one model, same count as a cell:
  what sampling noise alone moves a number by).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcfd.io.files import atomic_write
from rcfd.data import ImageDataset
from rcfd.errors import UsageError
from rcfd.evaluation.features import BATCH_SIZE, FeatureExtractor, Features
from rcfd.evaluation.metrics import (
    IS_SPLITS,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    PR_K,
    fid,
    inception_score,
    kid,
    precision_recall,
)

SPLITS = ("test", "train")
PR_MAX_SUBSETS = 10
MIN_SAMPLES = 2 * IS_SPLITS


def protocol() -> dict:
    """The fixed measurement settings, as written into every results file."""
    return {"kid_subsets": KID_SUBSETS, "kid_subset_size": KID_SUBSET_SIZE, "kid_kernel": "(x.y/D + 1)^3",
            "is_splits": IS_SPLITS, "pr_k": PR_K, "pr_max_subsets": PR_MAX_SUBSETS}


class References:
    """The reference images of each split (``{"test": ImageDataset, "train": ImageDataset}``)
    and their features under each extractor, computed once on ``device``. ``cache_dir``:
    also kept there as ``<split>-<data sha256[:12]>-<extractor name>-<fingerprint[:12]>.npz``."""

    def __init__(self, datasets: Mapping[str, ImageDataset], *, device: Any = "cpu",
                 batch_size: int = BATCH_SIZE, cache_dir: str | os.PathLike | None = None):
        unknown = [s for s in datasets if s not in SPLITS]
        if "train" not in datasets or unknown:
            raise UsageError(f"the references are splits {SPLITS} (train at least), got {list(datasets)}")
        shapes = {tuple(d.images.shape[1:]) for d in datasets.values()}
        if len(shapes) != 1:
            raise UsageError(f"the reference splits hold images of different shapes: {sorted(shapes)}")
        self.datasets, self.device, self.batch_size = dict(datasets), device, batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.image_shape = shapes.pop()
        self._features: dict[tuple[str, str], Features] = {}
        self._data_fp = {s: d.fingerprint()[:12] for s, d in self.datasets.items()}

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits held, in :data:`SPLITS` order (a folder dataset has no test split)."""
        return tuple(s for s in SPLITS if s in self.datasets)

    @property
    def counts(self) -> dict[str, int]:
        return {s: len(d) for s, d in self.datasets.items()}

    @property
    def name(self) -> str:
        return self.datasets["train"].name

    def _cache_file(self, extractor: FeatureExtractor, split: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{split}-{self._data_fp[split]}-{extractor.name}-{extractor.fingerprint[:12]}.npz"

    def features(self, extractor: FeatureExtractor, split: str) -> Features:
        """The features of ``split`` under ``extractor`` (computed on first use)."""
        key = (extractor.fingerprint or extractor.detail, split)
        if key in self._features:
            return self._features[key]
        path = self._cache_file(extractor, split)
        if path is not None and path.is_file():
            with np.load(path) as z:
                feats = Features(z["features"], z["logits"] if "logits" in z.files else None)
        else:
            feats = extractor(self.datasets[split].images, device=self.device, batch_size=self.batch_size)
            if path is not None:
                arrays = {"features": feats.features} | ({} if feats.logits is None else {"logits": feats.logits})
                atomic_write(path, lambda f: np.savez(f, **arrays))
        self._features[key] = feats
        return feats


def _pr_subsets(n_big: int, n_small: int, rng: np.random.RandomState) -> list[np.ndarray]:
    """Disjoint index sets of size ``n_small`` from a seeded permutation of ``range(n_big)``
    (at least one, at most :data:`PR_MAX_SUBSETS`)."""
    perm = rng.permutation(n_big)
    count = max(1, min(PR_MAX_SUBSETS, n_big // n_small))
    return [perm[i * n_small:(i + 1) * n_small] for i in range(count)]


def measure_features(fake: Features, real: Features, *, seed: int = 0) -> dict:
    """FID, KID (mean and spread over subsets of ``min(1000, N_fake, N_real)``) and
    precision / recall (k = 3) of ``fake`` against ``real``. Precision and recall depend on
    the two counts, so they are computed on equal counts: the larger set is cut into disjoint
    seeded subsets of the smaller one's size (up to :data:`PR_MAX_SUBSETS`) and the results
    averaged."""
    f, r = fake.features, real.features
    if f.shape[1] != r.shape[1]:
        raise ValueError(f"fake and real features differ in width ({f.shape[1]} vs {r.shape[1]}): "
                         "measure both with the same extractor")
    k_mean, k_std = kid(f, r, subset_size=min(KID_SUBSET_SIZE, len(f), len(r)), seed=seed)
    rng = np.random.RandomState(seed)
    prs = []
    if len(f) >= len(r):
        prs = [precision_recall(r, f[idx]) for idx in _pr_subsets(len(f), len(r), rng)]
    else:
        prs = [precision_recall(r[idx], f) for idx in _pr_subsets(len(r), len(f), rng)]
    p, rec = np.mean(prs, axis=0)
    return {"fid": fid(f, r), "kid": k_mean, "kid_std": k_std, "precision": float(p), "recall": float(rec)}


def panel_features(images: torch.Tensor, extractors: Sequence[FeatureExtractor], *, device: Any = "cpu",
                   batch_size: int = BATCH_SIZE) -> dict[str, Features]:
    """``{extractor name: Features}`` of uint8 ``images``."""
    if images.shape[0] < MIN_SAMPLES:
        raise UsageError(f"need at least {MIN_SAMPLES} samples to measure (IS uses {IS_SPLITS} splits), "
                         f"got {images.shape[0]}; raise the number of samples")
    return {e.name: e(images, device=device, batch_size=batch_size) for e in extractors}


def measure_panel(features: Mapping[str, Features], extractors: Sequence[FeatureExtractor],
                  references: References, *, seed: int = 0) -> dict:
    """``{name: {"test": {fid, kid, kid_std, precision, recall}, "train": {...}, "is", "is_std"}}``
    of one sample set's :func:`panel_features` (``is`` is ``None`` without logits; ``test``
    is absent for data without a test split)."""
    out = {}
    for e in extractors:
        feats = features[e.name]
        m = {split: measure_features(feats, references.features(e, split), seed=seed)
             for split in references.splits}
        isc = inception_score(feats.logits, seed=seed) if feats.logits is not None else (None, None)
        out[e.name] = {**m, "is": isc[0], "is_std": isc[1]}
    return out


def data_floor(extractors: Sequence[FeatureExtractor], references: References, *, seed: int = 0) -> dict | None:
    """The test split measured against the train split, per extractor: what held-out real
    images score (a model cannot be expected to beat it against ``train``); ``None`` when
    the data has no test split."""
    if "test" not in references.splits:
        return None
    metrics = {e.name: measure_features(references.features(e, "test"), references.features(e, "train"), seed=seed)
               for e in extractors}
    return {"num": references.counts, "metrics": metrics}


def two_seed_floor(a: Mapping[str, Features], b: Mapping[str, Features], a_metrics: Mapping[str, Mapping],
                   extractors: Sequence[FeatureExtractor], references: References, *, seed: int = 0) -> dict:
    """Two independent sample sets ``a`` and ``b`` of one model (features per extractor;
    ``a_metrics``: ``a``'s :func:`measure_panel`): per extractor, ``b`` measured against ``a``
    (FID, KID, precision, recall) and ``delta``: how far ``b``'s numbers against each split
    are from ``a``'s (``b - a``), i.e. how much a cell moves by sampling noise alone."""
    b_metrics = measure_panel(b, extractors, references, seed=seed)
    out = {}
    for e in extractors:
        m = measure_features(b[e.name], a[e.name], seed=seed)
        m["delta"] = {s: {k: b_metrics[e.name][s][k] - a_metrics[e.name][s][k] for k in ("fid", "kid")}
                      for s in references.splits}
        out[e.name] = m
    return out
