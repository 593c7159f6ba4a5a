"""The method registry: a method defined and registered in this file alone runs through the
pipeline (its config section, its stage on the command line, its training), is evaluated,
and gets its row in results.md; and the registry's own rules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rcfd.report import results as report
from rcfd.io.checkpoint import load_diffusion_checkpoint, save_diffusion_checkpoint
from rcfd.cli import train
from rcfd.config import PosInt, Pow2, Section
from rcfd.core.schedule import cosine_schedule
from rcfd.losses import DenoisingLoss
from rcfd.methods import registry
from rcfd.methods.common import data_batches, load_train, require, train_unit
from rcfd.study.config import StudyConfig, pipeline_config_class
from rcfd.study.presets import get_preset
from rcfd.training.loop import Job
from rcfd.training.optim import OptimSpec


class ToyConfig(Section):
    """A method that fine-tunes the base model for a few steps at a low learning rate."""

    steps: PosInt = 2
    lr: float = 1e-5
    eval_steps: Pow2 = 4


def train_toy(cfg, run) -> list[Path]:
    return [train_unit(run, "toy", "model", lambda: toy_job(cfg, run))]


def toy_job(cfg, run) -> Job:
    model, info = load_diffusion_checkpoint(require(run.run_dir, "base", "model"))
    objective = DenoisingLoss(cosine_schedule(info.T, 1), info.T, 1)

    def loss_fn(net, x, y, step):
        out = objective(net, x, *objective.draw(step.generator, x, step.global_batch, step.rows))
        return out.loss, out.terms

    def finalize(net, ema, extra, path):
        return save_diffusion_checkpoint(path, net, T=info.T, time_scale=1, extra={"stage": "toy"})

    dataset = load_train(cfg.data)
    job = Job(stage="toy", unit="model", model=model.train(), loss_fn=loss_fn,
              batches=data_batches(dataset, 16, run, "toy", "model"), steps=cfg.toy.steps,
              optim=OptimSpec("adam", cfg.toy.lr), config=cfg.toy.to_dict(), finalize=finalize)
    return job


TOY = registry.Method(
    name="toy", sections={"toy": (ToyConfig, ToyConfig)}, train=train_toy,
    describe=lambda cfg: f"fine-tune the base model for {cfg.toy.steps} steps",
    rows=lambda cfg: [registry.Row("toy", "Toy method", cfg.toy.eval_steps, "toy", "model")],
    needs=("base",), help="a toy method defined in a test")

TINY = ["--set", "distill_classifier.steps=2", "--set", "eval_classifier.steps=2",
        "--set", "base.steps=2", "--set", "pd.steps_per_round=1", "--set", "pd.long_round_steps=1",
        "--set", "rcfd.steps_per_round=1", "--set", "rcfd.long_round_steps=1",
        "--set", "eval.num_samples=20", "--set", "eval.steps=[1]", "--set", "eval.batch_size=20",
        "--set", "threads=1"]


@pytest.fixture
def toy():
    with registry.registered(TOY):
        yield TOY


def test_a_method_registered_in_a_test_runs_through_the_pipeline(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert "toy" in pipeline_config_class().model_fields
    assert issubclass(pipeline_config_class(), StudyConfig)  # the built-in sections stay typed
    assert get_preset("smoke").toy == ToyConfig()
    assert "toy" in train.stages() and "a toy method defined in a test" in train.build_parser().format_help()
    code = train.main(["--preset", "smoke", "--out", str(out), "--device", "cpu", "--no-progress",
                       "--set", "toy.steps=3", *TINY])
    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "toy        fine-tune the base model for 3 steps" in stdout  # the stage plan
    model, info = load_diffusion_checkpoint(out / "toy" / "model.safetensors")
    assert info.extra["stage"] == "toy"
    results = json.loads((out / report.RESULTS_JSON).read_text())
    toy_rows = [e for e in results["entries"] if e["method"] == "toy"]
    assert [(e["label"], e["steps"]) for e in toy_rows] == [("Toy method", 4)]
    assert "| Toy method |" in (out / report.RESULTS_MD).read_text()
    assert json.loads((out / "config.json").read_text())["toy"]["steps"] == 3


def test_registry_rules():
    assert "toy" not in pipeline_config_class().model_fields  # the fixture cleaned up
    names = [m.name for m in registry.methods()]
    assert names[:4] == ["classifier", "base", "pd", "rcfd"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("pd"))
    clash = registry.Method(name="other", sections={"pd": (ToyConfig, ToyConfig)},
                            train=train_toy, describe=str)
    with pytest.raises(ValueError, match=r"section\(s\) \['pd'\] of 'other' are taken"):
        registry.register(clash)
    orphan = registry.Method(name="orphan", sections={}, train=train_toy, describe=str,
                             needs=("nothing",))
    with pytest.raises(ValueError, match="needs \\['nothing'\\]"):
        registry.register(orphan)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="need it"):
        registry.unregister("base")


def test_a_method_sees_only_what_it_declares():
    cfg = get_preset("smoke")
    pd = registry.get("pd")
    view = pd.view(cfg)
    assert view.teacher_T == cfg.base.T and view.pd == cfg.pd and view.data == cfg.data
    assert view.eval_steps == cfg.eval.steps and view.seed == cfg.seed
    with pytest.raises(AttributeError, match=r"method 'pd' reads 'base', which it does not declare"):
        view.base
    with pytest.raises(AttributeError, match="eval_classifier.*declare"):
        view.eval_classifier
    with pytest.raises(AttributeError, match="read-only"):
        view.pd = None
    for m in registry.methods():  # exactly the run-level values, its reads and its sections
        names = set(registry.RUN_LEVEL) | set(m.reads) | set(m.sections)
        assert set(object.__getattribute__(m.view(cfg), "_values")) == names
    rcfd = registry.get("rcfd").view(cfg.replace(distill_classifier=None, rcfd={"classifier": "imagenet_resnet50"}))
    assert rcfd.distill_arch is None and rcfd.eval_arch == cfg.eval_classifier.arch  # a switched-off section reads None


def test_distillation_methods_say_what_they_distill_into():
    cfg = get_preset("digits")
    into = {m.name: m.distills_into(m.view(cfg)) for m in registry.methods() if m.distills_into}
    assert into == {"rcfd": registry.DistilledClassifier("distill", None),
                    "cfd": registry.DistilledClassifier("distill", None)}
    assert registry.get("pd").distills_into is None


def test_the_study_config_declares_every_builtin_section():
    assert pipeline_config_class() is StudyConfig  # no extra method registered
    for m in registry.methods():
        for key, (annotation, default) in m.sections.items():
            field = StudyConfig.model_fields[key]
            assert field.annotation == annotation, key
            assert field.get_default(call_default_factory=True) == default(), key


def test_importing_the_methods_registers_nothing_until_looked_up():
    code = ("import rcfd.methods, rcfd.methods.pd, rcfd.methods.rcfd\n"
            "from rcfd.methods import registry\n"
            "print(len(registry._METHODS), len(registry.methods()), len(registry.methods()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", str(len(registry.BUILTIN)), str(len(registry.BUILTIN))]
