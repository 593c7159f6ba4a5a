"""RCFD: classifier-based feature distillation with the dataset-oriented losses (METHOD.md).

Rounds halve ``T`` from the PD student at ``start_T`` (8 in the paper) down to ``final_T``
(8 -> 4 -> 2 -> 1), each student initialised from its teacher. A round's objective is
``L = L_CFD + alpha * (beta * L_ent + (1 - beta) * L_div)`` of :func:`rcfd.losses.rcfd_loss`
on the student's unclipped ``x0_hat`` and the two-step teacher target ``x_target``: the same
computation as ``losses.rcfd_distillation_loss``, with the step's noise drawn for the global
batch (:mod:`rcfd.trainers.base`). The classifier is frozen (:func:`rcfd.core.classifiers.frozen`:
eval mode, no parameter gradients) and gradients flow through it into the student. Every
term (``cfd``, ``ent``, ``div``, ``reg``, and the PD loss ``pd`` for reference) is logged.
Writes ``run_dir/rcfd/T<student T>.pt`` per round.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rcfd.core.classifiers import frozen
from rcfd.config import RCFDStageConfig
from rcfd.data import DatasetSpec, ImageDataset
from rcfd.losses import rcfd_loss
from rcfd.trainers.base import draw_noise, load_train, pd_objective
from rcfd.trainers.classifier import classifier_info, load_classifier
from rcfd.trainers.progressive import distill_rounds, load_teacher
from rcfd.trainers.rundir import RunContext, checkpoint_path

STAGE = "rcfd"


def resolve_classifier(cfg: RCFDStageConfig, run_dir: Path | str) -> Path | str:
    """What ``cfg.classifier`` names: ``run_dir/classifier/distill.pt`` for ``"distill"``,
    ``run_dir/classifier/eval.pt`` for ``"eval"``, an ``imagenet_*`` name as it is,
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
        raise ValueError(f"the classifier takes {in_ch}-channel images but the model makes "
                         f"{c}-channel ones; train or choose a classifier for this data")
    if trained_size is not None and trained_size != s:
        raise ValueError(f"the classifier was trained on {trained_size}x{trained_size} images "
                         f"but the model makes {s}x{s} ones; use a classifier of this data")
    with torch.no_grad():
        probe = torch.zeros((2, c, s, s), device=device)
        out = classifier(probe)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("the classifier must return (logits, features); got "
                         f"{type(out).__name__}")
    logits, feats = out
    k, d = getattr(classifier, "num_classes", logits.shape[-1]), getattr(
        classifier, "feature_dim", feats.shape[-1])
    if logits.shape != (2, k) or feats.shape != (2, d):
        raise ValueError(f"the classifier returned logits {tuple(logits.shape)} and features "
                         f"{tuple(feats.shape)} for 2 images; expected (2, {k}) and (2, {d})")
    width = d if cfg.loss.kl_on == "features" else k
    if width < 2:
        raise ValueError(f"the CFD KL runs over the classifier's {cfg.loss.kl_on} ({width} "
                         "wide); a softmax over fewer than 2 entries is constant")
    regularised = cfg.loss.alpha > 0 and (cfg.loss.use_ent or cfg.loss.use_div)
    if regularised and dataset.num_classes and k != dataset.num_classes:
        raise ValueError(f"the classifier predicts {k} classes but the {dataset.name} data has "
                         f"{dataset.num_classes}: the entropy / diversity terms need the data's "
                         "classes; use a classifier of this data or set rcfd.loss.alpha=0")


def train_rcfd(cfg: RCFDStageConfig, teacher: Path, classifier: Path | str | nn.Module,
               data: DatasetSpec | ImageDataset, run: RunContext) -> list[Path]:
    """RCFD rounds from the PD student at ``cfg.start_T`` (``teacher``, e.g. ``pd/T8.pt``)
    down to ``cfg.final_T``, with the frozen ``classifier`` (a checkpoint path, an
    ``imagenet_*`` name or a module; see :func:`resolve_classifier`). Returns
    ``[run_dir/rcfd/T<start/2>.pt, ..., run_dir/rcfd/T<final_T>.pt]``."""
    device = run.torch_device
    dataset = load_train(data)
    _, info = load_teacher(teacher, "cpu")
    if info.T != cfg.start_T:
        raise ValueError(f"RCFD starts from the PD student at T={cfg.start_T} (rcfd.start_T), "
                         f"but {teacher} is a T={info.T} sampler; pass pd/T{cfg.start_T}.pt")
    net = load_classifier(classifier, device, cfg.classifier_arch, in_channels=dataset.channels)
    trained_size = classifier_info(classifier).get("image_size")
    net = frozen(net)
    if cfg.options.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    check_classifier_fits(net, dataset, cfg, trained_size, device)

    def make_loss(teacher_net, schedule, teacher_T, ts, prediction):
        def loss_fn(student, x, y, step):
            noise = draw_noise(step, x, 1, teacher_T // 2)
            pd = pd_objective(student, teacher_net, x, schedule, ts, "both", prediction, noise)
            total, terms = rcfd_loss(net, pd.x0_hat, pd.x_target, cfg.loss)
            terms.pop("total")
            terms["pd"] = pd.loss.detach()
            return total, terms
        return loss_fn

    source = classifier if isinstance(classifier, (str, Path)) else type(classifier).__name__
    return distill_rounds(cfg, STAGE, teacher, data, run, make_loss,
                          extra_info={"classifier": str(source)})
