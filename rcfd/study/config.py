"""The configuration of a whole study: run-level fields, the data, the evaluation, and one
section per registered method (:mod:`rcfd.methods`).

:class:`StudyConfig` is the static, typed model: one field per built-in method section, so
type checkers and readers see every key. A method registered later (a test, a plug-in) gets
its section from :func:`pipeline_config_class`, which returns :class:`StudyConfig` itself
while only the built-in methods are registered and otherwise a subclass of it with one more
field per extra section (so ``--set``, ``--dry-run`` and the presets see it, with the same
validation). :func:`parse_pipeline` validates a dict into it (every method's cross-checks
run in one validator, each on its :class:`~rcfd.methods.registry.View`); :func:`load_config`
reads a JSON/YAML file, which may start from a preset (``preset: digits``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, create_model, field_validator, model_validator

from rcfd.config import Int, NonNegInt, PosInt, Pow2, Section, parse
from rcfd.data import DatasetSpec
from rcfd.errors import ConfigError
from rcfd.evaluation import EvalSettings
from rcfd.evaluation.extractors import EXTRACTOR_NAMES
from rcfd.evaluation.objectives import DIAGNOSTIC_SAMPLES
from rcfd.methods import registry
from rcfd.methods.base import BaseStageConfig
from rcfd.methods.cd import CDStageConfig
from rcfd.methods.classifier import (
    ClassifierStageConfig,
    default_eval_classifier,
    default_mlp_classifier,
)
from rcfd.methods.pd import PDStageConfig
from rcfd.methods.rcfd import CFDStageConfig, RCFDStageConfig
from rcfd.samplers.registry import TRAINING_FREE
from rcfd.study.configfile import apply_overrides, merge, read_mapping, with_overrides

EVAL_DEFAULTS = EvalSettings()  # the one set of evaluation defaults (rcfd.evaluation)
# A study's panel: the library's, with the run's MLP classifier after its evaluation classifier.
STUDY_EXTRACTORS = ("classifier", "mlp-classifier", *(n for n in EVAL_DEFAULTS.extractors if n != "classifier"))


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
    sampling (``auto``: bf16 on CUDA, fp32 elsewhere); recorded with the results.
    ``diagnostics``: how many held-out draws the objective diagnostics of the distilled
    students use (:mod:`rcfd.evaluation.objectives`; at most the held-out split; 0: none). The
    defaults of the fields the evaluation stage reads are :class:`rcfd.evaluation.EvalSettings`'
    (here validated); only ``floor`` and ``extractors`` differ: a study's floor row is PD's
    cheapest (the library, which knows no methods, takes the first row), and a study also
    measures with its own MLP classifier (``mlp-classifier``, :data:`STUDY_EXTRACTORS`)."""

    steps: tuple[Pow2, ...] = (1, 2, 4, 8)
    methods: tuple[str, ...] | None = None
    base_steps: tuple[Pow2, ...] = ()
    samplers: tuple[Literal[TRAINING_FREE], ...] = ("ddim",)
    num_samples: Annotated[Int, Field(ge=20)] = EVAL_DEFAULTS.num_samples
    batch_size: PosInt = EVAL_DEFAULTS.batch_size
    extractors: tuple[Literal[EXTRACTOR_NAMES], ...] = STUDY_EXTRACTORS
    inception: Literal["auto", "always", "never"] = "auto"
    inception_weights: str | None = None
    primary: Literal[EXTRACTOR_NAMES] = EVAL_DEFAULTS.primary
    reference: Literal["test", "train"] = EVAL_DEFAULTS.reference
    floor: str = "pd"
    grid_images: NonNegInt = EVAL_DEFAULTS.grid_images
    dtype: Literal["auto", "fp32", "bf16"] = EVAL_DEFAULTS.dtype
    diagnostics: NonNegInt = DIAGNOSTIC_SAMPLES

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
                method.check(method.view(self))
        return self

    def with_overrides(self, overrides: Mapping[str, Any]):
        """A copy with dotted-path overrides (:func:`rcfd.study.configfile.with_overrides`)."""
        return with_overrides(self, overrides)


class StudyConfig(PipelineBase):
    """The study's config with the built-in methods' sections (each method's module owns its
    section type and default; tests/test_registry.py checks the two agree)."""

    distill_classifier: ClassifierStageConfig | None = Field(default_factory=ClassifierStageConfig)
    eval_classifier: ClassifierStageConfig | None = Field(default_factory=default_eval_classifier)
    mlp_classifier: ClassifierStageConfig | None = Field(default_factory=default_mlp_classifier)
    base: BaseStageConfig = Field(default_factory=BaseStageConfig)
    pd: PDStageConfig = Field(default_factory=PDStageConfig)
    rcfd: RCFDStageConfig = Field(default_factory=RCFDStageConfig)
    cfd: CFDStageConfig | None = None
    cd: CDStageConfig | None = None


_CLASSES: dict[int, type[StudyConfig]] = {}


def extra_sections() -> dict[str, tuple[Any, Any]]:
    """The sections of registered methods that :class:`StudyConfig` does not declare."""
    return {key: section for m in registry.methods() for key, section in m.sections.items()
            if key not in StudyConfig.model_fields}


def pipeline_config_class() -> type[StudyConfig]:
    """The study's config model for the methods registered now: :class:`StudyConfig`, or a
    subclass with one more field per section of a method registered later (each may be
    ``None``, which switches the method off, e.g. in a preset)."""
    extra = extra_sections()
    if not extra:
        return StudyConfig
    version = registry.version()
    if version not in _CLASSES:
        fields = {key: (annotation | None, Field(default_factory=default))  # None: off
                  for key, (annotation, default) in extra.items()}
        _CLASSES.clear()
        _CLASSES[version] = create_model("StudyConfigWithPlugins", __base__=StudyConfig, **fields)
    return _CLASSES[version]


def parse_pipeline(data: Mapping[str, Any]) -> StudyConfig:
    """A study config from a dict (missing keys take their defaults)."""
    return parse(pipeline_config_class(), dict(data))


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                presets: Mapping[str, Any] | None = None) -> StudyConfig:
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
