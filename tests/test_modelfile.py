"""Model checkpoints as safetensors: the encoding of a checkpoint dict, loading either format
by content (our older .pt files and the reference code's keep loading to identical weights),
damaged files refused with one line, and run directories of earlier versions still found."""

import json
import struct

import pytest
import torch

from rcfd import load as rcfd_load
from rcfd.cli import sample
from rcfd.core.classifiers import ClassifierConfig, build as build_classifier
from rcfd.core.unet import UNet
from rcfd.errors import CheckpointError, StageExistsError
from rcfd.io import modelfile as mf
from rcfd.io.checkpoint import (load_checkpoint, load_classifier_checkpoint, load_diffusion_checkpoint,
                                make_checkpoint, save_checkpoint, save_diffusion_checkpoint)
from rcfd.io.safetensors import is_safetensors_file, read_safetensors, save_safetensors
from rcfd.training.rundir import (RunContext, checkpoint_path, legacy_checkpoint_path,
                                  new_checkpoint_path, unit_done, unit_files)

from test_cli_errors import one_line_error
from test_unet import scramble, small_config

safe_open = pytest.importorskip("safetensors").safe_open


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0)
    return cfg, scramble(UNet(cfg)), scramble(UNet(cfg))


def _same_state(a, b):
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip_is_exact(tmp_path, nets):
    cfg, net, ema = nets
    x_T = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    extra = {"stage": "pd", "finished": True, "x_T": x_T, "accuracy": 0.1 + 0.2,
             "nested": {"a.b": torch.arange(3), "list": [1, (2, 3), None, torch.ones(0)]},
             "a": {"b": torch.zeros(1)}, "data": {"name": "digits", "split": "train"},
             "inf": float("inf")}
    ckpt = make_checkpoint("diffusion", cfg.to_dict(), net.state_dict(),
                           ema_state_dict=ema.state_dict(), T=4, time_scale=4, prediction="x0",
                           extra=extra)
    path = mf.save_model_checkpoint(ckpt, tmp_path / "m.safetensors")
    back = mf.load_model_file(path)
    assert list(back) == list(ckpt)
    _same_state(back["state_dict"], ckpt["state_dict"])
    _same_state(back["ema_state_dict"], ckpt["ema_state_dict"])
    for k in ("format", "version", "kind", "model_config", "T", "time_scale", "prediction"):
        assert back[k] == ckpt[k] and type(back[k]) is type(ckpt[k]), k
    e = back["extra"]
    assert torch.equal(e["x_T"], x_T) and e["x_T"].dtype == torch.float64
    assert e["accuracy"] == 0.1 + 0.2 and e["inf"] == float("inf") and e["data"] == extra["data"]
    assert torch.equal(e["nested"]["a.b"], torch.arange(3)) and torch.equal(e["a"]["b"], torch.zeros(1))
    assert e["nested"]["list"][:3] == [1, [2, 3], None]  # tuples come back as lists
    assert e["nested"]["list"][3].shape == (0,)


def test_layout_is_readable_by_the_safetensors_package(tmp_path, nets):
    cfg, net, _ = nets
    path = save_diffusion_checkpoint(tmp_path / "m.safetensors", net, T=4, time_scale=4)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("state_dict.head.weight").shape == net.state_dict()["head.weight"].shape
    assert meta["__rcfd__"] == "1" and json.loads(meta["kind"]) == "diffusion"
    assert json.loads(meta["ema_state_dict"]) is None and json.loads(meta["T"]) == 4


def test_a_new_field_needs_no_change(tmp_path):
    """Any JSON-and-tensors field is carried (e.g. a schedule record added to the format)."""
    ckpt = {"format": "rcfd", "schedule": {"kind": "cosine", "alpha": torch.linspace(1, 0, 5)}}
    back = mf.load_model_file(mf.save_model_checkpoint(ckpt, tmp_path / "s.safetensors"))
    assert back["schedule"]["kind"] == "cosine"
    assert torch.equal(back["schedule"]["alpha"], ckpt["schedule"]["alpha"])


@pytest.mark.parametrize("bad, message", [
    ({"extra": {"p": object()}}, r"checkpoint\['extra'\]\['p'\] is a builtins.object"),
    ({"extra": {1: "x"}}, "key 1 must be a str"),
    ({"extra": {"__tensor__": "x"}}, "reserved"),
    ({"__rcfd__": 1}, "must be a str other than"),
])
def test_values_a_safetensors_checkpoint_cannot_hold_are_refused_before_writing(tmp_path, bad, message):
    with pytest.raises(TypeError, match=message):
        mf.save_model_checkpoint(bad, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        mf.save_model_checkpoint({"a": 1}, tmp_path / "missing" / "x.safetensors")


def test_our_old_pt_checkpoints_load_to_identical_weights(tmp_path, nets):
    """A .pt of the earlier format (torch.save of the same dict) and the new file: same model."""
    cfg, net, ema = nets
    ckpt = make_checkpoint("diffusion", cfg.to_dict(), net.state_dict(), ema_state_dict=ema.state_dict(),
                           T=4, time_scale=4, prediction="x0", extra={"x_T": torch.randn(1, 3, 8, 8)})
    old = save_checkpoint(ckpt, tmp_path / "old.pt")
    new = save_diffusion_checkpoint(tmp_path / "new.safetensors", net, T=4, time_scale=4, ema_model=ema,
                                    extra={"x_T": ckpt["extra"]["x_T"]})
    assert not is_safetensors_file(old) and is_safetensors_file(new)
    for use_ema in (None, False):
        (m_old, i_old), (m_new, i_new) = (load_diffusion_checkpoint(p, use_ema=use_ema) for p in (old, new))
        _same_state(m_old.state_dict(), m_new.state_dict())
        assert (i_old.T, i_old.time_scale, i_old.weights, i_old.config) == \
            (i_new.T, i_new.time_scale, i_new.weights, i_new.config)
        assert torch.equal(i_old.extra["x_T"], i_new.extra["x_T"])
    _same_state(rcfd_load(old).net.state_dict(), rcfd_load(new).net.state_dict())


def test_classifier_checkpoints_in_both_formats(tmp_path):
    cfg = ClassifierConfig(name="densenet_small", in_channels=1, width=8)
    torch.manual_seed(1)
    ckpt = make_checkpoint("classifier", cfg.to_dict(), build_classifier(cfg).state_dict(),
                           extra={"role": "eval", "accuracy": 0.5})
    old = save_checkpoint(ckpt, tmp_path / "eval.pt")
    new = mf.save_model_checkpoint(ckpt, tmp_path / "eval.safetensors")
    _same_state(load_classifier_checkpoint(old).state_dict(), load_classifier_checkpoint(new).state_dict())
    named_pt = mf.save_model_checkpoint(ckpt, tmp_path / "renamed.pt")  # by content, not by name
    _same_state(load_classifier_checkpoint(named_pt).state_dict(), ckpt["state_dict"])


def test_a_plain_state_dict_file_is_named_for_what_it_is(tmp_path, nets):
    cfg, net, _ = nets
    path = save_safetensors(tmp_path / "weights.safetensors", net.state_dict(), {"format": "pt"})
    assert set(mf.load_model_file(path)) == set(net.state_dict())
    with pytest.raises(CheckpointError, match="neither an rcfd checkpoint nor a reference"):
        load_diffusion_checkpoint(path)


def _rewrite_metadata(path, change):
    """The file's tensors with ``change(metadata)`` as its metadata (a consistent file)."""
    tensors, meta = read_safetensors(path)
    change(tensors, meta)
    save_safetensors(path, tensors, meta)


@pytest.mark.parametrize("change, message", [
    (lambda t, m: m.update(__rcfd__="2"), "encoding '2'; this rcfd reads '1'"),
    (lambda t, m: m.update(T="{not json"), "field 'T' is invalid"),
    (lambda t, m: m.update(extra='{"x": {"__tensor__": "gone"}}'), "tensor 'gone', which the file"),
    (lambda t, m: m.update(extra='{"x": {"__tensor__": "state_dict.head.bias"}}'), "used twice"),
    (lambda t, m: t.update(stray=torch.ones(1)), "1 tensors no field refers to"),
    (lambda t, m: m.update(extra="[" * 100000 + "]" * 100000), "nested too deeply|invalid"),
])
def test_inconsistent_checkpoint_metadata_refused(tmp_path, nets, change, message):
    path = save_diffusion_checkpoint(tmp_path / "m.safetensors", nets[1], T=4, time_scale=4)
    _rewrite_metadata(path, change)
    with pytest.raises(CheckpointError, match=message):
        mf.load_model_file(path)


@pytest.fixture
def damaged(tmp_path, nets):
    """A good checkpoint, and a function writing a damaged copy of it."""
    good = save_diffusion_checkpoint(tmp_path / "good.safetensors", nets[1], T=4, time_scale=4)
    raw = good.read_bytes()

    def make(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path
    n = struct.unpack("<Q", raw[:8])[0]
    return {
        "oversized header": make("big.safetensors", struct.pack("<Q", 2 ** 40) + raw[8:]),
        "corrupt header": make("corrupt.safetensors", raw[:8] + b"{" + b"\xff" * (n - 1) + raw[8 + n:]),
        "truncated": make("cut.safetensors", raw[: len(raw) // 2]),
        "header over the data": make("shifted.safetensors", struct.pack("<Q", n - 8) + raw[8:]),
    }


@pytest.mark.parametrize("case", ["oversized header", "corrupt header", "truncated",
                                  "header over the data"])
def test_damaged_safetensors_is_one_line_error_exit_2(damaged, capsys, case, tmp_path):
    path = damaged[case]
    out = tmp_path / "o.png"
    code = sample.main([str(path), "--steps", "1", "--num", "2", "--out", str(out), "--device", "cpu",
                        "--no-progress"])
    one_line_error(capsys, code, 2, str(path), "not a valid safetensors file")
    assert not out.exists()


# ----------------------------------------------------------------------------- run directories
def test_run_dir_of_an_earlier_version_is_found(tmp_path, nets):
    run_dir, stage, unit = tmp_path / "run", "pd", "T4"
    (run_dir / stage).mkdir(parents=True)
    assert checkpoint_path(run_dir, stage, unit) == new_checkpoint_path(run_dir, stage, unit)
    assert new_checkpoint_path(run_dir, stage, unit).name == "T4.safetensors"
    legacy = legacy_checkpoint_path(run_dir, stage, unit)
    cfg, net, _ = nets
    save_checkpoint(make_checkpoint("diffusion", cfg.to_dict(), net.state_dict(), T=4, time_scale=4,
                                    prediction="x0"), legacy)
    assert checkpoint_path(run_dir, stage, unit) == legacy
    assert unit_done(RunContext(run_dir, resume=True), stage, unit)  # resumes as finished
    with pytest.raises(StageExistsError, match="T4.pt"):
        unit_done(RunContext(run_dir), stage, unit)
    model, _ = load_diffusion_checkpoint(checkpoint_path(run_dir, stage, unit))
    _same_state(model.state_dict(), net.state_dict())
    assert legacy in unit_files(run_dir, stage, unit)
    assert not unit_done(RunContext(run_dir, overwrite=True), stage, unit)
    assert not legacy.exists()  # overwrite removes the old name too
    new = save_diffusion_checkpoint(new_checkpoint_path(run_dir, stage, unit), net, T=4, time_scale=4)
    save_checkpoint({"x": torch.ones(1)}, legacy)
    assert checkpoint_path(run_dir, stage, unit) == new  # the new name wins when both exist


def test_the_torch_loader_reads_safetensors_with_our_checks(tmp_path, damaged):
    """``load_checkpoint`` (training state, weight files from elsewhere) never hands a
    safetensors file to ``torch.load``: ours reads it, whatever its name, with our errors."""
    plain = save_safetensors(tmp_path / "w.pt", {"a": torch.arange(3)})
    assert torch.equal(load_checkpoint(plain)["a"], torch.arange(3))
    with pytest.raises(CheckpointError, match="not a valid safetensors file.*header length"):
        load_checkpoint(damaged["oversized header"])
