"""The registry of training methods: the one list that the pipeline's stage plan, the command
line's stage names, the configuration's sections, the evaluation pairs and the results
table's rows all iterate over.

A :class:`Method` says everything the rest of the package needs to know about a way of
training: its config section(s), what it needs (earlier stages), how to train it, and which
samplers it produces for evaluation (:class:`Row`). Adding a method is writing one module
that builds a :class:`Method` and calls :func:`register` (see :mod:`rcfd.methods.pd` for a
small one); nothing else changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    """One sampler to evaluate: the checkpoint ``<stage>/<unit>.pt`` sampled with ``sampler``
    in ``steps`` steps, shown in the results table as row ``label``, column ``steps``."""

    method: str
    label: str
    steps: int
    stage: str
    unit: str
    sampler: str = "ddim"

    @property
    def key(self) -> str:
        """The row's identity in results files: ``method`` or ``method/sampler``."""
        return self.method if self.sampler == "ddim" else f"{self.method}/{self.sampler}"


def _no_rows(cfg: Any) -> list[Row]:
    return []


def _no_inputs(cfg: Any, run_dir: Path) -> list[Path]:
    return []


@dataclass(frozen=True)
class Method:
    """A training method.

    * ``name``: the stage name on the command line and the run directory's folder;
    * ``sections``: the config sections it owns, ``key -> (type, default factory)``; a
      section whose value is ``None`` switches the method off;
    * ``train(cfg, run) -> [checkpoint paths]``: trains it from the whole pipeline config
      ``cfg`` in the run directory of ``run`` (a :class:`rcfd.training.rundir.RunContext`);
    * ``rows(cfg) -> [Row]``: the samplers it produces, for evaluation;
    * ``describe(cfg) -> str``: one line for the plan a run prints first;
    * ``needs``: the stages whose outputs it reads (they run before it);
    * ``inputs(cfg, run_dir) -> [paths]``: the checkpoints of earlier stages it reads, so that
      a command missing them is refused before it writes anything;
    * ``check(cfg)``: cross-checks over the whole config (raise ``ValueError``);
    * ``compare_to``: the method its rows are compared with, paired by seed, in studies.
    """

    name: str
    sections: Mapping[str, tuple[Any, Callable[[], Any]]]
    train: Callable[[Any, Any], list[Path]]
    describe: Callable[[Any], str]
    rows: Callable[[Any], list[Row]] = _no_rows
    needs: tuple[str, ...] = ()
    inputs: Callable[[Any, Path], list[Path]] = _no_inputs
    check: Callable[[Any], None] | None = None
    compare_to: str | None = None
    help: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def produces_samplers(self) -> bool:
        """Whether the method makes samplers to evaluate (rows in the results)."""
        return self.rows is not _no_rows

    def enabled(self, cfg: Any) -> bool:
        """Whether ``cfg`` switches this method on (any of its sections is not ``None``)."""
        return any(getattr(cfg, key, None) is not None for key in self.sections)


_METHODS: dict[str, Method] = {}
_VERSION = [0]  # bumped on every change, so derived classes are rebuilt


def register(method: Method) -> Method:
    """Add ``method`` (after those registered before it); its name and section keys must be
    new, and what it needs must already be registered."""
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    taken = {k for m in _METHODS.values() for k in m.sections}
    clash = taken & set(method.sections)
    if clash:
        raise ValueError(f"config section(s) {sorted(clash)} of {method.name!r} are taken")
    unknown = [n for n in method.needs if n not in _METHODS]
    if unknown:
        raise ValueError(f"{method.name!r} needs {unknown}, which are not registered before it")
    _METHODS[method.name] = method
    _VERSION[0] += 1
    return method


def unregister(name: str) -> None:
    dependants = [m.name for m in _METHODS.values() if name in m.needs]
    if dependants:
        raise ValueError(f"cannot unregister {name!r}: {dependants} need it")
    del _METHODS[name]
    _VERSION[0] += 1


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """``method`` registered for the duration of a ``with`` block (tests, experiments)."""
    register(method)
    try:
        yield method
    finally:
        unregister(method.name)


def methods() -> list[Method]:
    """Every registered method, in the order the pipeline runs them."""
    return list(_METHODS.values())


def get(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(_METHODS)}") from None


def version() -> int:
    return _VERSION[0]
