"""Classifier-based feature distillation with the dataset-oriented losses (RCFD, METHOD.md),
and its ablation CFD alone (``alpha = 0``), as two registered methods of one trainer.

Rounds halve ``T`` from the PD student at ``start_T`` (8 in the paper) down to ``final_T``
(8 -> 4 -> 2 -> 1), each student initialised from its teacher, trained on
:class:`rcfd.losses.RCFDLoss`: ``L = L_CFD + alpha * (beta * L_ent + (1 - beta) * L_div)``
on the student's unclipped ``x0_hat`` and the two-step teacher target. The classifier is
frozen (eval mode, no parameter gradients) and gradients flow through it into the student.
Every term (``cfd``, ``ent``, ``div``, ``reg``, and the PD loss ``pd`` for reference) is
logged. The ``rcfd`` method writes ``run_dir/rcfd/T<k>.safetensors``; the ``cfd`` method (off unless
its section is set, e.g. ``--set cfd.start_T=8``) trains the same rounds with ``alpha = 0``
into ``run_dir/cfd/``, for the ablation rows of a study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from rcfd.config import Pow2
from rcfd.core.classifiers import frozen
from rcfd.data import ImageDataset
from rcfd.errors import UsageError
from rcfd.losses import PDLoss, RCFDLoss, RCFDLossConfig
from rcfd.methods.classifier import TRAINABLE, classifier_info, load_classifier
from rcfd.methods.common import load_train, require
from rcfd.interop.diffusers_load import is_diffusers_folder
from rcfd.methods.distill import (
    DistillConfig,
    describe_teacher,
    distill_rounds,
    halving_rounds,
    load_teacher,
)
from rcfd.methods.registry import DistilledClassifier, Method, Row
from rcfd.training.rundir import RunContext, checkpoint_path


class RCFDStageConfig(DistillConfig):
    """RCFD (METHOD.md): rounds from the PD student at ``start_T`` down to ``final_T``,
    ``L = L_CFD + alpha (beta L_ent + (1 - beta) L_div)`` with ``loss``. ``classifier``:
    ``"distill"`` (the classifier stage's ``classifier/distill.safetensors``), ``"eval"``, an
    ``imagenet_*`` architecture name, or a checkpoint path (ours, or a reference
    ``{'model': ...}`` file whose architecture ``classifier_arch`` names)."""

    start_T: Pow2 = 8
    classifier: str = "distill"
    classifier_arch: Literal[TRAINABLE] | None = None
    loss: RCFDLossConfig = RCFDLossConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.final_T >= self.start_T:
            raise ValueError(f"final_T={self.final_T} must be below start_T={self.start_T} "
                             "(each round halves T)")
        if not self.classifier:
            raise ValueError("classifier must be 'distill', 'eval', an imagenet_* name or a "
                             "checkpoint path")
        return self


class CFDStageConfig(RCFDStageConfig):
    """CFD alone: :class:`RCFDStageConfig` whose loss defaults to ``alpha = 0``."""

    loss: RCFDLossConfig = RCFDLossConfig(alpha=0.0)


def resolve_classifier(cfg: RCFDStageConfig, run_dir: Path | str) -> Path | str:
    """What ``cfg.classifier`` names: ``run_dir/classifier/distill.safetensors`` for ``"distill"``,
    ``run_dir/classifier/eval.safetensors`` for ``"eval"``, an ``imagenet_*`` name as it is,
    otherwise a checkpoint path."""
    if cfg.classifier in ("distill", "eval"):
        return checkpoint_path(run_dir, "classifier", cfg.classifier)
    if cfg.classifier.startswith("imagenet_") and not Path(cfg.classifier).exists():
        return cfg.classifier
    return Path(cfg.classifier)


def check_classifier_fits(classifier: nn.Module, dataset: ImageDataset, cfg: RCFDStageConfig,
                          trained_size: int | None = None, device="cpu") -> None:
    """Clear errors when the classifier cannot serve this model and data: channels or image
    size differ, its outputs are not ``(logits [B, K], features [B, D])`` with the
    widths it declares, or the entropy / diversity terms are on with ``K`` different
    from the data's classes."""
    c, s = dataset.channels, dataset.image_size
    in_ch = getattr(classifier, "in_channels", None) or getattr(
        getattr(classifier, "config", None), "in_channels", c)
    if in_ch != c:
        raise UsageError(f"the classifier takes {in_ch}-channel images but the model makes "
                         f"{c}-channel ones; train or choose a classifier for this data")
    if trained_size is not None and trained_size != s:
        raise UsageError(f"the classifier was trained on {trained_size}x{trained_size} images "
                         f"but the model makes {s}x{s} ones; use a classifier of this data")
    with torch.no_grad():
        probe = torch.zeros((2, c, s, s), device=device)
        out = classifier(probe)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise UsageError("the classifier must return (logits, features); got "
                         f"{type(out).__name__}")
    logits, feats = out
    k, d = getattr(classifier, "num_classes", logits.shape[-1]), getattr(
        classifier, "feature_dim", feats.shape[-1])
    if logits.shape != (2, k) or feats.shape != (2, d):
        raise UsageError(f"the classifier returned logits {tuple(logits.shape)} and features "
                         f"{tuple(feats.shape)} for 2 images; expected (2, {k}) and (2, {d})")
    width = d if cfg.loss.kl_on == "features" else k
    if width < 2:
        raise UsageError(f"the CFD KL runs over the classifier's {cfg.loss.kl_on} ({width} "
                         "wide); a softmax over fewer than 2 entries is constant")
    regularised = cfg.loss.alpha > 0 and (cfg.loss.use_ent or cfg.loss.use_div)
    if regularised and dataset.num_classes and k != dataset.num_classes:
        raise UsageError(f"the classifier predicts {k} classes but the {dataset.name} data has "
                         f"{dataset.num_classes}: the entropy / diversity terms need the data's "
                         "classes; use a classifier of this data or set rcfd.loss.alpha=0")


def train_rcfd(cfg: RCFDStageConfig, teacher: Path, classifier: Path | str | nn.Module,
               data, run: RunContext, stage: str = "rcfd") -> list[Path]:
    """RCFD rounds from the PD student at ``cfg.start_T`` (``teacher``, e.g. ``pd/T8.safetensors``)
    down to ``cfg.final_T``, with the frozen ``classifier`` (a checkpoint path, an
    ``imagenet_*`` name or a module; see :func:`resolve_classifier`). Returns
    ``[run_dir/<stage>/T<start/2>.safetensors, ..., run_dir/<stage>/T<final_T>.safetensors]``."""
    device = run.torch_device
    dataset = load_train(data)
    _, info = load_teacher(teacher, "cpu", cfg.start_T if is_diffusers_folder(teacher) else None)
    if info.T != cfg.start_T:
        raise UsageError(f"{stage} starts from the PD student at T={cfg.start_T} "
                         f"({stage}.start_T), but {teacher} is a T={info.T} sampler; pass "
                         f"pd/T{cfg.start_T}.safetensors")
    net = load_classifier(classifier, device, cfg.classifier_arch, in_channels=dataset.channels)
    trained_size = classifier_info(classifier).get("image_size")
    net = frozen(net)
    if cfg.options.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    check_classifier_fits(net, dataset, cfg, trained_size, device)

    def objective(teacher_net, schedule, teacher_T, time_scale, prediction, student):
        pd = PDLoss(teacher_net, schedule, teacher_T, time_scale, "both", prediction, student)
        return RCFDLoss(pd, net, cfg.loss)

    source = classifier if isinstance(classifier, (str, Path)) else type(classifier).__name__
    return distill_rounds(cfg, stage, teacher, data, run, objective,
                          extra_info={"classifier": str(source)}, first_T=cfg.start_T)


# --------------------------------------------------------------------------- the methods


# What RCFD and CFD read of other sections: the PD student they start from, the base model's
# T, the evaluation's extractors (not to measure with what they distill into) and the
# classifier stage's architectures (for labels; ``None`` where that classifier is off).
READS = {"pd_final_T": "pd.final_T", "teacher_T": "base.T", "eval_extractors": "eval.extractors",
         "distill_arch": "distill_classifier.arch", "eval_arch": "eval_classifier.arch"}


def classifier_name(view, section: RCFDStageConfig) -> str:
    """The distillation classifier's architecture, for labels."""
    c = section.classifier
    if c == "distill" and view.distill_arch is not None:
        return view.distill_arch
    if c == "eval" and view.eval_arch is not None:
        return view.eval_arch
    return section.classifier_arch or Path(c).stem


def _check_reads(stage: str, s: RCFDStageConfig, view) -> None:
    """The cross-checks of a section against what it reads of the others (with a
    ``teacher`` of its own, the PD stage's and the base model's do not apply)."""
    if s.teacher is not None:
        pass
    elif view.pd_final_T > s.start_T:
        raise ValueError(f"pd.final_T={view.pd_final_T} must be <= {stage}.start_T="
                         f"{s.start_T}: {stage} starts from the PD student at start_T")
    elif s.start_T >= view.teacher_T:
        raise ValueError(f"{stage}.start_T={s.start_T} must be below base.T={view.teacher_T}")
    if s.classifier == "eval" and "classifier" in view.eval_extractors:
        raise ValueError(f"{stage}.classifier='eval' with the 'classifier' extractor in "
                         "eval.extractors measures with the features it distills into; use "
                         "another classifier")
    for role in ("distill", "eval"):
        if s.classifier == role and getattr(view, f"{role}_arch") is None:
            raise ValueError(f"{stage}.classifier={role!r} needs a {role}_classifier stage; "
                             "or set it to a checkpoint path or an imagenet_* name")


def _method(stage: str, label: str, config: type, default, help: str) -> Method:
    def section(view) -> RCFDStageConfig:
        return getattr(view, stage)

    def train(view, run):
        s = section(view)
        teacher = Path(s.teacher) if s.teacher else require(run.run_dir, "pd", f"T{s.start_T}")
        classifier = resolve_classifier(s, run.run_dir)
        if isinstance(classifier, Path) and s.classifier in ("distill", "eval"):
            require(run.run_dir, "classifier", s.classifier)
        elif isinstance(classifier, Path) and not classifier.is_file():
            raise UsageError(f"{stage}.classifier: {classifier} does not exist")
        return train_rcfd(s, teacher, classifier, view.data, run, stage)

    def rows(view) -> list[Row]:
        s = section(view)
        made = {t for _, t in halving_rounds(s.start_T, s.final_T)}
        name = f"{label}-{classifier_name(view, s)}"
        return [Row(stage, name, t, stage, f"T{t}") for t in sorted(view.eval_steps) if t in made]

    def inputs(view, run_dir) -> list[Path]:
        s = section(view)
        paths = [Path(s.teacher) if s.teacher else checkpoint_path(run_dir, "pd", f"T{s.start_T}")]
        if s.classifier in ("distill", "eval"):
            paths.append(checkpoint_path(run_dir, "classifier", s.classifier))
        return paths

    def describe(view) -> str:
        s = section(view)
        rounds = halving_rounds(s.start_T, s.final_T)
        loss = s.loss
        line = (f"{s.start_T} -> {s.final_T}: {len(rounds)} rounds, "
                f"{sum(s.round_steps(t) for _, t in rounds)} steps, classifier {s.classifier}, "
                f"tau {loss.tau}, alpha {loss.alpha}, beta {loss.beta}")
        if s.teacher is not None:
            line += "; " + describe_teacher(s.teacher, s.start_T, s.student_prediction)
        return line

    def check(view) -> None:
        s = section(view)
        if s is not None:
            _check_reads(stage, s, view)

    def distills_into(view) -> DistilledClassifier | None:
        s = section(view)
        return None if s is None else DistilledClassifier(s.classifier, s.classifier_arch)

    return Method(name=stage, sections={stage: (config, default)}, reads=READS, train=train,
                  describe=describe, rows=rows, needs=("pd", "classifier"), check=check,
                  inputs=inputs, distills_into=distills_into, compare_to="pd", help=help)


METHOD = _method("rcfd", "RCFD", RCFDStageConfig, RCFDStageConfig,
                 "RCFD rounds from the PD student at start_T")
CFD_METHOD = _method("cfd", "CFD", CFDStageConfig | None, lambda: None,
                     "CFD alone (alpha = 0) from the PD student; off unless configured")
