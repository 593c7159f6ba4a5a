"""The training methods, each one module that defines its :class:`Method`: the classifier
stage (:mod:`~rcfd.methods.classifier`), the base model (:mod:`~rcfd.methods.base`),
progressive distillation (:mod:`~rcfd.methods.pd`), and RCFD with its CFD ablation
(:mod:`~rcfd.methods.rcfd`). :mod:`~rcfd.methods.registry` lists them
(:data:`~rcfd.methods.registry.BUILTIN`, the order the pipeline runs them) and registers them
on first lookup; importing this package registers nothing."""

from rcfd.methods.registry import (
    DistilledClassifier,
    Method,
    Row,
    View,
    get,
    methods,
    register,
    registered,
    unregister,
)

__all__ = ["DistilledClassifier", "Method", "Row", "View", "get", "methods", "register",
           "registered", "unregister"]
