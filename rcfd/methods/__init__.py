"""The training methods, each one module that defines its :class:`Method`: the classifier
stage (:mod:`~rcfd.methods.classifier`), the base model (:mod:`~rcfd.methods.base`),
progressive distillation (:mod:`~rcfd.methods.pd`), and RCFD with its CFD ablation
(:mod:`~rcfd.methods.rcfd`). :mod:`~rcfd.methods.registry` finds them, and plug-ins from
other distributions, through the entry-point group ``rcfd.methods``
(:data:`~rcfd.methods.registry.BUILTIN`: the built-ins' order and fallback) and registers
them on first lookup; importing this package registers nothing."""

from rcfd.methods.registry import (
    DistilledClassifier,
    Method,
    Row,
    View,
    get,
    methods,
    problems,
    register,
    registered,
    unregister,
)

__all__ = ["DistilledClassifier", "Method", "Row", "View", "get", "methods", "problems",
           "register", "registered", "unregister"]
