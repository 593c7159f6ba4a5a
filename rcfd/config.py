"""Typed configuration on pydantic v2: the field types every config section shares,
:class:`Section`, and validation errors that name the key. Pure validation: no YAML, no
files (reading config files, dotted overrides and saving a config are
:mod:`rcfd.study.configfile`), so that the loss objects and networks that use these field
types import nothing else.

A section is a :class:`Section` (frozen, unknown keys refused, every value validated on
construction, so an invalid value fails before anything runs). The sections of the training
methods live with their methods (:mod:`rcfd.methods`); the whole study's config is assembled
from the registered methods by :func:`rcfd.study.config.pipeline_config_class`.

Why pydantic: constrained fields and ``Literal`` choices give errors that name the key and
the allowed values, ``extra="forbid"`` catches misspelt keys, frozen models are hashable
values, and the dict/JSON round trip is built in. Numbers are read laxly (``"1e-4"`` from a
YAML 1.1 file or a ``--set`` is a float) except that ``true``/``false`` never pass as
numbers (:data:`Int`, :data:`Float`).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

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


# --------------------------------------------------------------------------- the fields of a model


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The :class:`BaseModel` inside an annotation like ``X``, ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = section_type(arg)
        if found is not None:
            return found
    return None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = section_type(field.annotation) if field else None
        if sub is None:
            break
        model = sub
    return list(model.model_fields)
