"""The one-round ablation presets (digits-ablation, digits-ablation-10x, mnist5k-ablation,
mnist5k-ablation-10x): PD, CFD and RCFD each train one 8 -> 4 round from the same pd/T8 with
the same optimiser and budget; the base model and PD down to 8 steps are the default run's.
The slow test runs digits-ablation end to end at smoke sizes."""

import json

import pytest

from rcfd.cli import train
from rcfd.io.checkpoint import load_diffusion_checkpoint
from rcfd.report import results as report
from rcfd.study.presets import get_preset

SHARED = ("lr", "lr_schedule", "batch_size", "grad_clip", "ema_decay", "warmup", "flip", "dropout")


@pytest.mark.parametrize("name,data", [("digits-ablation", "digits"), ("mnist5k-ablation", "mnist5k")])
def test_one_round_same_start_same_budget(name, data):
    default, cfg, big = get_preset("digits"), get_preset(name), get_preset(f"{name}-10x")
    assert cfg.data.name == data and cfg.cd is None and big.cd is None
    for c, budget in ((cfg, 1), (big, 10)):
        assert (c.pd.final_T, c.rcfd.start_T, c.rcfd.final_T, c.cfd.start_T, c.cfd.final_T) == (4, 8, 4, 8, 4)
        steps = {s: getattr(c, s).round_steps(4) for s in ("pd", "rcfd", "cfd")}
        assert set(steps.values()) == {budget * default.pd.round_steps(4)}  # 150 or 1,500 for all three
        for s in ("rcfd", "cfd"):
            assert all(getattr(getattr(c, s), k) == getattr(c.pd, k) for k in SHARED), s
        # PD down to 8 steps trains as in the default run (the rounds 64 -> 8)
        assert [c.pd.round_steps(t) for t in (32, 16, 8)] == [default.pd.round_steps(t) for t in (32, 16, 8)]
        assert c.base == (default.base if data == "digits" else c.base)
        assert c.rcfd.loss.alpha > 0 and c.cfd.loss.alpha == 0.0 and c.rcfd.loss.tau == c.cfd.loss.tau
        assert c.eval.steps == (4,) and c.eval.base_steps == (4,) and c.eval.samplers == ("ddim",)
        assert "mlp-classifier" in c.eval.extractors
    if data == "digits":
        assert cfg.distill_classifier == default.distill_classifier and cfg.pd.steps_per_round == default.pd.steps_per_round
    else:
        assert cfg.base.unet.image_size == cfg.data.image_size == 16


SMOKE = {"distill_classifier.steps": 4, "distill_classifier.eval_interval": 2, "eval_classifier.steps": 4,
         "eval_classifier.eval_interval": 2, "mlp_classifier.steps": 4, "mlp_classifier.eval_interval": 2,
         "base.steps": 4, "base.checkpoint_interval": 2, "base.sample_interval": 4, "base.warmup": 1,
         "pd.steps_per_round": 1, "pd.long_round_steps": 2, "rcfd.long_round_steps": 2,
         "cfd.long_round_steps": 2, "eval.num_samples": 40, "eval.batch_size": 40, "threads": 1}


@pytest.mark.slow
def test_digits_ablation_end_to_end_at_smoke_sizes(tmp_path):
    out = tmp_path / "ablation"
    sets = [a for k, v in SMOKE.items() for a in ("--set", f"{k}={v}")]
    assert train.main(["--preset", "digits-ablation", "--device", "cpu", "--no-progress", "--out", str(out),
                       *sets]) == 0
    results = json.loads((out / report.RESULTS_JSON).read_text())
    at4 = {e["key"] for e in results["entries"] if e["steps"] == 4}
    assert {"pd", "cfd", "rcfd"} <= at4 and {e["steps"] for e in results["entries"] if e["key"] != "base"} == {4}
    for e in results["entries"]:
        assert set(e["metrics"]) == set(results["extractors"]) >= {"classifier", "mlp-classifier", "pixels"}
    for stage in ("pd", "rcfd", "cfd"):
        assert load_diffusion_checkpoint(out / stage / "T4.safetensors")[1].T == 4
    assert not (out / "rcfd" / "T2.safetensors").exists() and not (out / "pd" / "T2.safetensors").exists()
    assert set(results["classifiers"]) == {"distill", "eval", "mlp"}
