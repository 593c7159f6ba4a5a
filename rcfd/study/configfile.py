"""Config files and dotted overrides: reading a JSON/YAML mapping, applying ``--set a.b=v``
overrides (values read as YAML scalars), merging a file over a preset, and writing a config
atomically. Kept apart from :mod:`rcfd.config` (pure validation) so that what only needs the
field types (the losses, the networks) imports neither YAML nor the file helpers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from rcfd.config import Section, parse, section_type
from rcfd.errors import ConfigError
from rcfd.io.files import write_text

S = TypeVar("S", bound=Section)


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):  # str | None and the like
        return any(_is_text(a) for a in get_args(annotation) if a is not type(None))
    return False


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


def with_overrides(cfg: S, overrides: Mapping[str, Any]) -> S:
    """A copy of ``cfg`` with dotted-path overrides, e.g. ``{"base.steps": 100}``; string
    values of non-string fields are read as YAML scalars (``"1e-4"``, ``"null"``, ``"[1, 2]"``)."""
    return parse(type(cfg), apply_overrides(cfg.to_dict(), overrides, type(cfg)))
