"""The classifier stage (METHOD.md, "Classifiers"): the distillation classifier that RCFD
distills into, the evaluation classifier that measures samples where the Inception weights
cannot be had, and the MLP classifier, a second judge built and trained differently from
the distillation classifier (:func:`default_mlp_classifier` says how). By default SGD with
momentum and weight decay, the learning rate divided by 10 at 1/2 and 3/4 of training, crop
+ flip + AutoAugment + Cutout on every batch (:func:`rcfd.data.augment.classifier_augment`),
validation accuracy logged at every epoch (or ``eval_interval``) and the best weights kept.
Writes ``run_dir/classifier/<role>.safetensors`` (``kind="classifier"``, with its
:class:`~rcfd.core.classifiers.ClassifierConfig`, so :func:`load_classifier` rebuilds it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from rcfd.io.checkpoint import (
    is_rcfd_checkpoint,
    load_classifier_checkpoint,
    load_model_file,
    make_checkpoint,
    save_model_checkpoint,
)
from rcfd.config import Decay, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, Section
from rcfd.core.classifiers import CLASSIFIER_NAMES, ClassifierConfig, build
from rcfd.data import DatasetSpec, ImageDataset, load_dataset, to_float
from rcfd.data.augment import classifier_augment, pad_value
from rcfd.errors import UsageError
from rcfd.methods.common import (
    TrainOptions,
    data_batches,
    data_identity,
    data_spec_dict,
    train_unit,
)
from rcfd.methods.registry import Method
from rcfd.training.loop import Job
from rcfd.training.optim import OptimSpec
from rcfd.training.rundir import RunContext
from rcfd.training.state import stage_seed

STAGE = "classifier"
TRAINABLE = tuple(n for n in CLASSIFIER_NAMES if not n.startswith("imagenet_"))
ROLES = ("distill", "eval", "mlp")
EXTRACTOR_OF_ROLE = {"eval": "classifier", "mlp": "mlp-classifier"}  # the panel's names


class ClassifierStageConfig(Section):
    """A classifier trained with SGD (METHOD.md, "Classifiers"): ``lr`` multiplied by
    ``lr_decay`` at each fraction of training in ``milestones``. Train for ``epochs`` or for
    ``steps`` (exactly one is set); ``optimizer="adam"`` uses Adam (``momentum`` unused) with
    the same schedule. ``role`` says which classifier this is (``"distill"``: used by RCFD;
    ``"eval"``: the ``classifier`` extractor; ``"mlp"``: the ``mlp-classifier`` extractor);
    ``seed_offset`` makes them differ when their settings are equal. Augmentation: the crop
    pads each side by ``crop_padding`` pixels (``None``: an eighth of the side, at least 1)
    and so shifts the image by up to that much; ``pad_fill`` is what the crop's
    border and AutoAugment's uncovered pixels are filled with, a value in image units or
    ``"background"`` (the training images' minimum pixel value: black, -1, for the digits), so
    that no training image shows borders the data never has; the Cutout hole is
    ``cutout_fraction`` of each side. The defaults (background, a quarter of the side) won on
    validation accuracy over the old mid-grey padding and half-side hole
    (``scripts/classifier_recipes.py``); the paper's preset keeps the paper's recipe."""

    role: Literal[ROLES] = "distill"
    arch: Literal[TRAINABLE] = "resnet18"
    width: Annotated[PosInt, Field(le=4096)] | None = None
    epochs: PosInt | None = 300
    steps: PosInt | None = None
    batch_size: PosInt = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PosFloat = 0.1
    momentum: Decay = 0.9
    weight_decay: NonNegFloat = 5e-4
    milestones: tuple[Annotated[Fraction, Field(gt=0, lt=1)], ...] = (0.5, 0.75)
    lr_decay: Annotated[PosFloat, Field(le=1)] = 0.1
    crop: bool = True
    crop_padding: Annotated[NonNegInt, Field(le=64)] | None = None  # None: an eighth of the side
    flip: bool = True
    autoaugment: bool = True
    cutout: bool = True
    cutout_fraction: Annotated[float, Field(gt=0, le=1)] = 0.25  # of each side of the image
    pad_fill: Literal["background"] | Annotated[float, Field(ge=-1, le=1)] = "background"
    seed_offset: NonNegInt = 0
    eval_interval: PosInt | None = None  # steps between validation checks; None: each epoch
    val_fraction: Annotated[Fraction, Field(gt=0, lt=1)] = 0.1  # of train, to choose the weights
    log_interval: PosInt = 10
    options: TrainOptions = TrainOptions()

    @model_validator(mode="after")
    def _check(self) -> "ClassifierStageConfig":
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"set exactly one of epochs or steps, got epochs={self.epochs!r}, "
                             f"steps={self.steps!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing fractions of training, got "
                             f"{self.milestones}")
        return self


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ImageDataset, device: torch.device,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (evaluated in eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(dataset), batch_size):
            x = to_float(dataset.images[i:i + batch_size].to(device))
            logits, _ = model(x)
            correct += int((logits.argmax(1).cpu() == dataset.labels[i:i + batch_size]).sum())
    finally:
        model.train(was)
    return correct / len(dataset)


def train_classifier(cfg: ClassifierStageConfig, data: DatasetSpec | ImageDataset,
                     run: RunContext) -> Path:
    """Train the ``cfg.role`` classifier on ``data``'s training split less a validation part
    (``cfg.val_fraction``, seeded), keeping the weights of the best validation accuracy; the
    test split is never seen, so it stays held out for the evaluation. Returns
    ``run_dir/classifier/<role>.safetensors`` (``extra``: ``accuracy`` (validation), ``best_step``,
    ``final_accuracy``, ``test_accuracy`` of the kept weights, ``image_size``)."""
    return train_unit(run, STAGE, cfg.role, lambda: _classifier_job(cfg, data, run))


def _classifier_job(cfg: ClassifierStageConfig, data: DatasetSpec | ImageDataset,
                    run: RunContext) -> Job:
    """The classifier's :class:`~rcfd.training.loop.Job` (see :func:`train_classifier`)."""
    unit = cfg.role
    full = data if isinstance(data, ImageDataset) else load_dataset(data, "train")
    test = load_dataset(data, "test") if isinstance(data, DatasetSpec) else None
    if full.labels is None:
        raise UsageError(f"classifier training needs labelled images; the {full.name} data has "
                         "no labels (use digits or cifar10, or pass a trained classifier)")
    train, val = full.split_off(cfg.val_fraction, seed=stage_seed(0, STAGE, "validation"))
    device = run.torch_device
    config = ClassifierConfig(name=cfg.arch, num_classes=train.num_classes,
                              in_channels=train.channels, width=cfg.width,
                              **({"input_size": train.image_size} if cfg.arch == "mlp" else {}))
    torch.manual_seed(stage_seed(run.seed + cfg.seed_offset, STAGE, unit, "init"))
    model = build(config)
    data_iter = data_batches(train, cfg.batch_size, run, STAGE, unit, cfg.seed_offset, flip=False)
    steps = cfg.steps or cfg.epochs * data_iter.batches_per_epoch
    identity = data_identity(data, full)
    fill = pad_value(cfg.pad_fill, train.images)

    def loss_fn(net, x, y, info):
        x = classifier_augment(x, info.generator, crop=cfg.crop, padding=cfg.crop_padding, flip=cfg.flip,
                               autoaugment=cfg.autoaugment, cutout=cfg.cutout,
                               cutout_fraction=cfg.cutout_fraction, pad_fill=fill)
        if cfg.options.channels_last and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        logits, _ = net(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"train_acc": (logits.argmax(1) == y).float().mean()}

    def eval_fn(net, extra, step):
        acc = accuracy(net, val, device)
        if acc > extra.get("accuracy", -1.0):
            extra.update(accuracy=acc, best_step=step,
                         best_state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        extra["final_accuracy"] = acc
        return {"val_acc": acc, "best_val_acc": extra["accuracy"]}

    def finalize(net, ema_net, extra, path):
        state = extra.pop("best_state", None) or net.state_dict()
        info = {k: extra[k] for k in ("accuracy", "best_step", "final_accuracy") if k in extra}
        if test is not None:  # reported, never used to choose
            kept = build(config)
            kept.load_state_dict(state)
            info["test_accuracy"] = accuracy(kept.to(device), test, device)
        return save_model_checkpoint(make_checkpoint(
            "classifier", config.to_dict(), state,
            extra={"stage": STAGE, "role": cfg.role, "finished": True, **info,
                   "image_size": train.image_size, "steps": extra["steps"],
                   "config": cfg.to_dict(), "data": data_spec_dict(identity)}), path)

    o = cfg.options
    interval = cfg.eval_interval or data_iter.batches_per_epoch
    job = Job(stage=STAGE, unit=unit, model=model, loss_fn=loss_fn, batches=data_iter,
              steps=steps, config=cfg.to_dict(), finalize=finalize, data=identity,
              optim=OptimSpec(cfg.optimizer, cfg.lr, "multistep", milestones=cfg.milestones,
                              decay=cfg.lr_decay, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, fused=o.fused),
              log_interval=cfg.log_interval, checkpoint_interval=interval, eval_fn=eval_fn,
              eval_interval=interval, bf16=o.bf16, channels_last=o.channels_last,
              compile=o.compile, seed_offset=cfg.seed_offset, rank_generator=True)
    return job


def load_classifier(source: Path | str | nn.Module, device: torch.device | str = "cpu",
                    arch: str | None = None, in_channels: int = 3) -> nn.Module:
    """A classifier in eval mode on ``device`` from: a module (returned as is), one of our
    checkpoints (rebuilt from its :class:`ClassifierConfig`), a reference ``{'model':
    state_dict}`` file (``arch`` names its architecture; CIFAR-10 normalisation), or an
    ``imagenet_*`` name (torchvision ImageNet weights from the local cache, taking
    ``in_channels``-channel images). Files go through
    :func:`rcfd.io.checkpoint.load_classifier_checkpoint` (checked before anything is built)."""
    if isinstance(source, nn.Module):
        return source.to(device).eval()
    name = str(source)
    if name.startswith("imagenet_") and not Path(name).exists():
        return build(ClassifierConfig(name=name, in_channels=in_channels)).to(device).eval()
    return load_classifier_checkpoint(name, device, arch)


def _our_checkpoint(source) -> dict | None:
    """The checkpoint dict at ``source`` if it is a file of our format, else ``None``."""
    if isinstance(source, nn.Module) or not Path(str(source)).is_file():
        return None
    ckpt = load_model_file(source)
    return ckpt if is_rcfd_checkpoint(ckpt) else None


def classifier_info(source) -> dict:
    """What one of our classifier checkpoints records besides weights (``role``,
    ``accuracy``, ``image_size``, ...); ``{}`` for other sources."""
    ckpt = _our_checkpoint(source)
    return {} if ckpt is None else dict(ckpt.get("extra") or {})


def classifier_record(source, role: str, extractor: str | None = None) -> dict:
    """What ``results.json`` records of one classifier (``classifiers.<name>``): its ``role``,
    the ``extractor`` it serves as (if any), and, for one of our checkpoints, its ``arch``,
    ``width``, training ``steps``, ``val_accuracy`` (the accuracy that chose its weights) and
    ``test_accuracy`` (of the kept weights on the data's held-out test split, computed when the
    classifier stage trained it; ``None`` where none was, e.g. for a reference checkpoint)."""
    record = {"role": role, "extractor": extractor, "arch": None, "width": None, "steps": None,
              "val_accuracy": None, "test_accuracy": None}
    ckpt = _our_checkpoint(source)
    if ckpt is None:
        return record
    extra, config = ckpt.get("extra") or {}, ckpt.get("model_config") or {}
    return {**record, "arch": config.get("name"), "width": config.get("width"), "steps": extra.get("steps"),
            "val_accuracy": extra.get("accuracy"), "test_accuracy": extra.get("test_accuracy")}


def run_classifiers(distill=None, evaluation=None, mlp=None) -> dict[str, dict]:
    """``{"distill": record, "eval": record, "mlp": record}`` (:func:`classifier_record`) of a
    run's distillation classifier, evaluation classifier (the ``classifier`` extractor) and MLP
    classifier (the ``mlp-classifier`` extractor), leaving out those that are ``None``."""
    given = {"distill": distill, "eval": evaluation, "mlp": mlp}
    return {role: classifier_record(src, role, EXTRACTOR_OF_ROLE.get(role))
            for role, src in given.items() if src is not None}


# --------------------------------------------------------------------------- the method

SECTIONS = {"distill_classifier": "distill", "eval_classifier": "eval", "mlp_classifier": "mlp"}


def default_eval_classifier() -> ClassifierStageConfig:
    """The evaluation classifier's default section: the distillation classifier's settings
    with another seed, so that the two differ."""
    return ClassifierStageConfig(role="eval", seed_offset=1)


def default_mlp_classifier() -> ClassifierStageConfig:
    """The MLP classifier's default section, which differs from the distillation
    classifier's in every respect but the data: the architecture (a two-hidden-layer
    perceptron of width 256 on the flattened pixels, :class:`rcfd.core.classifiers.MLPClassifier`,
    input size from the data; its features are the second hidden layer's, not a conv net's
    pooled map); the recipe (Adam at 1e-3, no weight decay, batch 128, 2,000 steps, learning
    rate divided by 10 at 1/2 and 3/4; the only augmentation a random shift of up to one pixel,
    the uncovered border filled with the data's background: no flip, no AutoAugment, no
    Cutout); and the seed (``seed_offset=2``: its own initialisation and batch order; the
    validation part is the same, drawn from the stage's fixed seed)."""
    return ClassifierStageConfig(role="mlp", arch="mlp", width=256, epochs=None, steps=2000,
                                 batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
                                 crop_padding=1, flip=False, autoaugment=False, cutout=False,
                                 pad_fill="background", seed_offset=2, eval_interval=100)


def stages(view) -> list[ClassifierStageConfig]:
    """The classifier sections the config switches on."""
    return [c for c in (getattr(view, k, None) for k in SECTIONS) if c is not None]


def _train(view, run: RunContext) -> list[Path]:
    return [train_classifier(c, view.data, run) for c in stages(view)]


def _describe(view) -> str:
    def one(c):
        steps = f"{c.steps} steps" if c.steps is not None else f"{c.epochs} epochs"
        return f"{c.role} {c.arch}{'' if c.width is None else f' (width {c.width})'}, {steps}"
    return ", ".join(one(c) for c in stages(view)) or "none"


def _check(view) -> None:
    for key, role in SECTIONS.items():
        c = getattr(view, key)
        if c is not None and c.role != role:
            raise ValueError(f"{key}.role must be {role!r}, got {c.role!r}")
    d = view.distill_classifier
    for key in ("eval_classifier", "mlp_classifier"):
        e = getattr(view, key)
        if d is not None and e is not None and e.replace(role="distill") == d:
            raise ValueError(f"{key} equals distill_classifier: give it another "
                             "seed_offset (or architecture) so evaluation is not circular")
    if view.data.name == "folder" and stages(view):
        raise ValueError("a folder of images has no labels, so no classifier can be trained on "
                         "it: set distill_classifier, eval_classifier and mlp_classifier to null and "
                         "rcfd.classifier to a classifier checkpoint (or imagenet_resnet50)")


METHOD = Method(
    name=STAGE,
    sections={"distill_classifier": (ClassifierStageConfig | None, ClassifierStageConfig),
              "eval_classifier": (ClassifierStageConfig | None, default_eval_classifier),
              "mlp_classifier": (ClassifierStageConfig | None, default_mlp_classifier)},
    train=_train, describe=_describe, check=_check,
    help="the distillation, evaluation and MLP classifiers")
