"""The typed schema of a results dict (what :func:`rcfd.evaluation.evaluate_rows` returns and
``results.json`` holds): :class:`Results` with its :class:`Entry` rows, their metrics per
extractor (:class:`ExtractorMetrics`) and reference split (:class:`SplitMetrics`), and the
noise :class:`Floors`. The report reads results through these models; the file itself is the
plain dict, written as it was made, so validating changes no byte of it. Keys a later version
adds are kept (``extra="allow"``) but not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Number = float | None  # a metric that may be missing (IS without logits) or not finite


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class SplitMetrics(_Model):
    """FID, KID (with its spread over subsets), precision and recall against one split."""

    fid: Number = None
    kid: Number = None
    kid_std: Number = None
    precision: Number = None
    recall: Number = None


class ExtractorMetrics(_Model):
    """One extractor's numbers for one entry: against each split, and IS where it has logits."""

    test: SplitMetrics | None = None
    train: SplitMetrics | None = None
    is_: Number = Field(None, alias="is")
    is_std: Number = None

    def split(self, name: str) -> SplitMetrics | None:
        """The numbers against split ``name`` (``"test"``/``"train"``), ``None`` if absent."""
        return {"test": self.test, "train": self.train}.get(name)


class Entry(_Model):
    """One measured cell: row ``key`` (shown as ``label``) at ``steps`` steps; ``fid`` ...
    ``recall`` are the primary extractor's numbers against the primary split, flattened."""

    key: StrictStr
    label: StrictStr
    steps: StrictInt
    metrics: dict[str, ExtractorMetrics]
    method: str | None = None
    sampler: str = "ddim"
    fid: Number = None
    kid: Number = None
    is_: Number = Field(None, alias="is")
    precision: Number = None
    recall: Number = None
    grid: str | None = None
    checkpoint: str | None = None
    seconds: float | None = None
    sample_seconds: float | None = None


class FloorMetrics(SplitMetrics):
    """A floor's numbers for one extractor; a two-seed floor adds ``delta``: per split, how
    far the second set's FID/KID lie from the first's."""

    delta: dict[str, SplitMetrics] = Field(default_factory=dict)


class TwoSeedFloor(_Model):
    key: str
    label: str
    steps: int
    num_samples: int | None = None
    seeds: list[int] = Field(default_factory=list)
    metrics: dict[str, FloorMetrics]


class DataFloor(_Model):
    num: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, FloorMetrics]


class Floors(_Model):
    two_seeds: list[TwoSeedFloor] = Field(default_factory=list)
    test_vs_train: DataFloor | None = None


class Primary(_Model):
    extractor: str
    reference: str


class Teacher(_Model):
    key: str
    steps: int


class ClassifierRecord(_Model):
    """A classifier the run trained or used (``classifiers.<name>`` in ``results.json``): its
    role (``"distill"``: what RCFD/CFD distill into; ``"eval"``: the ``classifier`` extractor;
    ``"mlp"``: the ``mlp-classifier`` extractor),
    architecture, and its accuracy on the validation part that chose its weights and on the
    data's held-out test split (``None``: not recorded)."""

    role: str | None = None
    extractor: str | None = None
    arch: str | None = None
    width: int | None = None
    steps: int | None = None
    val_accuracy: Number = Field(None, description="top-1 on the validation part of the training split")
    test_accuracy: Number = Field(None, description="top-1 on the held-out test split")


class ObjectiveLosses(_Model):
    """One model's objectives on the diagnostic draws: the PD loss and the CFD loss."""

    pd: Number = None
    cfd: Number = None


class DiagnosticRow(_Model):
    """A distilled student's objectives (``student``) next to its teacher's in its place
    (``teacher``: the student at initialisation), computed on the draws ``draws`` names."""

    key: str
    label: str
    checkpoint: str
    teacher_checkpoint: str
    T: int
    teacher_T: int
    draws: str
    student: ObjectiveLosses
    teacher: ObjectiveLosses


class Diagnostics(_Model):
    """``diagnostics`` in ``results.json`` (:mod:`rcfd.evaluation.objectives`): the draws
    (``num_samples`` images of ``split``, ``seed``, their fingerprint ``draws``), the
    classifier and loss settings of the CFD loss, and one row per distilled student."""

    num_samples: int
    split: str
    seed: int | None = None
    draws: str
    classifier: str | None = None
    loss: dict = Field(default_factory=dict)
    rows: list[DiagnosticRow] = Field(default_factory=list)
    seconds: float | None = None


class Results(_Model):
    """A run's results (the keys ``results.json`` holds; see :mod:`rcfd.report.results`)."""

    extractors: list[str]
    primary: Primary
    entries: list[Entry]
    preset: str | None = None
    dataset: str | None = None
    seed: int | None = None
    seeds: list[int] | None = None
    extractor_details: dict[str, str] = Field(default_factory=dict)
    num_samples: int | None = None
    num_reference: dict[str, int] | None = None
    measurement: dict = Field(default_factory=dict)
    teacher: Teacher | None = None
    floors: Floors = Field(default_factory=Floors)
    device: str | None = None
    dtype: str | None = None
    run_dir: str | None = None
    side_by_side: str | None = None
    loss_curves: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    classifiers: dict[str, ClassifierRecord] = Field(default_factory=dict)  # absent before they were recorded
    diagnostics: Diagnostics | None = None  # absent before they were computed
    platform: dict[str, str | int | None] | None = None  # rcfd, commit, torch, threads...; absent before it was recorded

    def is_teacher(self, entry: Entry) -> bool:
        """Whether ``entry`` is the distillation teacher's cell (the students' upper bound)."""
        t = self.teacher
        return t is not None and (entry.key, entry.steps) == (t.key, t.steps)


def read_results(path: str | os.PathLike) -> Results:
    """``results.json`` at ``path``, validated."""
    return Results.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
