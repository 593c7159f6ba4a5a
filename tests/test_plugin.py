"""Methods from outside the package: a method defined in its own distribution (a folder with
a ``.dist-info`` declaring an ``rcfd.methods`` entry point, on ``PYTHONPATH``) appears in
``python -m rcfd.train --help``, takes its preset values, trains and gets its row in
results.md, with no edit to rcfd/; a broken plug-in is one line and hides nothing; the
package's own entry points are :data:`registry.BUILTIN`; presets merge methods' values."""

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from rcfd.config import PosInt, Section
from rcfd.methods import registry
from rcfd.report import results as report
from rcfd.study.config import PipelineBase
from rcfd.study import presets
from rcfd.study.presets import get_preset

REPO = Path(__file__).resolve().parents[1]

# The plug-in: a complete small method written against the public route only (README,
# "Adding a method"): fine-tune the base model, keeping an EMA target network as its state.
PLUGIN = '''
"""toyplug: fine-tune the base model a few steps; its EMA target network is the result."""

from rcfd.config import PosFloat, PosInt, Section
from rcfd.core.schedule import cosine_schedule
from rcfd.io.checkpoint import save_diffusion_checkpoint
from rcfd.losses import DenoisingLoss
from rcfd.methods.common import data_batches, load_train, require, train_unit
from rcfd.methods.distill import load_teacher, student_from
from rcfd.methods.registry import Method, Row
from rcfd.training.ema import ema_update_
from rcfd.training.fast_step import ObjectiveStep
from rcfd.training.loop import Job
from rcfd.training.optim import OptimSpec

STAGE = "toyplug"


class ToyPlugConfig(Section):
    """Steps, learning rate and batch of the fine-tuning; ``decay``: the target's EMA."""

    steps: PosInt = 100_000
    lr: PosFloat = 1e-5
    batch_size: PosInt = 32
    decay: float = 0.9


def train(view, run):
    cfg = view.toyplug

    def make_job():
        teacher, info = load_teacher(require(run.run_dir, "base", "model"), run.torch_device)
        student = student_from(teacher, info, dropout=0.0)
        target = student_from(teacher, info, dropout=0.0).requires_grad_(False)
        objective = DenoisingLoss(cosine_schedule(info.T, info.time_scale), info.T,
                                  info.time_scale)

        def finalize(net, ema, extra, path):
            return save_diffusion_checkpoint(path, target, T=info.T, time_scale=info.time_scale,
                                             extra={"stage": STAGE, "steps": extra["steps"]})

        return Job(stage=STAGE, unit="model", model=student, loss_fn=ObjectiveStep(objective),
                   batches=data_batches(load_train(view.data), cfg.batch_size, run, STAGE, "model"),
                   steps=cfg.steps, optim=OptimSpec("adam", cfg.lr), config=cfg.to_dict(),
                   finalize=finalize, log_interval=1, state={"target": target},
                   after_step=lambda done, net: ema_update_(target, net, cfg.decay))

    return [train_unit(run, STAGE, "model", make_job)]


METHOD = Method(
    name=STAGE, sections={"toyplug": (ToyPlugConfig, ToyPlugConfig)},
    reads={"teacher_T": "base.T"}, train=train, needs=("base",),
    describe=lambda view: f"fine-tune the base model {view.toyplug.steps} steps",
    rows=lambda view: [Row(STAGE, "Toy plug-in", s, STAGE, "model")
                       for s in sorted(view.eval_steps) if s <= view.teacher_T],
    presets={"smoke": {"toyplug": {"steps": 3, "lr": 1e-4}}},
    help="a plug-in from its own distribution")
'''


def distribution(root: Path, name: str, entry_points: str, module: str | None = None) -> None:
    """A distribution as an installer leaves it: ``<name>-0.1.dist-info/`` (METADATA and
    entry_points.txt) beside its module."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rcfd.methods]\n{entry_points}\n")
    if module is not None:
        (root / f"{name}.py").write_text(module)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    distribution(root, "toyplug", "toyplug = toyplug:METHOD", PLUGIN)
    distribution(root, "brokenplug", "broken = brokenplug_is_not_there:METHOD")
    return root


def python(code_or_args, root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)]),
           "OMP_NUM_THREADS": "1"}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_a_plugin_appears_in_help_and_a_broken_one_is_one_line(plugins, tmp_path):
    out = python(["-m", "rcfd.train", "--help"], plugins, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "toyplug     a plug-in from its own distribution" in out.stdout
    for builtin, _ in registry.BUILTIN:
        assert f"\n  {builtin:<11} " in out.stdout
    problems = [line for line in out.stderr.splitlines() if "brokenplug" in line]
    assert problems == ["rcfd: plug-in method 'broken' (brokenplug_is_not_there:METHOD) of the "
                        "distribution brokenplug 0.1 was not loaded: ModuleNotFoundError: No "
                        "module named 'brokenplug_is_not_there'"]
    assert "Traceback" not in out.stderr


def test_a_plugin_trains_and_gets_its_row(plugins, tmp_path):
    """base -> toyplug -> evaluate at smoke size (the plug-in's smoke values: 3 steps)."""
    run = tmp_path / "run"
    common = ["--preset", "smoke", "--out", str(run), "--device", "cpu", "--no-progress",
              "--set", "base.steps=2", "--set", "eval.methods=[toyplug]",
              "--set", "eval.extractors=[pixels]", "--set", "eval.primary=pixels",
              "--set", "eval.floor=none", "--set", "eval.steps=[2]",
              "--set", "eval.num_samples=20", "--set", "eval.batch_size=20", "--set", "threads=1"]
    code = textwrap.dedent(f"""
        from rcfd.cli import train
        common = {common!r}
        for stage in ("base", "toyplug", "evaluate"):
            assert train.main([stage, *common]) == 0, stage
    """)
    out = python(code, plugins, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "toyplug" / "model.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]  # the smoke preset's 3 steps
    assert json.loads((run / "config.json").read_text())["toyplug"]["steps"] == 3
    results = json.loads((run / report.RESULTS_JSON).read_text())
    assert [(e["label"], e["steps"]) for e in results["entries"] if e["method"] == "toyplug"] == \
        [("Toy plug-in", 2)]
    assert "| Toy plug-in |" in (run / report.RESULTS_MD).read_text()


def test_the_package_declares_its_methods_as_entry_points_in_order():
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert list(table[registry.GROUP].items()) == list(registry.BUILTIN)
    builtin, _ = registry.method_entry_points()  # installed metadata or the fallback: the same
    assert [(ep.name, ep.value) for ep in builtin] == list(registry.BUILTIN)
    assert [m.name for m in registry.methods()][:len(registry.BUILTIN)] == \
        [name for name, _ in registry.BUILTIN]


def test_reserved_keys_are_the_study_configs_run_level_fields():
    assert set(registry.RESERVED) == set(PipelineBase.model_fields)


class Knob(Section):
    """A section with two values."""

    steps: PosInt = 1000
    width: PosInt = 64


def knob(**kw) -> registry.Method:
    return registry.Method(name="knob", sections={"knob": (Knob, Knob)},
                           train=lambda view, run: [], describe=lambda view: "", **kw)


def test_method_presets_merge_under_the_preset_and_none_switches_off():
    with registry.registered(knob(presets={"smoke": {"knob": {"steps": 3}},
                                           "digits": {"knob": None}})):
        assert get_preset("smoke").knob == Knob(steps=3)
        assert get_preset("digits").knob is None  # switched off there
        assert get_preset("cifar10-paper").knob is None  # a plug-in without a paper entry
    with registry.registered(knob(presets={"cifar10-paper": {"knob": {"width": 8}}})):
        assert get_preset("cifar10-paper").knob == Knob(width=8)
        assert get_preset("smoke").knob == Knob()  # no entry: the section's defaults
    smoke = get_preset("smoke")
    with registry.registered(knob(presets={"smoke": {"knob": {"steps": 3}}})):
        assert get_preset("smoke").base == smoke.base  # the built-ins are untouched


def test_the_presets_own_keys_win(monkeypatch):
    smoke = presets.PRESETS["smoke"]
    monkeypatch.setitem(presets.PRESETS, "mine", lambda: {**smoke(), "knob": {"width": 16}})
    with registry.registered(knob(presets={"mine": {"knob": {"steps": 3, "width": 8}}})):
        assert get_preset("mine").knob == Knob(steps=3, width=16)
    monkeypatch.setitem(presets.PRESETS, "off", lambda: {**smoke(), "knob": None})
    with registry.registered(knob(presets={"off": {"knob": {"steps": 3}}})):
        assert get_preset("off").knob is None


def test_register_checks_what_a_plugin_gives():
    with pytest.raises(TypeError, match="must be a rcfd.methods.registry.Method"):
        registry.register(object())
    with pytest.raises(ValueError, match=r"section\(s\) \['data'\] of 'knob' are taken"):
        registry.register(registry.Method(name="knob", sections={"data": (Knob, Knob)},
                                          train=lambda v, r: [], describe=str))
    with pytest.raises(ValueError, match="values for \\['base'\\], which are not its sections"):
        registry.register(knob(presets={"smoke": {"base": {"steps": 1}}}))
    with pytest.raises(ValueError, match="lower-case letters"):
        registry.register(registry.Method(name="Has Space", sections={}, train=lambda v, r: [],
                                          describe=str))
    assert "knob" not in [m.name for m in registry.methods()]


def test_every_logged_term_is_plotted(tmp_path, monkeypatch):
    """Whatever a method calls its terms (and whether they go negative), each is a curve of
    the loss figure; bookkeeping is not."""
    from rcfd.report import plots
    recs = [{"step": i, "loss": 1.0 / i, "distance": 0.5 / i, "div": -0.1 * i, "zero": 0.0,
             "lr": 1e-3, "grad_norm": 2.0, "time": 0.1 * i, "skipped": False} for i in range(1, 9)]
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append(fig) or path)
    plots.plot_loss_curves({"toyplug/model": recs, "empty": [{"step": 1, "lr": 1.0}]},
                           tmp_path / "loss.png")
    (ax,), = [fig.axes for fig in figures]  # one panel: the stage with only bookkeeping has none
    assert ax.get_title() == "toyplug/model"
    assert ax.get_legend_handles_labels()[1] == ["loss", "distance", "div", "zero"]
    assert ax.get_yscale() == "symlog"  # a term below zero is drawn, not dropped
    assert [name for name, _ in plots.loss_panels({"a": recs[:1]})] == ["a"]
    only_positive = [{"step": 1, "loss": 1.0, "distance": 2.0}]
    assert plots._value_scale(plots.loss_series(only_positive))[0] == "log"
