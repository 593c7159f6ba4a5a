"""Frozen-dataclass configs that check themselves and round-trip through plain dicts, JSON
and YAML: the machinery under :mod:`rcfd.config`.

A config class derives from :class:`Config`, declares its nested config fields in
``_nested`` and validates its fields in ``__post_init__`` with the checks below, whose
errors name the field and the accepted values. ``from_dict`` refuses unknown keys (naming
the key and listing the valid ones) and prefixes errors with the dotted path of the field;
``with_overrides`` takes ``{"base.steps": 100}``-style overrides, parsing strings as YAML
scalars so that CLI ``key=value`` pairs pass through.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

# --------------------------------------------------------------------------- checks


def check_int(name: str, v: Any, lo: int = 1, none: bool = False) -> None:
    if v is None and none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def check_float(name: str, v: Any, lo: float = 0.0, hi: float = math.inf, *, lo_open=False,
           hi_open=False, none=False) -> None:
    if v is None and none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{hb}, got {v!r}")


def check_pow2(name: str, v: Any) -> None:
    check_int(name, v)
    if v & (v - 1):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, ...), got {v}")


def check_choice(name: str, v: Any, choices: tuple) -> None:
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {v!r}")


def is_pow2(v: int) -> bool:
    return isinstance(v, int) and v >= 1 and not v & (v - 1)


# --------------------------------------------------------------------------- YAML


def yaml_load(text: str):
    """``yaml.safe_load`` that also reads ``1e-4`` as a float: PyYAML follows YAML 1.1, where
    a float needs a dot (``1.0e-4``), so learning rates written the usual way came back as
    strings."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


# --------------------------------------------------------------------------- dict round trip


def _foreign_to_dict(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return v.to_dict()
    return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _foreign_to_dict(v)
    if isinstance(v, tuple):
        return [_plain(e) for e in v]
    return v


def _strict_keys(cls, d: Mapping, where: str) -> None:
    if not isinstance(d, Mapping):
        raise TypeError(f"{where or cls.__name__} must be a mapping, got {type(d).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ValueError(f"unknown key {_dot(where, unknown[0])!r} in {cls.__name__}; "
                         f"valid keys: {', '.join(valid)}")


def _dot(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _build(cls, d: Mapping, where: str):
    """``cls(**d)`` with nested configs built from dicts, lists made tuples where the default
    is a tuple, strict keys, and errors prefixed by the dotted path."""
    _strict_keys(cls, d, where)
    nested = getattr(cls, "_nested", {})
    kwargs = {}
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        sub = nested.get(k)
        if sub is not None and isinstance(v, Mapping):
            v = _build(sub, v, _dot(where, k))
        elif isinstance(v, list):
            f = defaults[k]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(default, tuple) or default is None:
                v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(f"{where}: {msg}" if where and not msg.startswith(where) else msg) from None


class Config:
    """Shared behaviour of the stage configs: dict/JSON round trip and dotted overrides."""

    _nested: ClassVar[dict] = {}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON/``weights_only``-safe values (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an
        error naming the key and the valid ones."""
        return _build(cls, d, "")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any]):
        """A copy with dotted-path overrides, e.g. ``{"base.steps": 100, "rcfd.loss.tau":
        0.9}``. String values for non-string fields are parsed as YAML scalars (``"100"``,
        ``"1e-4"``, ``"null"``, ``"[1, 2]"``), so CLI ``key=value`` pairs pass through."""
        d = self.to_dict()
        for key, value in overrides.items():
            node, cls, parts = d, type(self), key.split(".")
            for i, part in enumerate(parts):
                valid = [f.name for f in dataclasses.fields(cls)]
                if part not in valid:
                    raise ValueError(f"unknown config key {'.'.join(parts[:i + 1])!r}; valid keys "
                                     f"at that level: {', '.join(valid)}")
                if i == len(parts) - 1:
                    if isinstance(value, str) and not isinstance(node.get(part), str):
                        value = yaml_load(value)
                    node[part] = _plain(value)
                    break
                sub = getattr(cls, "_nested", {}).get(part)
                if sub is None or not isinstance(node.get(part), dict):
                    raise ValueError(f"config key {'.'.join(parts[:i + 1])!r} is a value, not a "
                                     f"section; cannot set {key!r}")
                node, cls = node[part], sub
        return type(self).from_dict(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------- files


def read_mapping(path: str | os.PathLike) -> dict:
    """The mapping a ``.json``, ``.yaml`` or ``.yml`` file holds."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    text = path.read_text(encoding="utf-8")
    d = json.loads(text) if suffix == ".json" else yaml_load(text)
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(d).__name__}")
    return d


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as JSON (atomically enough: a temp file renamed over ``path``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(cfg.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out
