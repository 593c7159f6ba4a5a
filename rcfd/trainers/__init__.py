"""Training stages. Each module exposes one entry point that the CLI calls:

* :func:`train_classifier` (``classifier.py``): ``classifier/distill.pt`` or ``classifier/eval.pt``;
* :func:`train_base` (``base.py``): ``base/model.pt``;
* :func:`train_pd` (``progressive.py``): ``pd/T<T/2>.pt ... pd/T<final>.pt``;
* :func:`train_rcfd` (``rcfd.py``): ``rcfd/T<start/2>.pt ... rcfd/T<final>.pt``.

All of them run through the one shared loop of :mod:`rcfd.trainers.loop`; the run directory
layout is described in :mod:`rcfd.trainers.rundir` (see also :func:`checkpoint_path`).
"""

from rcfd.trainers.base import train_base
from rcfd.trainers.classifier import load_classifier, train_classifier
from rcfd.trainers.loop import Interrupted, NonFiniteLossError
from rcfd.trainers.progressive import train_pd
from rcfd.trainers.rcfd import resolve_classifier, train_rcfd
from rcfd.trainers.rundir import (
    RunContext,
    StageExistsError,
    checkpoint_path,
    metrics_path,
    state_path,
)

__all__ = ["Interrupted", "NonFiniteLossError", "RunContext", "StageExistsError",
           "checkpoint_path", "load_classifier", "metrics_path", "resolve_classifier",
           "state_path", "train_base", "train_classifier", "train_pd", "train_rcfd"]
