"""`python -m rcfd.export`: `--to npz` writes the images `python -m rcfd.sample` writes (uint8
NHWC `arr_0`, as the TF/OpenAI evaluators read it); `--to diffusers` writes a folder whose
UNet2DModel + DDIMScheduler loop samples our DDIM images; bad input is one line `error: ...`,
exit 2, and nothing written."""

import sys

import numpy as np
import pytest
import torch

from rcfd.cli import export, sample
from rcfd.core.classifiers import ClassifierConfig, build
from rcfd.core.unet import UNet, UNetConfig
from rcfd.io.checkpoint import load_diffusion_checkpoint, make_checkpoint, save_checkpoint, save_diffusion_checkpoint
from rcfd.samplers import ddim, make_plan
from test_cli_errors import one_line_error

T = 4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny random 8 px one-channel student (T=4 on 8 indices) and a classifier."""
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), attn=(), num_res_blocks=1,
                           dropout=0.0, num_time_indices=2 * T + 1))
    with torch.no_grad():  # large enough x0 predictions that the clip matters
        for p in unet.parameters():
            if p.requires_grad:  # not the fixed sinusoidal time table
                p.add_(0.05 * torch.randn_like(p))
    save_diffusion_checkpoint(d / "T4.pt", unet, T=T, time_scale=2)
    cfg = ClassifierConfig(name="densenet_small", in_channels=1, width=8)
    save_checkpoint(make_checkpoint("classifier", cfg.to_dict(), build(cfg).state_dict()), d / "clf.pt")
    return d


CPU = ["--device", "cpu", "--no-progress"]


def npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("steps", ["4", "2"])
def test_npz_round_trip_is_the_sample_clis_images(ckpts, tmp_path, steps):
    flags = ["--steps", steps, "--num", "7", "--batch-size", "3", "--seed", "5", *CPU]
    assert export.main([str(ckpts / "T4.pt"), str(tmp_path / "e.npz"), "--to", "npz", *flags]) == 0
    assert sample.main([str(ckpts / "T4.pt"), "--out", str(tmp_path / "s.npz"), *flags]) == 0
    ours, theirs = npz(tmp_path / "e.npz"), npz(tmp_path / "s.npz")
    x = ours["arr_0"]
    assert x.shape == (7, 8, 8, 1) and x.dtype == np.uint8
    assert x.min() < 100 < 155 < x.max()  # spans the range, not a constant image
    np.testing.assert_array_equal(x, theirs["arr_0"])
    assert (int(ours["steps"]), int(ours["T"]), int(ours["time_scale"]), int(ours["seed"])) == (int(steps), T, 2, 5)
    assert str(ours["sampler"]) == "ddim"


def test_npz_rgb_repeats_the_channel(ckpts, tmp_path):
    flags = ["--num", "5", "--seed", "1", *CPU]
    assert export.main([str(ckpts / "T4.pt"), str(tmp_path / "g.npz"), "--to", "npz", *flags]) == 0
    assert export.main([str(ckpts / "T4.pt"), str(tmp_path / "c.npz"), "--to", "npz", "--rgb", *flags]) == 0
    gray, rgb = npz(tmp_path / "g.npz")["arr_0"], npz(tmp_path / "c.npz")["arr_0"]
    assert rgb.shape == (5, 8, 8, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c:c + 1], gray)


def test_diffusers_export_samples_our_images(ckpts, tmp_path):
    pytest.importorskip("diffusers")
    from test_diffusers_export import diffusers_loop

    out = tmp_path / "student"
    assert export.main([str(ckpts / "T4.pt"), str(out), "--to", "diffusers", *CPU]) == 0
    model, info = load_diffusion_checkpoint(ckpts / "T4.pt")
    x_T = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ours = ddim(model, x_T, make_plan(None, T, info.time_scale, T, prediction=info.prediction))
    theirs, scheduler = diffusers_loop(out, x_T.clone(), T)
    assert scheduler.timesteps.tolist() == [8, 6, 4, 2]
    assert (ours.abs() == 1).any() and (ours.abs() < 1).any()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def refused(capsys, tmp_path, argv, *needles):
    """``export.main(argv)``: one line naming every needle, exit 2, ``tmp_path`` unchanged."""
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(capsys, export.main(argv), 2, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_inputs_are_refused_and_nothing_is_written(ckpts, tmp_path, capsys):
    ck, out = str(ckpts / "T4.pt"), str(tmp_path / "x.npz")
    refused(capsys, tmp_path, [str(tmp_path / "none.pt"), out, "--to", "npz", "--num", "2", *CPU],
            "none.pt", "does not exist")
    refused(capsys, tmp_path, [str(ckpts / "clf.pt"), out, "--to", "npz", "--num", "2", *CPU], "classifier")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    refused(capsys, tmp_path, [str(garbage), str(tmp_path / "d"), "--to", "diffusers", *CPU], "garbage.pt")
    for bad in ("0", "-3"):
        refused(capsys, tmp_path, [ck, out, "--to", "npz", "--num", bad, *CPU], "--num must be a positive integer")
    refused(capsys, tmp_path, [ck, out, "--to", "npz", *CPU], "--to npz needs --num")
    refused(capsys, tmp_path, [ck, str(tmp_path / "x.png"), "--to", "npz", "--num", "2", *CPU], ".npz")
    refused(capsys, tmp_path, [ck, out, "--to", "npz", "--num", "2", "--steps", "3", *CPU], "divide")
    refused(capsys, tmp_path, [ck, str(tmp_path / "d"), "--to", "diffusers", "--num", "2", *CPU],
            "--num", "--to npz only")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    refused(capsys, tmp_path, [ck, str(busy), "--to", "diffusers", *CPU], "not an empty folder")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_export_needs_no_safetensors_package(ckpts, tmp_path, monkeypatch):
    """The weights are written by our own safetensors writer: no extra needed to export."""
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = tmp_path / "d"
    assert export.main([str(ckpts / "T4.pt"), str(out), "--to", "diffusers", *CPU]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 0


def test_help_shows_examples_and_the_channel_rule(capsys):
    assert export.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "python -m rcfd.export runs/digits/rcfd/T1.safetensors --to diffusers" in text
    assert "--to npz" in text and "C = 1" in text and "--rgb" in text


def test_the_package_entry_point_knows_export(capsys):
    from rcfd.__main__ import main as rcfd_main

    assert rcfd_main(["export", "--help"]) == 0
    assert "python -m rcfd.export" in capsys.readouterr().out
