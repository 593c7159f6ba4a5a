"""The configuration of a whole study: run-level fields, the data, the evaluation, and one
section per registered method (:mod:`rcfd.methods`), assembled from the registry so that a
new method's section appears here, in ``--set`` and in ``--dry-run`` without any edit.

:func:`pipeline_config_class` builds the pydantic model; :func:`parse_pipeline` validates a
dict into it (every method's cross-checks run in one validator); :func:`load_config` reads a
JSON/YAML file, which may start from a preset (``preset: digits``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, create_model, field_validator, model_validator

from rcfd.config import (
    Int,
    NonNegInt,
    PosInt,
    Pow2,
    Section,
    apply_overrides,
    merge,
    parse,
    read_mapping,
)
from rcfd.data import DatasetSpec
from rcfd.errors import ConfigError
from rcfd.evaluation.extractors import DEFAULT_EXTRACTORS, EXTRACTOR_NAMES
from rcfd.methods import registry
from rcfd.samplers import SAMPLERS


class EvalConfig(Section):
    """Evaluation (METHOD.md, "Evaluation"; the protocol: docs/results-digits.md, "How samples
    are measured"): ``num_samples`` samples of every row the methods produce (each distilled
    student whose ``T`` is in ``steps``; the base model with each sampler of ``samplers`` at
    ``base_steps``), measured by every extractor of the panel (``extractors``, plus Inception
    per ``inception``: ``auto`` adds it when its weights are here) against the held-out test
    split and the training split. ``primary``/``reference`` pick the numbers of the
    Table-1-shaped table; ``floor``: the row sampled twice for the two-seed noise floor (a
    row key such as ``pd`` takes its cheapest row; or ``first``, ``all``, ``none``);
    ``methods``: which methods' rows to measure (``None``: all). ``dtype``: the model's while
    sampling (``auto``: bf16 on CUDA, fp32 elsewhere); recorded with the results."""

    steps: tuple[Pow2, ...] = (1, 2, 4, 8)
    methods: tuple[str, ...] | None = None
    base_steps: tuple[Pow2, ...] = ()
    samplers: tuple[Literal[tuple(SAMPLERS)], ...] = ("ddim",)
    num_samples: Annotated[Int, Field(ge=20)] = 50_000
    batch_size: PosInt = 500
    extractors: tuple[Literal[EXTRACTOR_NAMES], ...] = DEFAULT_EXTRACTORS
    inception: Literal["auto", "always", "never"] = "auto"
    inception_weights: str | None = None
    primary: Literal[EXTRACTOR_NAMES] = "classifier"
    reference: Literal["test", "train"] = "test"
    floor: str = "pd"
    grid_images: NonNegInt = 64
    dtype: Literal["auto", "fp32", "bf16"] = "auto"

    @model_validator(mode="after")
    def _primary_measured(self):
        if self.primary not in self.extractors and self.primary != "inception":
            raise ValueError(f"primary={self.primary!r} is not one of the extractors {list(self.extractors)}")
        return self


class PipelineBase(Section):
    """The run-level fields of a study: data -> classifiers -> base -> PD -> RCFD ->
    evaluation. ``threads``: torch's CPU threads (``None``: one per core this process may
    use, see :mod:`rcfd.training.threads`; recorded with the results). ``device``:
    ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``..."""

    title: ClassVar[str] = "config"

    name: Annotated[str, Field(min_length=1)] = "digits"
    seed: NonNegInt = 0
    device: str = "auto"
    threads: Annotated[PosInt, Field(le=1024)] | None = None
    data: DatasetSpec = DatasetSpec()
    eval: EvalConfig = EvalConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}")

    @model_validator(mode="after")
    def _cross_checks(self):
        with_rows = [m.name for m in registry.methods() if m.produces_samplers]
        for name in self.eval.methods or ():
            if name not in with_rows:
                raise ValueError(f"eval.methods: {name!r} is not a method with samplers to "
                                 f"evaluate; choose from {', '.join(with_rows)}")
        for method in registry.methods():
            if method.check is not None and method.enabled(self):
                method.check(self)
        return self


_CLASSES: dict[int, type] = {}


def pipeline_config_class() -> type[PipelineBase]:
    """The study's config model for the methods registered now: :class:`PipelineBase` plus
    one field per method section."""
    version = registry.version()
    if version not in _CLASSES:
        fields: dict[str, Any] = {}
        for method in registry.methods():
            for key, (annotation, default) in method.sections.items():
                fields[key] = (annotation, Field(default_factory=default))
        _CLASSES.clear()
        _CLASSES[version] = create_model("PipelineConfig", __base__=PipelineBase, **fields)
    return _CLASSES[version]


def parse_pipeline(data: Mapping[str, Any]):
    """A study config from a dict (missing keys take their defaults)."""
    return parse(pipeline_config_class(), dict(data))


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                presets: Mapping[str, Any] | None = None):
    """A study config from a JSON (``.json``) or YAML (``.yaml``/``.yml``) file, with
    optional dotted overrides. A file may name a preset of ``presets`` (name -> factory of
    a config) to start from: ``{"preset": "digits", "base": {"steps": 500}}`` merges its
    keys over the preset's."""
    d = read_mapping(path)
    preset = d.pop("preset", None)
    if preset is not None:
        if presets is None or preset not in presets:
            raise ConfigError(f"{path}: unknown preset {preset!r}; presets: "
                              f"{', '.join(presets or ())}")
        d = merge(presets[preset]().to_dict(), d)
    d = apply_overrides(d, overrides or {}, pipeline_config_class())
    return parse_pipeline(d)
