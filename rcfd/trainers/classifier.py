"""Classifier training (METHOD.md, "Classifiers"): SGD with momentum and weight decay, the
learning rate divided by 10 at 1/2 and 3/4 of training, crop + flip + AutoAugment + Cutout
on every batch (:func:`rcfd.data.augment.classifier_augment`), test accuracy logged at every
epoch (or ``eval_interval``) and the best weights kept. Writes
``run_dir/classifier/<role>.pt`` (``kind="classifier"``, with its :class:`ClassifierConfig`,
so :func:`load_classifier` rebuilds it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rcfd.data.augment import classifier_augment
from rcfd.checkpoint import (
    load_checkpoint,
    load_classifier_state_dict,
    load_state_dict_strict,
    make_checkpoint,
    save_checkpoint,
)
from rcfd.core.classifiers import ClassifierConfig, load_reference_classifier
from rcfd.config import ClassifierStageConfig
from rcfd.data import DatasetSpec, ImageDataset, load_dataset, to_float
from rcfd.trainers.base import _data_dict, data_batches
from rcfd.trainers.loop import Job, run_job, stage_seed
from rcfd.trainers.optim import OptimSpec
from rcfd.trainers.rundir import RunContext, checkpoint_path, unit_done

STAGE = "classifier"


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


def train_classifier(cfg: ClassifierStageConfig, data: DatasetSpec, run: RunContext) -> Path:
    """Train the ``cfg.role`` classifier on ``data``'s training split, measuring top-1
    accuracy on its test split. Returns ``run_dir/classifier/<role>.pt`` holding the weights
    of the best test accuracy (``extra``: ``accuracy``, ``best_step``, ``final_accuracy``,
    ``image_size``)."""
    unit = cfg.role
    if unit_done(run, STAGE, unit):
        return checkpoint_path(run.run_dir, STAGE, unit)
    train = data if isinstance(data, ImageDataset) else load_dataset(data, "train")
    test = load_dataset(data, "test") if isinstance(data, DatasetSpec) else train
    if train.labels is None:
        raise ValueError(f"classifier training needs labelled images; the {train.name} data has "
                         "no labels (use digits or cifar10, or pass a trained classifier)")
    device = run.torch_device
    config = ClassifierConfig(name=cfg.arch, num_classes=train.num_classes,
                              in_channels=train.channels, width=cfg.width)
    torch.manual_seed(stage_seed(run.seed + cfg.seed_offset, STAGE, unit, "init"))
    model = config.build()
    data_iter = data_batches(train, cfg.batch_size, run, STAGE, unit, cfg.seed_offset, flip=False)
    steps = cfg.steps or cfg.epochs * data_iter.batches_per_epoch

    def loss_fn(net, x, y, info):
        x = classifier_augment(x, info.generator, crop=cfg.crop, flip=cfg.flip,
                               autoaugment=cfg.autoaugment, cutout=cfg.cutout)
        if cfg.options.channels_last and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        logits, _ = net(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"train_acc": (logits.argmax(1) == y).float().mean()}

    def eval_fn(net, extra, step):
        acc = accuracy(net, test, device)
        if acc > extra.get("accuracy", -1.0):
            extra.update(accuracy=acc, best_step=step,
                         best_state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        extra["final_accuracy"] = acc
        return {"test_acc": acc, "best_acc": extra["accuracy"]}

    def finalize(net, ema_net, extra, path):
        state = extra.pop("best_state", None) or net.state_dict()
        info = {k: extra[k] for k in ("accuracy", "best_step", "final_accuracy") if k in extra}
        return save_checkpoint(make_checkpoint(
            "classifier", config.to_dict(), state,
            extra={"stage": STAGE, "role": cfg.role, "finished": True, **info,
                   "image_size": train.image_size, "steps": extra["steps"],
                   "config": cfg.to_dict(), "data": _data_dict(data, train)}), path)

    o = cfg.options
    job = Job(stage=STAGE, unit=unit, model=model, loss_fn=loss_fn, batches=data_iter,
              steps=steps, config=cfg.to_dict(), finalize=finalize,
              optim=OptimSpec("sgd", cfg.lr, "multistep", milestones=cfg.milestones,
                              decay=cfg.lr_decay, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, fused=o.fused),
              log_interval=cfg.log_interval, checkpoint_interval=cfg.eval_interval or
              data_iter.batches_per_epoch, eval_fn=eval_fn,
              eval_interval=cfg.eval_interval or data_iter.batches_per_epoch, bf16=o.bf16,
              channels_last=o.channels_last, compile=o.compile, seed_offset=cfg.seed_offset,
              rank_generator=True)
    return run_job(job, run)


def load_classifier(source: Path | str | nn.Module, device: torch.device | str = "cpu",
                    arch: str | None = None, in_channels: int = 3) -> nn.Module:
    """A classifier in eval mode on ``device`` from: a module (returned as is), one of our
    checkpoints (rebuilt from its :class:`ClassifierConfig`), a reference ``{'model':
    state_dict}`` file (``arch`` names its architecture; CIFAR-10 normalisation), or an
    ``imagenet_*`` name (torchvision ImageNet weights from the local cache, taking
    ``in_channels``-channel images)."""
    if isinstance(source, nn.Module):
        return source.to(device).eval()
    name = str(source)
    if name.startswith("imagenet_") and not Path(name).exists():
        return ClassifierConfig(name=name, in_channels=in_channels).build().to(device).eval()
    state, model_config = load_classifier_state_dict(name)
    if model_config:
        config = ClassifierConfig.from_dict(model_config)
        model = config.build()
        load_state_dict_strict(model, state, what=f"classifier {name}")
    else:
        if arch is None:
            raise ValueError(f"{name} is a reference classifier checkpoint, which does not record "
                             "its architecture: name it (rcfd.classifier_arch, e.g. 'resnet18')")
        model = load_reference_classifier({"model": state}, arch)
    return model.to(device).eval()


def classifier_info(source) -> dict:
    """What one of our classifier checkpoints records besides weights (``role``,
    ``accuracy``, ``image_size``, ...); ``{}`` for other sources."""
    if isinstance(source, nn.Module) or not Path(str(source)).is_file():
        return {}
    ckpt = load_checkpoint(source)
    return dict(ckpt.get("extra") or {}) if isinstance(ckpt, dict) else {}
