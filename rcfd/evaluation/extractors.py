"""The evaluation panel from names: which extractors measure a run, built from explicit
paths (the evaluation classifier's checkpoint, the distillation classifier's, the Inception
weights), and the check, before any training, that every one of them will be there.

Names (:data:`EXTRACTOR_NAMES`): ``"classifier"`` (the evaluation classifier, never the one
RCFD distilled into), ``"mlp-classifier"`` (a second trained judge: the study's is a
two-layer perceptron trained with its own recipe and seed, penultimate-layer features;
:func:`rcfd.methods.classifier.default_mlp_classifier`), ``"random-conv"``, ``"pixels"``, ``"pca"`` (no classifier in these
three) and ``"inception"`` (when its weights are on this machine). :func:`panel_names`
resolves ``inception="auto"`` (added when its weights are found) into the fixed list a run
measures with; the list is written into the results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcfd.io.checkpoint import load_classifier_checkpoint
from rcfd.errors import ConfigError, UsageError
from rcfd.evaluation.features import (
    ClassifierExtractor,
    FeatureExtractor,
    PixelExtractor,
    RandomConvExtractor,
    module_fingerprint,
)
from rcfd.evaluation.fidelity import (
    INCEPTION_FILE,
    InceptionExtractor,
    find_inception_weights,
    inception_cache_path,
)

EXTRACTOR_NAMES = ("classifier", "mlp-classifier", "random-conv", "pixels", "pca", "inception")
CLASSIFIER_EXTRACTORS = ("classifier", "mlp-classifier")  # trained classifiers, given by checkpoint
DEFAULT_EXTRACTORS = ("classifier", "random-conv", "pixels")
INCEPTION_MODES = ("auto", "always", "never")
PCA_DIMS = 32
RANDOM_CONV_SEED = 0


# --------------------------------------------------------------------------- classifiers


def _arch(model: nn.Module, fallback: str | None) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name", None) or fallback or type(model).__name__


def classifier_extractor(path: str | os.PathLike, image_shape: tuple[int, int, int], *, arch: str | None = None,
                         distillation: str | os.PathLike | None = None, distillation_arch: str | None = None,
                         device: Any = "cpu", name: str = "classifier") -> ClassifierExtractor:
    """The ``name`` extractor (``"classifier"`` or ``"mlp-classifier"``) from a classifier's
    checkpoint ``path``; refused when its weights equal those of the ``distillation``
    checkpoint (measuring with the features one distilled into is circular). A
    ``distillation`` that is not a file (an ``imagenet_*`` name) cannot equal a trained digit
    classifier and is not compared."""
    model = load_classifier_checkpoint(path, "cpu", arch)
    fp = module_fingerprint(model)
    if distillation is not None and Path(distillation).is_file():
        other = load_classifier_checkpoint(distillation, "cpu", distillation_arch or arch)
        if module_fingerprint(other) == fp:
            raise UsageError(f"the evaluation classifier {path} is the distillation classifier {distillation}: "
                             "measuring with the features one distilled into is circular; train another "
                             "(another architecture or seed)")
    c = getattr(getattr(model, "config", None), "in_channels", image_shape[0])
    if c != image_shape[0]:
        raise UsageError(f"the evaluation classifier {path} takes {c}-channel images, the data has "
                         f"{image_shape[0]} channels")
    return ClassifierExtractor(model, _arch(model, arch), image_shape, name=name, fingerprint=fp).to(device)


# --------------------------------------------------------------------------- the panel


def panel_names(extractors: Sequence[str] = DEFAULT_EXTRACTORS, inception: str = "auto",
                inception_weights: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The extractor names a run measures with: ``extractors`` (checked, duplicates
    refused), plus ``"inception"`` when ``inception="always"`` or when it is ``"auto"`` and the
    weights are found; ``"never"`` drops it."""
    names = tuple(extractors)
    unknown = [n for n in names if n not in EXTRACTOR_NAMES]
    if unknown or len(set(names)) != len(names) or not names:
        raise ConfigError(f"eval.extractors: need distinct names from {EXTRACTOR_NAMES}, got {list(names)}")
    if inception not in INCEPTION_MODES:
        raise ConfigError(f"eval.inception must be one of {INCEPTION_MODES}, got {inception!r}")
    if inception == "never":
        return tuple(n for n in names if n != "inception")
    if "inception" not in names and (inception == "always" or find_inception_weights(inception_weights)):
        names += ("inception",)
    return names


def _check_classifier(name: str, source: bool | str | os.PathLike | None) -> str:
    """That the trained classifier behind extractor ``name`` will be there (a checkpoint path,
    or ``True`` when the run trains it); what it is, for the plan."""
    section, what = (("eval_classifier", "an evaluation classifier") if name == "classifier" else
                     ("mlp_classifier", "an MLP classifier"))
    if not source:
        raise UsageError(f"the {name!r} extractor needs {what}: add an {section} stage (or "
                         f"name a checkpoint), or drop {name!r} from eval.extractors")
    if not isinstance(source, bool) and not Path(source).is_file():
        raise UsageError(f"{name} checkpoint {source} does not exist")
    if name == "classifier":
        return "the evaluation classifier (not the distillation one)"
    return "the MLP classifier (its own architecture, recipe and seed; penultimate-layer features)"


def check_extractors_available(names: Sequence[str], *, classifier: bool | str | os.PathLike | None,
                               inception_weights: str | os.PathLike | None = None,
                               primary: str | None = None,
                               mlp_classifier: bool | str | os.PathLike | None = None) -> dict[str, str]:
    """Check, before anything is trained, that every extractor of ``names`` will be there:
    ``classifier`` is the evaluation classifier's checkpoint path (or ``True`` when the run
    trains one, ``False``/``None`` when there is none), ``mlp_classifier`` likewise for the
    ``"mlp-classifier"`` extractor; the Inception weights must be on this machine. Returns
    ``{name: what it will be}`` for the plan a run prints."""
    out = {}
    given = {"classifier": classifier, "mlp-classifier": mlp_classifier}
    for name in names:
        if name in given:
            out[name] = _check_classifier(name, given[name])
        elif name == "inception":
            found = find_inception_weights(inception_weights)
            if found is None:
                raise UsageError(f"the 'inception' extractor needs its weights on this machine (looked for "
                                 f"{inception_cache_path()}): put {INCEPTION_FILE} there, set "
                                 "eval.inception_weights=PATH, or use eval.inception=auto/never")
            out[name] = f"Inception ({found})"
        elif name == "random-conv":
            out[name] = f"a random conv net (seed {RANDOM_CONV_SEED}, no training)"
        elif name == "pca":
            out[name] = f"pixels on the top {PCA_DIMS} principal components of the training split, whitened"
        elif name == "pixels":
            out[name] = "raw pixels"
        else:
            raise ConfigError(f"eval.extractors: unknown extractor {name!r}; choose from {EXTRACTOR_NAMES}")
    if primary is not None and primary not in out:
        raise ConfigError(f"eval.primary={primary!r} is not one of the extractors measured ({list(out)})")
    return out


def build_panel(names: Sequence[str], image_shape: tuple[int, int, int], *,
                train_images: torch.Tensor | None = None,
                classifier: str | os.PathLike | None = None, classifier_arch: str | None = None,
                distillation_classifier: str | os.PathLike | None = None, distillation_arch: str | None = None,
                inception_weights: str | os.PathLike | None = None, device: Any = "cpu",
                mlp_classifier: str | os.PathLike | None = None) -> list[FeatureExtractor]:
    """The extractors of ``names`` (in that order) for images of ``image_shape``.
    ``train_images``: the reference training split (uint8), which ``"pca"`` is fitted on and
    ``"random-conv"`` scaled by;
    ``classifier``: the evaluation classifier's checkpoint; ``mlp_classifier``: the
    ``"mlp-classifier"`` extractor's; ``distillation_classifier``: the one RCFD distilled
    into (refused as either)."""
    check_extractors_available(names, classifier=classifier, inception_weights=inception_weights,
                               mlp_classifier=mlp_classifier)
    panel: list[FeatureExtractor] = []
    for name in names:
        if name in CLASSIFIER_EXTRACTORS:
            path = classifier if name == "classifier" else mlp_classifier
            panel.append(classifier_extractor(path, image_shape, name=name,
                                              arch=classifier_arch if name == "classifier" else None,
                                              distillation=distillation_classifier,
                                              distillation_arch=distillation_arch, device=device))
        elif name == "random-conv":
            panel.append(RandomConvExtractor(image_shape, seed=RANDOM_CONV_SEED, fit_images=train_images))
        elif name == "pixels":
            panel.append(PixelExtractor(image_shape))
        elif name == "pca":
            if train_images is None:
                raise UsageError("the 'pca' extractor is fitted on the training split: pass train_images")
            panel.append(PixelExtractor(image_shape, pca_dims=PCA_DIMS, fit_images=train_images))
        elif name == "inception":
            panel.append(InceptionExtractor(inception_weights))
    return [e.to(device) for e in panel]
