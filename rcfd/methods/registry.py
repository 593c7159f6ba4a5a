"""The registry of training methods: the one list that the pipeline's stage plan, the command
line's stage names, the configuration's sections, the evaluation pairs and the results
table's rows all iterate over.

A :class:`Method` says everything the rest of the package needs to know about a way of
training: its config section(s), the values of other sections it reads (``reads``), what it
needs (earlier stages), how to train it, and which samplers it produces for evaluation
(:class:`Row`). Its callbacks never see the whole study config: they get a :class:`View`
holding its own sections, the values it declares in ``reads`` and the run-level values every
method may read (:data:`RUN_LEVEL`); anything else is an ``AttributeError`` saying what to
declare. Adding a method is writing one module that defines a :class:`Method`; see
:mod:`rcfd.methods.pd` for a small one and README "Adding a method" for a plug-in.

Methods are found through the entry-point group :data:`GROUP` (``rcfd.methods``), the
package's own (declared in its ``pyproject.toml``) and other distributions' (plug-ins)
alike, once, on the first lookup (:func:`methods`, :func:`get`...): first the built-in
methods in :data:`BUILTIN`'s order (from the package's entry points, or from
:data:`BUILTIN` itself where the package's metadata does not have them, e.g. a source tree
on ``sys.path``), then the plug-ins sorted by entry-point name, each checked as
:func:`register` checks a method. A plug-in that fails (it does not import, is not a
:class:`Method`, its name or a section is taken, what it needs is not registered before it)
is left out with one line naming it and its distribution (printed, and kept in
:func:`problems`); the others load. :func:`register` / :func:`registered` add a method at
run time (tests, experiments). Importing a method module only defines its :class:`Method`.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

GROUP = "rcfd.methods"
PACKAGE = "rcfd"  # the distribution whose entry points in GROUP are the built-in methods
# The built-in methods, in the order the pipeline runs them: (name, "module:attribute"), the
# entry points pyproject.toml declares (tests/test_plugin.py checks the two agree); the
# fallback where the package's metadata lacks them.
BUILTIN = (("classifier", "rcfd.methods.classifier:METHOD"),
           ("base", "rcfd.methods.base:METHOD"),
           ("pd", "rcfd.methods.pd:METHOD"),
           ("rcfd", "rcfd.methods.rcfd:METHOD"),
           ("cfd", "rcfd.methods.rcfd:CFD_METHOD"),
           ("cd", "rcfd.methods.cd:METHOD"))
# What every method may read of the study config, besides its own sections and its ``reads``.
RUN_LEVEL = {"data": "data", "seed": "seed", "eval_steps": "eval.steps"}
# The study config's run-level keys, which no method section may take (tests/test_plugin.py
# checks them against rcfd.study.config.PipelineBase).
RESERVED = ("name", "seed", "device", "threads", "data", "eval")
_NAME = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class Row:
    """One sampler to evaluate: the checkpoint of ``<stage>/<unit>`` sampled with ``sampler``
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


@dataclass(frozen=True)
class DistilledClassifier:
    """The classifier a method distills into, as its section names it: ``source`` is
    ``"distill"``/``"eval"`` (the run's own classifier stage), an ``imagenet_*`` name or a
    checkpoint path; ``arch`` the architecture of a reference-format checkpoint."""

    source: str
    arch: str | None = None


class View:
    """What a method's callbacks see of the study config: its own sections, the values it
    declares in ``reads`` and :data:`RUN_LEVEL`, as attributes. Reaching for anything else
    raises an ``AttributeError`` that names the value to declare."""

    __slots__ = ("_method", "_values")

    def __init__(self, method: str, values: Mapping[str, Any]):
        object.__setattr__(self, "_method", method)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        method = object.__getattribute__(self, "_method")
        raise AttributeError(f"method {method!r} reads {name!r}, which it does not declare: add it "
                             f"to its reads (e.g. reads={{{name!r}: 'section.field'}}); it sees "
                             f"{', '.join(sorted(values))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a method's view of the config is read-only")

    def __repr__(self) -> str:
        return f"View({object.__getattribute__(self, '_method')!r}, {sorted(self._values)})"


def resolve(cfg: Any, path: str) -> Any:
    """The value at dotted ``path`` of ``cfg`` (``"base.T"``); ``None`` where a section on
    the way is ``None`` (switched off). An unknown name is an ``AttributeError``."""
    value = cfg
    for part in path.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


def _no_rows(view: View) -> list[Row]:
    return []


def _no_inputs(view: View, run_dir: Path) -> list[Path]:
    return []


@dataclass(frozen=True)
class Method:
    """A training method. Every callback takes the method's :class:`View` of the config:

    * ``name``: the stage name on the command line and the run directory's folder;
    * ``sections``: the config sections it owns, ``key -> (type, default factory)``; a
      section whose value is ``None`` switches the method off;
    * ``reads``: the values of other sections it reads, ``name -> dotted path`` (e.g.
      ``{"teacher_T": "base.T"}``), seen as ``view.<name>``;
    * ``train(view, run) -> [checkpoint paths]``: trains it in the run directory of ``run``
      (a :class:`rcfd.training.rundir.RunContext`);
    * ``rows(view) -> [Row]``: the samplers it produces, for evaluation;
    * ``describe(view) -> str``: one line for the plan a run prints first;
    * ``needs``: the stages whose outputs it reads (they run before it);
    * ``inputs(view, run_dir) -> [paths]``: the checkpoints of earlier stages it reads, so
      that a command missing them is refused before it writes anything;
    * ``check(view)``: cross-checks against what it reads (raise ``ValueError``);
    * ``distills_into(view) -> DistilledClassifier | None``: the classifier it distills
      into (the evaluation refuses to measure with it);
    * ``compare_to``: the method its rows are compared with, paired by seed, in studies;
    * ``presets``: the values it contributes to named presets, ``{preset: {section key:
      values or None}}`` (e.g. ``{"smoke": {"cd": {"steps": 4}}}``), merged under the
      preset's own values by :func:`rcfd.study.presets.get_preset` (``None`` switches the
      method off in that preset).
    """

    name: str
    sections: Mapping[str, tuple[Any, Callable[[], Any]]]
    train: Callable[[Any, Any], list[Path]]
    describe: Callable[[Any], str]
    rows: Callable[[Any], list[Row]] = _no_rows
    reads: Mapping[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    inputs: Callable[[Any, Path], list[Path]] = _no_inputs
    check: Callable[[Any], None] | None = None
    distills_into: Callable[[Any], DistilledClassifier | None] | None = None
    compare_to: str | None = None
    help: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def produces_samplers(self) -> bool:
        """Whether the method makes samplers to evaluate (rows in the results)."""
        return self.rows is not _no_rows

    def enabled(self, cfg: Any) -> bool:
        """Whether ``cfg`` switches this method on (any of its sections is not ``None``)."""
        return any(getattr(cfg, key, None) is not None for key in self.sections)

    def view(self, cfg: Any) -> View:
        """This method's :class:`View` of the study config ``cfg``."""
        paths = {**RUN_LEVEL, **self.reads, **{key: key for key in self.sections}}
        return View(self.name, {name: resolve(cfg, path) for name, path in paths.items()})


_METHODS: dict[str, Method] = {}
_VERSION = [0]  # bumped on every change, so derived classes are rebuilt
_LOADED = [False]
_PROBLEMS: list[str] = []


def _dist_name(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.name


def _origin(ep: EntryPoint) -> str:
    """``'<name>' (<value>) of the distribution <dist> <version>``, for messages."""
    dist = getattr(ep, "dist", None)
    where = (f"the distribution {dist.name} {dist.version}" if dist is not None
             else "an unknown distribution")
    return f"{ep.name!r} ({ep.value}) of {where}"


def method_entry_points() -> tuple[list[EntryPoint], list[EntryPoint]]:
    """``(built-in, plug-ins)``: the entry points of :data:`GROUP` to load, the built-in
    ones in :data:`BUILTIN`'s order (the package's own entry point of each name, or the
    :data:`BUILTIN` value where the package's metadata lacks it), then every other entry
    point of the group sorted by name (and distribution)."""
    found = list(entry_points(group=GROUP))
    own = {ep.name: ep for ep in found if _dist_name(ep) == PACKAGE}
    builtin = [own.get(name) or EntryPoint(name, value, GROUP) for name, value in BUILTIN]
    names = {name for name, _ in BUILTIN}
    plugins = [ep for ep in found if not (ep.name in names and _dist_name(ep) == PACKAGE)]
    return builtin, sorted(plugins, key=lambda ep: (ep.name, _dist_name(ep) or ""))


def _load_plugin(ep: EntryPoint) -> None:
    """Load and add one plug-in, or record (and print) the one line saying why not."""
    try:
        method = ep.load()
        if isinstance(method, Method) and method.name != ep.name:
            raise ValueError(f"its entry point is named {ep.name!r} but the method {method.name!r}")
        _add(method)
    except Exception as exc:  # a broken plug-in must not hide the others or the built-ins
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        line = (f"plug-in method {_origin(ep)} was not loaded: {type(exc).__name__}"
                + (f": {reason}" if reason else ""))
        _PROBLEMS.append(line)
        print(f"rcfd: {line}", file=sys.stderr, flush=True)


def _load_builtins() -> None:
    """Register the methods of :data:`GROUP`, once: the built-in ones (an error there is
    the package's own bug and raises), then the plug-ins (:func:`_load_plugin`)."""
    if _LOADED[0]:
        return
    _LOADED[0] = True
    builtin, plugins = method_entry_points()
    for ep in builtin:
        _add(ep.load())
    for ep in plugins:
        _load_plugin(ep)


def problems() -> list[str]:
    """The one-line reasons of the plug-ins that were found but not loaded."""
    _load_builtins()
    return list(_PROBLEMS)


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of the package's own methods (:data:`BUILTIN`)."""
    return any(name == builtin for builtin, _ in BUILTIN)


def _check(method: Method) -> None:
    """What every added method must satisfy (``ValueError``/``TypeError`` saying what)."""
    if not isinstance(method, Method):
        raise TypeError(f"a method must be a rcfd.methods.registry.Method, got "
                        f"{type(method).__name__}")
    if not _NAME.fullmatch(method.name):
        raise ValueError(f"a method's name must be lower-case letters, digits, '-' or '_' "
                         f"(a stage name on the command line), got {method.name!r}")
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    taken = {k for m in _METHODS.values() for k in m.sections} | set(RESERVED)
    clash = taken & set(method.sections)
    if clash:
        raise ValueError(f"config section(s) {sorted(clash)} of {method.name!r} are taken")
    unknown = [n for n in method.needs if n not in _METHODS]
    if unknown:
        raise ValueError(f"{method.name!r} needs {unknown}, which are not registered before it")
    for preset, values in method.presets.items():
        foreign = sorted(set(values) - set(method.sections))
        if foreign:
            raise ValueError(f"{method.name!r} gives preset {preset!r} values for {foreign}, "
                             f"which are not its sections ({sorted(method.sections)})")


def _add(method: Method) -> Method:
    _check(method)
    _METHODS[method.name] = method
    _VERSION[0] += 1
    return method


def register(method: Method) -> Method:
    """Add ``method`` (after the built-in ones and those registered before it); its name and
    section keys must be new, and what it needs must already be registered."""
    _load_builtins()
    return _add(method)


def unregister(name: str) -> None:
    """Remove the method ``name`` (no other registered method may need it)."""
    _load_builtins()
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
    _load_builtins()
    return list(_METHODS.values())


def get(name: str) -> Method:
    """The registered method ``name`` (a ``ValueError`` listing the methods otherwise)."""
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(_METHODS)}") from None


def version() -> int:
    """A number that changes whenever a method is registered or unregistered."""
    _load_builtins()
    return _VERSION[0]
