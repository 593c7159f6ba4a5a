"""The named configurations: ``smoke`` (a tiny end-to-end check), ``digits`` (the embedded
default study), ``cifar10-paper`` and ``cifar10-paper-densenet201`` (the paper's settings,
METHOD.md), each a validated :class:`rcfd.config.PipelineConfig` built fresh by
:func:`get_preset`. :func:`rcfd.config.load_config` starts from one when a file names it
(``preset: digits``).
"""

from __future__ import annotations

from rcfd.config import (
    BaseStageConfig,
    ClassifierStageConfig,
    EvalStageConfig,
    PDStageConfig,
    PipelineConfig,
    RCFDStageConfig,
)
from rcfd.data import DatasetSpec
from rcfd.losses import RCFDLossConfig
from rcfd.core.unet import UNetConfig


def classifier_paper(arch: str = "resnet18", role: str = "distill", **changes) -> ClassifierStageConfig:
    """The paper's classifier recipe (METHOD.md, "Classifiers"): SGD lr 0.1, momentum 0.9,
    wd 5e-4, 300 epochs, lr /10 at 1/2 and 3/4, crop + flip + AutoAugment + Cutout."""
    return ClassifierStageConfig(role=role, arch=arch, seed_offset=int(role == "eval"),
                                 **changes)


def _cifar10_paper(arch: str = "resnet18") -> PipelineConfig:
    loss = (RCFDLossConfig(tau=0.95, alpha=0.003, beta=0.75) if arch == "resnet18" else
            RCFDLossConfig(tau=0.9, alpha=0.0))
    return PipelineConfig(
        name=f"cifar10-paper{'' if arch == 'resnet18' else '-' + arch}", device="auto",
        data=DatasetSpec(name="cifar10", path="data/cifar-10-batches-py"),
        distill_classifier=classifier_paper(arch),
        eval_classifier=None,
        base=BaseStageConfig(),  # UNetConfig.cifar10(), T=1024, 800k steps (METHOD.md)
        pd=PDStageConfig(),  # 1024 -> 1, 10k steps per round, 20k for the 2- and 1-step
        rcfd=RCFDStageConfig(loss=loss),  # 8 -> 4 -> 2 -> 1 from the PD student at T=8
        eval=EvalStageConfig(extractor="inception", base_steps=(8, 1024)))


def _digits() -> PipelineConfig:
    """The embedded default: the whole study on 16x16 digits in about eleven minutes on a
    2-core CPU (measured: 10:46 with one thread on a shared machine, of which base 4:06,
    PD 2:31, RCFD 1:52, evaluation 1:47, classifiers 0:25). Base ``T = 32`` (PD 32 -> 16 -> 8 -> 4 -> 2 -> 1, RCFD 8 -> 4 -> 2 -> 1), the
    digits U-Net, no horizontal flips (a mirrored digit is not a digit)."""
    T = 32
    unet = UNetConfig.digits(num_time_indices=T + 1)
    distill = dict(steps_per_round=150, long_round_steps=250, batch_size=32, lr=2e-4,
                   lr_schedule="cosine", flip=False, sample_interval=10 ** 9,
                   num_sample_images=64, checkpoint_interval=100, log_interval=5)
    clf = dict(arch="resnet18", width=8, epochs=None, steps=400, batch_size=64, flip=False,
               autoaugment=False, eval_interval=100)
    return PipelineConfig(
        name="digits", threads=None, data=DatasetSpec(name="digits"),
        distill_classifier=ClassifierStageConfig(role="distill", **clf),
        eval_classifier=ClassifierStageConfig(role="eval", seed_offset=1,
                                              **{**clf, "arch": "densenet_small"}),
        base=BaseStageConfig(unet=unet, T=T, lr=1e-3, warmup=100, batch_size=64, steps=1200,
                             ema_decay=0.998, flip=False, sample_interval=500,
                             num_sample_images=64, checkpoint_interval=250, log_interval=10),
        pd=PDStageConfig(**distill),
        rcfd=RCFDStageConfig(**distill, loss=RCFDLossConfig(tau=0.95, alpha=0.003, beta=0.75)),
        eval=EvalStageConfig(steps=(1, 2, 4, 8), base_steps=(8, 32), num_samples=1000,
                             batch_size=250, extractor="classifier"))


def _smoke() -> PipelineConfig:
    """Tiny: every stage runs a handful of steps (a whole pipeline in well under 2 minutes
    on a CPU). For tests and for checking an installation, not for results."""
    T = 16
    unet = UNetConfig(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2), attn=(),
                      num_res_blocks=1, dropout=0.0, num_time_indices=T + 1)
    distill = dict(steps_per_round=4, long_round_steps=4, batch_size=32, lr=2e-4,
                   sample_interval=10 ** 9, checkpoint_interval=2, log_interval=1,
                   num_sample_images=16)
    clf = dict(arch="resnet18", width=8, epochs=None, steps=10, batch_size=32,
               autoaugment=False, eval_interval=10, log_interval=1)
    return PipelineConfig(
        name="smoke", data=DatasetSpec(name="digits"),
        distill_classifier=ClassifierStageConfig(role="distill", **clf),
        eval_classifier=ClassifierStageConfig(role="eval", seed_offset=1,
                                              **{**clf, "arch": "densenet_small"}),
        base=BaseStageConfig(unet=unet, T=T, lr=1e-3, warmup=2, batch_size=32, steps=8,
                             ema_decay=0.9, sample_interval=8, num_sample_images=16,
                             checkpoint_interval=4, log_interval=1),
        pd=PDStageConfig(final_T=1, **distill),
        rcfd=RCFDStageConfig(start_T=8, final_T=1, **distill),
        eval=EvalStageConfig(steps=(1, 2, 4, 8), base_steps=(16,), num_samples=64,
                             batch_size=64, extractor="classifier"))


PRESETS = {
    "smoke": _smoke,
    "digits": _digits,
    "cifar10-paper": _cifar10_paper,
    "cifar10-paper-densenet201": lambda: _cifar10_paper("densenet201"),
}
DEFAULT_PRESET = "digits"


def get_preset(name: str) -> PipelineConfig:
    """The preset ``name`` (see ``PRESETS``), built fresh and validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


__all__ = ["DEFAULT_PRESET", "PRESETS", "classifier_paper", "get_preset"]
