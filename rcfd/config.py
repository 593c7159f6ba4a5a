"""Typed configuration on pydantic v2: the field types every config section shares, reading
configs from JSON/YAML, dotted overrides and errors that name the key.

A section is a :class:`Section` (frozen, unknown keys refused, every value validated on
construction, so an invalid value fails before anything runs). The sections of the training
methods live with their methods (:mod:`rcfd.methods`); the whole study's config is assembled
from the registered methods by :func:`rcfd.methods.registry.pipeline_config_class`.

Why pydantic: constrained fields and ``Literal`` choices give errors that name the key and
the allowed values, ``extra="forbid"`` catches misspelt keys, frozen models are hashable
values, and the dict/JSON round trip is built in. Numbers are read laxly (``"1e-4"`` from a
YAML 1.1 file or a ``--set`` is a float) except that ``true``/``false`` never pass as
numbers (:data:`Int`, :data:`Float`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from rcfd.io.files import write_text
from rcfd.errors import ConfigError


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v}")
    return v


def _pow2(v: int) -> int:
    if v < 1 or v & (v - 1):
        raise ValueError(f"must be a power of two (1, 2, 4, ...), got {v}")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
PosInt = Annotated[Int, Field(ge=1)]
NonNegInt = Annotated[Int, Field(ge=0)]
Pow2 = Annotated[Int, AfterValidator(_pow2)]
Float = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_finite)]
PosFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]
Decay = Annotated[Float, Field(ge=0, lt=1)]


def is_pow2(v: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and not v & (v - 1)


class Section(BaseModel):
    """A config section: frozen, strict about keys, validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    title: ClassVar[str | None] = None  # what errors call the whole (default: the class name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON- and ``weights_only``-safe dict (tuples become lists)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any):
        """Inverse of :meth:`to_dict`; a :class:`~rcfd.errors.ConfigError` names every bad
        key (unknown keys with the valid ones)."""
        return parse(cls, d)

    def replace(self, **changes):
        """A validated copy with ``changes``."""
        return type(self).model_validate({**self.to_dict(), **changes})

    def with_overrides(self, overrides: Mapping[str, Any]):
        """A copy with dotted-path overrides, e.g. ``{"base.steps": 100}``; string values
        of non-string fields are read as YAML scalars (``"1e-4"``, ``"null"``, ``"[1, 2]"``)."""
        return parse(type(self), apply_overrides(self.to_dict(), overrides, type(self)))


# --------------------------------------------------------------------------- errors


def _path(loc: tuple) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not ("[" in p or p.startswith("function-")):  # pydantic's validator steps
            out += f".{p}" if out else p
    return out


def describe(e: ValidationError, prefix: str = "", whole: str = "config") -> str:
    """One line per problem: ``base.loss: Input should be 'both', 'x' or 'eps' (got 'bth')``."""
    lines = []
    for err in e.errors(include_url=False):
        key = ".".join(filter(None, [prefix, _path(err["loc"])])).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif not isinstance(got, (dict, list)) and err["type"] != "missing" and "got" not in msg:
            msg += f" (got {got!r})"
        lines.append(f"{key or whole}: {msg}")
    return "; ".join(lines)


def parse(model: type[BaseModel], data: Any, prefix: str = ""):
    """``model`` validated from ``data``; a :class:`~rcfd.errors.ConfigError` names every
    problem by its dotted key (and, for unknown keys, lists the valid ones)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg = describe(e, prefix, getattr(model, "title", None) or model.__name__)
        unknown = [err["loc"] for err in e.errors() if err["type"] == "extra_forbidden"]
        if unknown:
            msg += f" (valid keys there: {', '.join(_fields_at(model, unknown[0][:-1]))})"
        raise ConfigError(msg) from None


# --------------------------------------------------------------------------- overrides


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The :class:`BaseModel` inside an annotation like ``X``, ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = section_type(arg)
        if found is not None:
            return found
    return None


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):  # str | None and the like
        return any(_is_text(a) for a in get_args(annotation) if a is not type(None))
    return False


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = section_type(field.annotation) if field else None
        if sub is None:
            break
        model = sub
    return list(model.model_fields)


def apply_overrides(data: dict, overrides: Mapping[str, Any], model: type[BaseModel]) -> dict:
    """``data`` (a config as a dict) with dotted-key ``overrides`` applied; keys are checked
    against ``model`` level by level (an unknown key names the valid ones). A section that is
    ``null`` in ``data`` starts from its defaults when one of its keys is set."""
    data = json.loads(json.dumps(data))  # a deep copy of plain values
    for key, value in overrides.items():
        node, cls, parts = data, model, key.split(".")
        for i, part in enumerate(parts):
            where = ".".join(parts[:i + 1])
            field = cls.model_fields.get(part)
            if field is None:
                raise ConfigError(f"unknown config key {where!r}; valid keys at that level: "
                                  f"{', '.join(cls.model_fields)}")
            if i == len(parts) - 1:
                if isinstance(value, str) and not _is_text(field.annotation):
                    value = yaml_scalar(value, where)
                node[part] = value
                break
            sub = section_type(field.annotation)
            if sub is None:
                raise ConfigError(f"config key {where!r} is a value, not a section; cannot set {key!r}")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, cls = node[part], sub
    return data


def yaml_scalar(text: str, key: str = "value") -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read {text!r} ({e.__class__.__name__})") from None


def merge(base: dict, top: Mapping) -> dict:
    """``top`` merged over ``base``, recursively for dicts on both sides."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- files


def read_mapping(path: str | os.PathLike) -> dict:
    """The mapping a ``.json``, ``.yaml`` or ``.yml`` file holds."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must end in .json, .yaml or .yml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        d = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise ConfigError(f"{path} is not valid {kind}: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(d).__name__}")
    return d


def save_config(cfg: Section, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as JSON, atomically."""
    return write_text(path, cfg.to_json() + "\n")
