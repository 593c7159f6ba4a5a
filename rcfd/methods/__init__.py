"""The training methods, each one module that registers itself with
:mod:`rcfd.methods.registry` when imported: the classifier stage
(:mod:`~rcfd.methods.classifier`), the base model (:mod:`~rcfd.methods.base`), progressive
distillation (:mod:`~rcfd.methods.pd`), and RCFD with its CFD ablation
(:mod:`~rcfd.methods.rcfd`). The pipeline runs them in this order. A new method is a new
module here (imported below, or registered from anywhere before the pipeline runs)."""

# Each module registers its method when imported; the order is the order the pipeline runs.
from rcfd.methods import classifier  # noqa: F401, I001
from rcfd.methods import base  # noqa: F401, I001
from rcfd.methods import pd  # noqa: F401, I001
from rcfd.methods import rcfd  # noqa: F401, I001
from rcfd.methods.registry import Method, Row, get, methods, register, registered, unregister

__all__ = ["Method", "Row", "get", "methods", "register", "registered", "unregister"]
