"""Measuring samples (METHOD.md, "Evaluation"; the protocol is written down in
docs/results-digits.md, "How samples are measured"), along its flow:

* :mod:`~rcfd.evaluation.measure`: samples from a checkpoint, the reference splits;
* :mod:`~rcfd.evaluation.features`, :mod:`~rcfd.evaluation.fidelity`: the extractors of the
  panel; :mod:`~rcfd.evaluation.extractors` builds the panel from names and paths;
* :mod:`~rcfd.evaluation.metrics`: FID, KID, IS, precision/recall from features;
* :mod:`~rcfd.evaluation.panel`: reference features, every metric x extractor x split,
  the noise floors;
* :mod:`~rcfd.evaluation.stage`: :func:`evaluate_rows`, the stage the pipeline calls.
"""

from rcfd.evaluation.extractors import (
    DEFAULT_EXTRACTORS,
    EXTRACTOR_NAMES,
    build_panel,
    check_extractors_available,
    panel_names,
)
from rcfd.evaluation.features import FeatureExtractor, Features
from rcfd.evaluation.measure import dataset_spec_for, load_references, sample_images
from rcfd.evaluation.panel import References, measure_panel, panel_features
from rcfd.evaluation.stage import EvalSettings, evaluate_rows, format_metrics

__all__ = ["DEFAULT_EXTRACTORS", "EXTRACTOR_NAMES", "EvalSettings", "FeatureExtractor", "Features", "References",
           "build_panel", "check_extractors_available", "dataset_spec_for", "evaluate_rows", "format_metrics",
           "load_references", "measure_panel", "panel_features", "panel_names",
           "sample_images"]
