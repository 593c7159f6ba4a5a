"""Typed configuration: one frozen dataclass per stage and a :class:`PipelineConfig` that
composes them. The presets (``smoke``, ``digits``, ``cifar10-paper``, ...) are in
:mod:`rcfd.presets`.

Every config round-trips through plain dicts (``to_dict`` / ``from_dict``; unknown keys are
an error naming the key and listing the valid ones), loads from JSON or YAML
(:func:`load_config`), takes dotted overrides (``cfg.with_overrides({"base.steps": 100})``)
and validates itself on construction, so an invalid value fails before any training runs
(the machinery is :mod:`rcfd.typedconfig`).
The numbers of the paper's settings come from METHOD.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rcfd.core.classifiers import CLASSIFIER_NAMES
from rcfd.data import DatasetSpec
from rcfd.losses import LOSS_KINDS, PREDICTIONS, RCFDLossConfig
from rcfd.typedconfig import (
    Config,
    check_choice,
    check_float,
    check_int,
    check_pow2,
    is_pow2,
    merge,
    read_mapping,
    save_config,
)
from rcfd.core.unet import UNetConfig

TRAINABLE_CLASSIFIERS = tuple(n for n in CLASSIFIER_NAMES if not n.startswith("imagenet_"))
CLASSIFIER_ROLES = ("distill", "eval")
EXTRACTORS = ("auto", "inception", "classifier")
METHODS = ("base", "pd", "rcfd")
LR_SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------- PD rounds


def halving_rounds(teacher_T: int, final_T: int) -> list[tuple[int, int]]:
    """``[(teacher_T, student_T), ...]`` halving from ``teacher_T`` down to ``final_T``."""
    if not (is_pow2(teacher_T) and is_pow2(final_T)) or final_T > teacher_T:
        raise ValueError(f"rounds need powers of two with final_T <= teacher_T; got "
                         f"teacher_T={teacher_T}, final_T={final_T}")
    out, t = [], teacher_T
    while t > final_T:
        out.append((t, t // 2))
        t //= 2
    return out


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class TrainOptions:
    """Execution options shared by every training stage; only take effect on CUDA (on the
    CPU they are ignored: bf16 autocast and channels_last slow a CPU step down)."""

    bf16: bool = True
    channels_last: bool = True
    fused: bool = True
    compile: bool = False


@dataclass(frozen=True)
class ClassifierStageConfig(Config):
    """A classifier trained with SGD (METHOD.md, "Classifiers"): ``lr`` divided by
    ``1 / lr_decay`` at each fraction of training in ``milestones``. Train for ``epochs``
    or for ``steps`` (exactly one is set). ``role`` says which classifier this is
    (``"distill"``: used by RCFD; ``"eval"``: the evaluation feature extractor);
    ``seed_offset`` makes the two differ when their settings are equal."""

    role: str = "distill"
    arch: str = "resnet18"
    width: int | None = None
    epochs: int | None = 300
    steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 0.1
    crop: bool = True
    flip: bool = True
    autoaugment: bool = True
    cutout: bool = True
    seed_offset: int = 0
    eval_interval: int | None = None   # steps between test-accuracy checks; None: each epoch
    log_interval: int = 10
    options: TrainOptions = field(default_factory=TrainOptions)

    _nested: ClassVar[dict] = {"options": TrainOptions}

    def __post_init__(self):
        check_choice("role", self.role, CLASSIFIER_ROLES)
        check_choice("arch", self.arch, TRAINABLE_CLASSIFIERS)
        check_int("width", self.width, none=True)
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"set exactly one of epochs or steps, got epochs={self.epochs!r}, "
                             f"steps={self.steps!r}")
        check_int("epochs", self.epochs, none=True)
        check_int("steps", self.steps, none=True)
        check_int("batch_size", self.batch_size)
        check_float("lr", self.lr, lo_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_float("weight_decay", self.weight_decay)
        check_float("lr_decay", self.lr_decay, 0.0, 1.0, lo_open=True)
        if any(not (isinstance(m, (int, float)) and 0 < m < 1) for m in self.milestones) or \
                list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing fractions of training in (0, 1), "
                             f"got {self.milestones!r}")
        check_int("seed_offset", self.seed_offset, lo=0)
        check_int("eval_interval", self.eval_interval, none=True)
        check_int("log_interval", self.log_interval)


@dataclass(frozen=True)
class BaseStageConfig(Config):
    """The base diffusion model (METHOD.md, "Base training"): sampler ``(T, 1)``, Adam with
    a linear ``warmup``, EMA ``ema_decay`` (``None``: no EMA), grad-norm clip ``grad_clip``
    (``None``: no clipping), random horizontal ``flip`` of the data. Dropout is
    ``unet.dropout``. ``sample_steps``: DDIM steps of
    the periodic sample grid (``None``: ``T``)."""

    unet: UNetConfig = field(default_factory=UNetConfig.cifar10)
    T: int = 1024
    loss: str = "both"
    prediction: str = "x0"
    lr: float = 2e-4
    warmup: int = 5000
    batch_size: int = 128
    steps: int = 800_000
    ema_decay: float | None = 0.9999
    grad_clip: float | None = 1.0
    flip: bool = True
    sample_interval: int = 20_000
    sample_steps: int | None = None
    num_sample_images: int = 64
    checkpoint_interval: int = 10_000
    log_interval: int = 10
    options: TrainOptions = field(default_factory=TrainOptions)

    _nested: ClassVar[dict] = {"unet": UNetConfig, "options": TrainOptions}

    def __post_init__(self):
        if isinstance(self.unet, Mapping):
            object.__setattr__(self, "unet", UNetConfig.from_dict(self.unet))
        check_pow2("T", self.T)
        if self.T < 2:
            raise ValueError(f"T must be >= 2 (a base model of at least two steps), got {self.T}")
        if self.unet.num_time_indices < self.T + 1:
            raise ValueError(f"unet.num_time_indices={self.unet.num_time_indices} is too small for "
                             f"T={self.T}: it needs T + 1 = {self.T + 1} rows")
        check_choice("loss", self.loss, LOSS_KINDS)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_float("lr", self.lr, lo_open=True)
        check_int("warmup", self.warmup, lo=0)
        check_int("batch_size", self.batch_size)
        check_int("steps", self.steps)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True, none=True)
        check_float("grad_clip", self.grad_clip, lo_open=True, none=True)
        check_int("sample_interval", self.sample_interval)
        check_int("num_sample_images", self.num_sample_images, lo=0)
        check_int("checkpoint_interval", self.checkpoint_interval)
        check_int("log_interval", self.log_interval)
        if self.sample_steps is not None:
            check_pow2("sample_steps", self.sample_steps)
            if self.sample_steps > self.T:
                raise ValueError(f"sample_steps={self.sample_steps} exceeds T={self.T}")


@dataclass(frozen=True)
class _DistillStage(Config):
    """Fields shared by PD and RCFD: rounds halve ``T`` down to ``final_T``; a round whose
    student has ``T <= long_round_max_T`` trains ``long_round_steps``, the others
    ``steps_per_round``; Adam at ``lr``, cosine-annealed to 0 (or constant), no EMA by
    default, the student's dropout set to ``dropout``, the data flipped when ``flip``."""

    final_T: int = 1
    steps_per_round: int = 10_000
    long_round_steps: int = 20_000
    long_round_max_T: int = 2
    lr: float = 5e-5
    lr_schedule: str = "cosine"
    warmup: int = 0
    batch_size: int = 128
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    dropout: float = 0.0
    flip: bool = True
    sample_interval: int = 5_000
    num_sample_images: int = 64
    checkpoint_interval: int = 5_000
    log_interval: int = 10
    options: TrainOptions = field(default_factory=TrainOptions)

    _nested: ClassVar[dict] = {"options": TrainOptions}

    def round_steps(self, student_T: int) -> int:
        """Training steps of the round whose student takes ``student_T`` steps."""
        return self.long_round_steps if student_T <= self.long_round_max_T else self.steps_per_round

    def _check_common(self):
        check_pow2("final_T", self.final_T)
        check_int("steps_per_round", self.steps_per_round)
        check_int("long_round_steps", self.long_round_steps)
        check_int("long_round_max_T", self.long_round_max_T, lo=0)
        check_float("lr", self.lr, lo_open=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("warmup", self.warmup, lo=0)
        check_int("batch_size", self.batch_size)
        check_float("grad_clip", self.grad_clip, lo_open=True, none=True)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True, none=True)
        check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        for name in ("sample_interval", "checkpoint_interval", "log_interval"):
            check_int(name, getattr(self, name))
        check_int("num_sample_images", self.num_sample_images, lo=0)


@dataclass(frozen=True)
class PDStageConfig(_DistillStage):
    """Progressive distillation (METHOD.md): rounds teacher ``(T, ts)`` -> student
    ``(T/2, 2 ts)`` from the base model's ``T`` down to ``final_T``."""

    loss: str = "both"

    def __post_init__(self):
        self._check_common()
        check_choice("loss", self.loss, LOSS_KINDS)


@dataclass(frozen=True)
class RCFDStageConfig(_DistillStage):
    """RCFD (METHOD.md): rounds from the PD student at ``start_T`` down to ``final_T``,
    ``L = L_CFD + alpha (beta L_ent + (1 - beta) L_div)`` with ``loss``. ``classifier``:
    ``"distill"`` (the classifier stage's ``classifier/distill.pt``), ``"eval"``, an
    ``imagenet_*`` architecture name, or a checkpoint path (ours, or a reference
    ``{'model': ...}`` file whose architecture ``classifier_arch`` names)."""

    start_T: int = 8
    classifier: str = "distill"
    classifier_arch: str | None = None
    loss: RCFDLossConfig = field(default_factory=RCFDLossConfig)

    _nested: ClassVar[dict] = {"options": TrainOptions, "loss": RCFDLossConfig}

    def __post_init__(self):
        self._check_common()
        check_pow2("start_T", self.start_T)
        if self.final_T >= self.start_T:
            raise ValueError(f"final_T={self.final_T} must be below start_T={self.start_T} "
                             "(each round halves T)")
        if not isinstance(self.classifier, str) or not self.classifier:
            raise ValueError("classifier must be 'distill', 'eval', an imagenet_* name or a "
                             f"checkpoint path; got {self.classifier!r}")
        if self.classifier_arch is not None:
            check_choice("classifier_arch", self.classifier_arch, TRAINABLE_CLASSIFIERS)


@dataclass(frozen=True)
class EvalStageConfig(Config):
    """Evaluation (METHOD.md, "Evaluation"): IS/FID of ``num_samples`` samples of each
    method's ``steps``-step sampler (``base_steps``: DDIM steps of the base model).
    ``extractor``: ``"inception"`` (needs its weights), ``"classifier"`` (the eval
    classifier), or ``"auto"`` (Inception when its weights are found)."""

    steps: tuple[int, ...] = (1, 2, 4, 8)
    methods: tuple[str, ...] = ("pd", "rcfd")
    base_steps: tuple[int, ...] = ()
    num_samples: int = 50_000
    batch_size: int = 500
    extractor: str = "auto"
    inception_weights: str | None = None

    def __post_init__(self):
        for name in ("steps", "base_steps"):
            for s in getattr(self, name):
                check_pow2(f"{name} entries", s)
        for m in self.methods:
            check_choice("methods entries", m, METHODS)
        check_int("num_samples", self.num_samples, lo=2)
        check_int("batch_size", self.batch_size)
        check_choice("extractor", self.extractor, EXTRACTORS)


@dataclass(frozen=True)
class PipelineConfig(Config):
    """The whole study: data -> classifiers -> base -> PD -> RCFD -> evaluation. ``threads``:
    torch intra-op threads on the CPU (``None``: one per idle core, see
    :func:`rcfd.trainers.loop.configure_threads`). ``device``: ``"auto"`` (CUDA when
    available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``..."""

    name: str = "digits"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    data: DatasetSpec = field(default_factory=DatasetSpec)
    distill_classifier: ClassifierStageConfig = field(default_factory=ClassifierStageConfig)
    eval_classifier: ClassifierStageConfig | None = field(
        default_factory=lambda: ClassifierStageConfig(role="eval", seed_offset=1))
    base: BaseStageConfig = field(default_factory=BaseStageConfig)
    pd: PDStageConfig = field(default_factory=PDStageConfig)
    rcfd: RCFDStageConfig = field(default_factory=RCFDStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)

    _nested: ClassVar[dict] = {"data": DatasetSpec, "distill_classifier": ClassifierStageConfig,
                               "eval_classifier": ClassifierStageConfig,
                               "base": BaseStageConfig, "pd": PDStageConfig,
                               "rcfd": RCFDStageConfig, "eval": EvalStageConfig}

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        check_int("seed", self.seed, lo=0)
        check_int("threads", self.threads, none=True)
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name, role in (("distill_classifier", "distill"), ("eval_classifier", "eval")):
            c = getattr(self, name)
            if c is not None and c.role != role:
                raise ValueError(f"{name}.role must be {role!r}, got {c.role!r}")
        d, e = self.distill_classifier, self.eval_classifier
        if e is not None and dataclasses.replace(e, role="distill") == d:
            raise ValueError("eval_classifier equals distill_classifier: give it another "
                             "seed_offset (or architecture) so evaluation is not circular")
        u, data = self.base.unet, self.data
        if (u.image_size, u.in_channels) != (data.image_size, data.channels):
            raise ValueError(f"base.unet takes {u.in_channels}x{u.image_size}x{u.image_size} images "
                             f"but data gives {data.channels}x{data.image_size}x{data.image_size}; "
                             "set base.unet.image_size / in_channels to match")
        T = self.base.T
        if self.pd.final_T > self.rcfd.start_T:
            raise ValueError(f"pd.final_T={self.pd.final_T} must be <= rcfd.start_T="
                             f"{self.rcfd.start_T}: RCFD starts from the PD student at start_T")
        if self.rcfd.start_T >= T:
            raise ValueError(f"rcfd.start_T={self.rcfd.start_T} must be below base.T={T}")
        for s in (*self.eval.steps, *self.eval.base_steps):
            if s > T:
                raise ValueError(f"eval steps {s} exceed the base model's T={T}")
        if self.rcfd.classifier == "eval" and self.eval.extractor == "classifier":
            raise ValueError("rcfd.classifier='eval' with eval.extractor='classifier' measures "
                             "with the features it distills into; use another classifier")
        if self.rcfd.classifier == "eval" and e is None:
            raise ValueError("rcfd.classifier='eval' needs an eval_classifier stage")
        if self.eval.extractor == "classifier" and e is None:
            raise ValueError("eval.extractor='classifier' needs an eval_classifier stage")
        if data.name == "folder" and self.classifier_stages():
            raise ValueError("a folder of images has no labels, so no classifier can be trained on "
                             "it: set distill_classifier and eval_classifier to null and "
                             "rcfd.classifier to a classifier checkpoint (or imagenet_resnet50)")
        if self.rcfd.classifier == "distill" and d is None:
            raise ValueError("rcfd.classifier='distill' needs a distill_classifier stage; or set "
                             "rcfd.classifier to a checkpoint path or an imagenet_* name")

    def classifier_stages(self) -> list[ClassifierStageConfig]:
        return [c for c in (self.distill_classifier, self.eval_classifier) if c is not None]


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                cls=PipelineConfig):
    """A config from a JSON (``.json``) or YAML (``.yaml``/``.yml``) file, with optional
    dotted overrides. A file may name a preset to start from: ``{"preset": "digits",
    "base": {"steps": 500}}`` merges its keys over the preset's."""
    d = read_mapping(path)
    preset = d.pop("preset", None)
    if preset is not None:
        from rcfd.presets import get_preset  # rcfd.presets builds on this module

        if cls is not PipelineConfig:
            raise ValueError("'preset' is only valid in a pipeline config file")
        d = merge(get_preset(preset).to_dict(), d)
    cfg = cls.from_dict(d)
    return cfg.with_overrides(overrides) if overrides else cfg


__all__ = ["BaseStageConfig", "ClassifierStageConfig", "EvalStageConfig", "PDStageConfig",
           "PipelineConfig", "RCFDLossConfig", "RCFDStageConfig", "TrainOptions", "halving_rounds",
           "load_config", "save_config"]
