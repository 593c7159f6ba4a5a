"""The command lines: `python -m rcfd.train` (config resolution, --dry-run, user errors) and
`python -m rcfd.sample` (PNG grid, .npz), on tiny hand-made checkpoints (`rcfd.evaluate`:
tests/test_evaluation_stage.py). Expected user errors exit with code 2 and one line on
stderr, without a traceback; the hostile and careless inputs of tests/test_cli_errors.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcfd.io import grids
from rcfd.report import results as report
from rcfd.io.checkpoint import load_model_file, make_checkpoint, save_checkpoint, save_diffusion_checkpoint
from rcfd.cli import evaluate, sample, train
from rcfd.core.classifiers import ClassifierConfig, build
from rcfd.core.unet import UNet, UNetConfig
from rcfd.study.config import pipeline_config_class
from rcfd.study.presets import get_preset
from test_cli_errors import one_line_error

ROOT = Path(__file__).resolve().parents[1]
T = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny 16 px one-channel diffusion model (T=4) and two different classifiers."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=16, in_channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1,
                           dropout=0.0, num_time_indices=T + 1))
    save_diffusion_checkpoint(d / "model.pt", unet, T=T, time_scale=1)
    for name, arch, seed in (("eval", "densenet_small", 1), ("distill", "resnet18", 2)):
        torch.manual_seed(seed)
        cfg = ClassifierConfig(name=arch, in_channels=1, width=8)
        save_checkpoint(make_checkpoint("classifier", cfg.to_dict(), build(cfg).state_dict()), d / f"{name}.pt")
    return d


def expect_usage_error(capsys, fn, argv, *needles):
    """An argparse usage error of ``fn(argv)``: exit 2, stderr the usage text and then one
    ``<prog>: error: ...`` line (the last) holding every needle; no traceback, none of our
    own ``error: `` lines."""
    code = fn(argv)
    err = capsys.readouterr().err
    said = err.splitlines()
    errors = [line for line in said if ": error: " in line]
    assert code == 2, err
    assert err.startswith("usage: ") and "Traceback" not in err, err
    assert len(errors) == 1 and said[-1] == errors[0], err
    assert not any(line.startswith("error: ") for line in said), err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def expect_one_line_error(capsys, fn, argv, *needles):
    """Our own user error of ``fn(argv)``: :func:`one_line_error` with exit code 2."""
    return one_line_error(capsys, fn(argv), 2, *needles)


# --------------------------------------------------------------------------- rcfd.train


def test_dry_run_round_trips(capsys):
    assert train.main(["--preset", "smoke", "--set", "base.steps=3", "--set", "rcfd.loss.tau=0.9",
                       "--seed", "5", "--device", "cpu", "--dry-run"]) == 0
    d = json.loads(capsys.readouterr().out)
    cfg = pipeline_config_class().from_dict(d)
    assert cfg.to_dict() == d
    assert (cfg.name, cfg.base.steps, cfg.rcfd.loss.tau, cfg.seed, cfg.device) == ("smoke", 3, 0.9, 5, "cpu")
    assert cfg == get_preset("smoke").with_overrides({"base.steps": 3, "rcfd.loss.tau": 0.9, "seed": 5,
                                                      "device": "cpu"})


def test_default_is_digits(capsys):
    assert train.main(["--dry-run"]) == 0
    assert pipeline_config_class().from_dict(json.loads(capsys.readouterr().out)) == get_preset("digits")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file(tmp_path, capsys, suffix):
    body = {"preset": "smoke", "base": {"steps": 7}, "eval": {"num_samples": 32}}
    path = tmp_path / f"c{suffix}"
    path.write_text(json.dumps(body))  # JSON is YAML too
    assert train.main(["--config", str(path), "--set", "pd.lr=1e-4", "--dry-run"]) == 0
    cfg = pipeline_config_class().from_dict(json.loads(capsys.readouterr().out))
    assert (cfg.name, cfg.base.steps, cfg.eval.num_samples, cfg.pd.lr) == ("smoke", 7, 32, 1e-4)


def test_bad_preset(capsys):
    expect_usage_error(capsys, train.main, ["--preset", "nope"], "invalid choice", "smoke")


def test_unknown_set_key(capsys):
    expect_one_line_error(capsys, train.main, ["--set", "base.stepz=3"], "base.stepz", "valid keys")
    expect_one_line_error(capsys, train.main, ["--set", "base.steps"], "KEY=VALUE")
    expect_one_line_error(capsys, train.main, ["--set", "base.steps=-1"], "base.steps")
    for pair, needle in (("base=5", "base: Input should be a valid dictionary"),
                         ("data=null", "data: Input should be a valid dictionary"),
                         ("base.unet=null", "base.unet: Input should be a valid dictionary"),
                         ("base.steps=true", "not true/false"),
                         ("eval.samplers=[euler]", "eval.samplers[0]")):
        expect_one_line_error(capsys, train.main, ["--dry-run", "--set", pair], needle)


def test_missing_config_file_and_bad_flags(tmp_path, capsys):
    expect_one_line_error(capsys, train.main, ["--config", str(tmp_path / "none.yaml")], "does not exist")
    expect_one_line_error(capsys, train.main, ["--resume", "--overwrite"], "pick one")
    expect_usage_error(capsys, train.main, ["--preset", "smoke", "--config", "x.yaml"], "not allowed")


def test_missing_data_path(tmp_path, capsys):
    argv = ["--preset", "smoke", "--out", str(tmp_path / "run"), "--device", "cpu",
            "--set", "data.name=cifar10", "--set", f"data.path={tmp_path / 'no-cifar'}",
            "--set", "data.image_size=16", "--set", "data.channels=1"]
    expect_one_line_error(capsys, train.main, argv, "no-cifar", "does not exist")
    assert not (tmp_path / "run" / "classifier").exists()  # failed before training anything


def test_module_entry_point_exit_code():
    """The real `python -m rcfd.train` path (a fresh interpreter): exit 2, one line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "rcfd.train", "--set", "nope=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown config key 'nope'" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1  # one line


# --------------------------------------------------------------------------- rcfd.sample


def test_sample_png_grid(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    assert sample.main([str(ckpts / "model.pt"), "--steps", "2", "--num", "10", "--out", str(out),
                        "--device", "cpu", "--no-progress"]) == 0
    with Image.open(out) as im:
        assert im.size == grids.grid_shape(10, 16, scale=grids.display_scale(16)) and im.mode == "L"


def test_sample_npz_count_shape_and_seed(ckpts, tmp_path):
    def run(name, seed, steps):
        out = tmp_path / name
        assert sample.main([str(ckpts / "model.pt"), "--steps", str(steps), "--num", "7", "--batch-size", "3",
                            "--seed", str(seed), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
        with np.load(out) as z:
            return {k: z[k] for k in z.files}

    a, b, c = run("a.npz", 0, 4), run("b.npz", 0, 4), run("c.npz", 1, 4)
    assert a["arr_0"].shape == (7, 16, 16, 1) and a["arr_0"].dtype == np.uint8
    assert (int(a["steps"]), int(a["T"]), int(a["time_scale"]), int(a["seed"])) == (4, T, 1, 0)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # same seed, same images
    assert not np.array_equal(a["arr_0"], c["arr_0"])


def test_sample_reference_format_checkpoint(ckpts, tmp_path):
    """A checkpoint in the reference implementation's layout samples like ours."""
    ours = load_model_file(ckpts / "model.pt")
    ref = tmp_path / "reference.pt"
    torch.save({"ema_model": ours["state_dict"], "T": T, "time_scale": 1, "x_T": torch.randn(2, 1, 16, 16)}, ref)
    for path, name in ((ckpts / "model.pt", "ours.npz"), (ref, "ref.npz")):
        assert sample.main([str(path), "--steps", "2", "--num", "3", "--image-size", "16", "--out",
                            str(tmp_path / name), "--device", "cpu", "--no-progress"]) == 0
    with np.load(tmp_path / "ours.npz") as a, np.load(tmp_path / "ref.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_sample_errors(ckpts, tmp_path, capsys):
    expect_one_line_error(capsys, sample.main, [str(tmp_path / "none.pt"), "--device", "cpu"], "none.pt",
                          "does not exist")
    expect_one_line_error(capsys, sample.main, [str(ckpts / "model.pt"), "--steps", "3", "--device", "cpu"], "divide")
    expect_one_line_error(capsys, sample.main, [str(ckpts / "model.pt"), "--out", "x.jpg"], ".png", ".npz")
    expect_one_line_error(capsys, sample.main, [str(ckpts / "eval.pt"), "--device", "cpu"], "classifier")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    expect_one_line_error(capsys, sample.main, [str(garbage), "--device", "cpu"], "garbage.pt")
    for bad in ("0", "-2"):  # --steps 0 is a mistake, not "the checkpoint's T"
        expect_one_line_error(capsys, sample.main, [str(ckpts / "model.pt"), "--steps", bad, "--device", "cpu"],
                              "--steps must be a positive integer")


def test_shared_flags_are_the_same_in_every_command():
    """--seed, --sampler and --no-progress come from rcfd.cli.common: the same help in every
    command, the default each command asks for (training keeps the config's seed)."""
    parsers = {"train": train.build_parser(), "sample": sample.build_parser(),
               "evaluate": evaluate.build_parser()}
    actions = {name: {a.dest: a for a in p._actions} for name, p in parsers.items()}
    assert {n: a["seed"].default for n, a in actions.items()} == {"train": None, "sample": 0, "evaluate": 0}
    helps = {a["no_progress"].help for a in actions.values()}
    assert len(helps) == 1 and None not in helps, helps  # one help text, in every command
    assert {a["seed"].help for a in actions.values()} == {"random seed (default: the config's)",
                                                          "random seed (default: 0)"}
    assert actions["sample"]["sampler"].choices == actions["evaluate"]["sampler"].choices
    assert actions["sample"]["sampler"].help == actions["evaluate"]["sampler"].help
    assert actions["sample"]["sampler"].default == actions["evaluate"]["sampler"].default == "ddim"
    assert "sampler" not in actions["train"]
    args = parsers["sample"].parse_args(["x.pt", "--seed", "7", "--no-progress", "--sampler", "pndm"])
    assert (args.seed, args.no_progress, args.sampler) == (7, True, "pndm")


def test_package_entry_point(capsys):
    from rcfd.__main__ import main as rcfd_main

    assert rcfd_main(["train", "--preset", "smoke", "--dry-run"]) == 0
    assert pipeline_config_class().from_dict(json.loads(capsys.readouterr().out)) == get_preset("smoke")
    assert rcfd_main(["nope"]) == 2 and "unknown command" in capsys.readouterr().err
    assert rcfd_main([]) == 0 and "usage" in capsys.readouterr().out


@pytest.mark.cuda
def test_sample_cuda_graph_matches_eager(ckpts, tmp_path):
    """On a GPU the sample CLI replays a captured CUDA graph; in fp32 it draws the same images
    as the eager loop (same noise), up to a rare one-level rounding change."""
    def run(name, *extra):
        out = tmp_path / name
        assert sample.main([str(ckpts / "model.pt"), "--steps", "4", "--num", "40", "--batch-size", "16",
                            "--out", str(out), "--device", "cuda", "--dtype", "fp32", "--no-progress",
                            *extra]) == 0
        with np.load(out) as z:
            return z["arr_0"].astype(np.int16)

    graph, eager = run("graph.npz"), run("eager.npz", "--no-cuda-graph")
    assert graph.shape == (40, 16, 16, 1)
    assert np.abs(graph - eager).max() <= 1 and (graph != eager).mean() < 1e-3
