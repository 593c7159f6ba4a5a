"""Typed configs (pydantic): round trips, presets, overrides and the validation errors that
name the key."""

import json
import subprocess
import sys

import pytest
import yaml

from rcfd.study.configfile import save_config
from rcfd.core.unet import UNetConfig
from rcfd.errors import ConfigError
from rcfd.losses import RCFDLossConfig
from rcfd.methods.base import BaseStageConfig
from rcfd.methods.classifier import ClassifierStageConfig
from rcfd.methods.distill import halving_rounds
from rcfd.methods.pd import PDStageConfig
from rcfd.methods.rcfd import RCFDStageConfig
from rcfd.evaluation import EvalSettings
from rcfd.study.config import EvalConfig, load_config, pipeline_config_class
from rcfd.study.presets import PRESET_CONFIGS, PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name, tmp_path):
    cfg = get_preset(name)
    PipelineConfig = pipeline_config_class()
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    assert PipelineConfig.from_dict(json.loads(cfg.to_json())) == cfg
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(save_config(cfg, tmp_path / "c.json")) == cfg
    assert type(cfg).from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_stage_configs_round_trip():
    for cfg in (ClassifierStageConfig(), BaseStageConfig(), PDStageConfig(), RCFDStageConfig(),
                EvalConfig()):
        assert type(cfg).from_dict(json.loads(cfg.to_json())) == cfg


def test_paper_preset_matches_method():
    cfg = get_preset("cifar10-paper")
    b, pd, r, c = cfg.base, cfg.pd, cfg.rcfd, cfg.distill_classifier
    assert (b.T, b.lr, b.warmup, b.batch_size, b.steps, b.ema_decay, b.grad_clip, b.loss) == (
        1024, 2e-4, 5000, 128, 800_000, 0.9999, 1.0, "both")
    assert b.unet == UNetConfig.cifar10() and b.unet.dropout == 0.1
    assert [t for t, _ in halving_rounds(b.T, pd.final_T)][0] == 1024 and pd.final_T == 1
    assert (pd.lr, pd.lr_schedule, pd.batch_size, pd.grad_clip, pd.ema_decay, pd.dropout) == (
        5e-5, "cosine", 128, 1.0, None, 0.0)
    assert [pd.round_steps(t) for t in (512, 4, 2, 1)] == [10_000, 10_000, 20_000, 20_000]
    assert (r.start_T, r.final_T, r.classifier) == (8, 1, "distill")
    assert (r.loss.tau, r.loss.alpha, r.loss.beta) == (0.95, 0.003, 0.75)
    assert (c.arch, c.lr, c.momentum, c.weight_decay, c.epochs, c.milestones) == (
        "resnet18", 0.1, 0.9, 5e-4, 300, (0.5, 0.75))
    assert c.crop and c.flip and c.autoaugment and c.cutout
    dense = get_preset("cifar10-paper-densenet201")
    assert dense.distill_classifier.arch == "densenet201"
    assert (dense.rcfd.loss.tau, dense.rcfd.loss.alpha) == (0.9, 0.0)


def test_digits_preset_runs_the_whole_study():
    cfg = get_preset("digits")
    assert cfg.distill_classifier and cfg.eval_classifier
    assert cfg.distill_classifier != cfg.eval_classifier.replace(role="distill")
    assert halving_rounds(cfg.base.T, cfg.pd.final_T)[-1][1] == 1
    assert halving_rounds(cfg.rcfd.start_T, cfg.rcfd.final_T) == [(8, 4), (4, 2), (2, 1)]
    assert cfg.base.unet.image_size == cfg.data.image_size == 8  # the digits' native size
    assert cfg.cfd is not None and cfg.cfd.loss.alpha == 0.0  # the CFD-alone ablation rows
    assert set(cfg.eval.samplers) == {"ddim", "dpm-solver", "pndm"}


def test_overrides_are_dotted_and_parse_strings():
    cfg = get_preset("digits")
    new = cfg.with_overrides({"base.steps": "100", "rcfd.loss.tau": "0.9",
                              "eval.steps": "[1, 2]", "base.ema_decay": "null",
                              "pd.lr": "1e-4", "rcfd.lr": "2E-5"})
    assert new.base.steps == 100 and new.rcfd.loss.tau == 0.9 and new.eval.steps == (1, 2)
    assert new.base.ema_decay is None and new.pd.lr == 1e-4 and new.rcfd.lr == 2e-5
    assert cfg.base.steps != 100  # frozen: the original is unchanged
    with pytest.raises(ConfigError, match=r"'base\.stepz'.*steps"):
        cfg.with_overrides({"base.stepz": 1})
    with pytest.raises(ValueError, match="is a value, not a section"):
        cfg.with_overrides({"seed.x": 1})


def test_unknown_keys_name_the_key_and_the_valid_ones():
    PipelineConfig = pipeline_config_class()
    with pytest.raises(ConfigError, match=r"lrr: unknown key.*valid keys there:.*\blr\b"):
        BaseStageConfig.from_dict({"lrr": 1})
    with pytest.raises(ConfigError, match=r"rcfd\.loss\.taux: unknown key.*tau"):
        PipelineConfig.from_dict({"rcfd": {"loss": {"taux": 1}}})
    with pytest.raises(ConfigError, match=r"base\.unet\.chh: unknown key"):
        PipelineConfig.from_dict({"base": {"unet": {"chh": 3}}})


def test_load_config_merges_over_a_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: smoke\nbase:\n  steps: 3\npd:\n  lr: 1e-4\n")
    cfg = load_config(p, presets=PRESET_CONFIGS)
    assert cfg.base.steps == 3 and cfg.name == "smoke"
    assert cfg.pd.lr == 1e-4  # YAML 1.1 alone would read 1e-4 as a string
    assert cfg.base.unet == get_preset("smoke").base.unet
    with pytest.raises(ConfigError, match="must end in"):
        load_config(tmp_path / "c.txt")
    p.write_text("preset: nope\n")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: smoke"):
        load_config(p, presets=PRESET_CONFIGS)
    p.write_text("base: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, presets=PRESET_CONFIGS)
    p.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(p, presets=PRESET_CONFIGS)


@pytest.mark.parametrize("overrides, match", [
    ({"base.lr": -1e-4}, r"base\.lr: Input should be greater than 0 \(got -0\.0001\)"),
    ({"pd.lr": 0}, r"pd\.lr: Input should be greater than 0"),
    ({"base.lr": "nan"}, r"base\.lr: must be a finite number"),
    ({"base.T": 48}, r"base\.T: must be a power of two"),
    ({"base.steps": 0}, r"base\.steps: Input should be greater than or equal to 1"),
    ({"base.steps": True}, r"base\.steps: must be a number, not true/false"),
    ({"base.sample_steps": 3}, "power of two"),
    ({"eval.steps": [1, 3]}, r"eval\.steps\[1\]: must be a power of two"),
    ({"eval.steps": [128]}, r"eval\.steps 128 exceed the base model's T=64"),
    ({"eval.methods": ["bogus"]}, r"'bogus' is not a method.*choose from base, pd, rcfd"),
    ({"eval.samplers": ["euler"]}, r"eval\.samplers\[0\]: Input should be 'ddim', 'dpm-solver' or 'pndm'"),
    ({"rcfd.loss.tau": 0.0}, r"rcfd\.loss\.tau: Input should be greater than 0"),
    ({"rcfd.loss.tau": -1.0}, r"rcfd\.loss\.tau"),
    ({"rcfd.loss.beta": 1.5}, r"rcfd\.loss\.beta"),
    ({"rcfd.final_T": 8}, "must be below start_T"),
    ({"rcfd.start_T": 6}, "power of two"),
    ({"pd.final_T": 16}, r"pd\.final_T=16 must be <= rcfd\.start_T"),
    ({"rcfd.start_T": 64, "pd.final_T": 1}, r"below base\.T"),
    ({"base.unet.image_size": 32}, "data gives 1x8x8"),
    ({"base.unet.num_time_indices": 32}, "needs T \\+ 1 = 65"),
    ({"distill_classifier.steps": None, "distill_classifier.epochs": None}, "exactly one"),
    ({"eval_classifier.seed_offset": 0, "eval_classifier.arch": "resnet18"}, "circular"),
    ({"eval_classifier.role": "distill"}, r"eval_classifier\.role"),
    ({"data.name": "folder", "data.path": "/images"}, "has no labels"),
    ({"distill_classifier": None}, r"rcfd\.classifier='distill' needs a distill_classifier"),
    ({"pd.ema_decay": 1.0}, "ema_decay"),
    ({"pd.grad_clip": 0}, "grad_clip"),
    ({"base.loss": "l1"}, r"base\.loss: Input should be 'both', 'x' or 'eps' \(got 'l1'\)"),
    ({"device": "tpu"}, r"device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"base": 5}, r"base: Input should be a valid dictionary"),
    ({"data": None}, r"data: Input should be a valid dictionary"),
    ({"base.unet": None}, r"base\.unet: Input should be a valid dictionary"),
    ({"seed.x": 1}, "is a value, not a section"),
    ({"distill_classifier.milestones": [0.75, 0.5]}, "milestones"),
    ({"rcfd.classifier": "eval"}, "measures with the features"),
    ({"eval.primary": "pca"}, "primary=.pca. is not one of the extractors"),
    ({"eval.extractors": ["pixels", "nope"]}, r"eval\.extractors\[1\]"),
])
def test_bad_values_give_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_preset("digits").with_overrides(overrides)


def test_halving_rounds():
    assert halving_rounds(8, 1) == [(8, 4), (4, 2), (2, 1)]
    assert halving_rounds(4, 4) == []
    for bad in ((12, 1), (8, 3), (4, 8)):
        with pytest.raises(ValueError, match="powers of two"):
            halving_rounds(*bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="presets: smoke"):
        get_preset("nope")


def test_rcfd_loss_switches_travel_through_the_config():
    cfg = RCFDStageConfig(loss=RCFDLossConfig(use_cfd=False, kl_on="logits",
                                              dual_temperature=True))
    back = RCFDStageConfig.from_dict(cfg.to_dict())
    assert back.loss == cfg.loss


def test_null_sections_switch_methods_off_and_on():
    cfg = get_preset("smoke")
    assert cfg.cfd is None  # CFD alone is off unless configured
    on = cfg.with_overrides({"cfd.start_T": "8"})
    assert on.cfd.loss.alpha == 0.0 and on.cfd.start_T == 8  # its defaults: CFD alone
    assert on.with_overrides({"cfd": None}).cfd is None


def test_the_field_types_import_no_yaml_and_no_file_helpers():
    code = "import sys, rcfd.losses, rcfd.config; print('yaml' in sys.modules, 'rcfd.io.files' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_one_set_of_evaluation_defaults():
    shared, study = EvalSettings(), EvalConfig()
    assert shared.num_samples == 50_000  # the standard FID sample count
    for name in ("num_samples", "batch_size", "primary", "reference", "grid_images", "dtype"):
        assert getattr(study, name) == getattr(shared, name), name
    assert study.floor == "pd" and shared.floor == "first"  # the study's floor row is PD's cheapest
    # a study also measures with its MLP classifier, right after the evaluation classifier
    assert study.extractors == ("classifier", "mlp-classifier", *shared.extractors[1:])
    assert shared.extractors[0] == "classifier" and "mlp-classifier" not in shared.extractors
