"""Checkpoints: atomic save, safe (weights_only) load, our format, reference-format import."""

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from rcfd import checkpoint as ck
from rcfd.checkpoint import (CheckpointError, StateDictMismatchError, UnsafeCheckpointError,
                             load_checkpoint, load_classifier_state_dict,
                             load_diffusion_checkpoint, load_state_dict_strict, make_checkpoint,
                             save_checkpoint, save_diffusion_checkpoint)
from rcfd.core.unet import UNet, UNetConfig

from test_unet import read_reference_keys, scramble, small_config


def _plant_marker(path):
    """What a malicious checkpoint would run on load: here, it only creates a file."""
    with open(path, "w") as f:
        f.write("code ran")
    return {}


class _Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_plant_marker, (self.marker,))


def _outputs_equal(a, b, cfg):
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, 4, cfg.num_time_indices - 1])
    with torch.no_grad():
        return torch.equal(a.eval()(x, t), b.eval()(x, t))


def _no_temp_files(directory):
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.randn(4000), "step": 1}, path)
    return path


# ------------------------------------------------------------- save / load
def test_round_trip_keeps_every_plain_value(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    extra = {"optimizer": opt.state_dict(), "step": 7, "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate(), "lr": 2e-4, "flag": True, "none": None,
             "tags": ["a", "b"]}
    ckpt = make_checkpoint("classifier", {"arch": "linear"}, model.state_dict(), extra=extra)
    path = save_checkpoint(ckpt, tmp_path / "c.pt")
    back = load_checkpoint(path)
    assert back["format"] == "rcfd" and back["version"] == ck.VERSION
    torch.testing.assert_close(back["state_dict"], model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(back["extra"]["optimizer"]["state"], opt.state_dict()["state"],
                               rtol=0, atol=0)
    assert back["extra"]["python_rng"] == random.getstate()
    assert {k: back["extra"][k] for k in ("step", "lr", "flag", "none", "tags")} == \
        {k: extra[k] for k in ("step", "lr", "flag", "none", "tags")}
    assert _no_temp_files(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_saved_file_mode_follows_the_umask(good_file):
    mask = os.umask(0o022)
    os.umask(mask)
    assert good_file.stat().st_mode & 0o777 == 0o666 & ~mask


def test_failed_write_leaves_the_old_file_intact(good_file, monkeypatch):
    before = load_checkpoint(good_file)

    def half_written(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(3), "step": 2}, good_file)
    monkeypatch.undo()
    after = load_checkpoint(good_file)
    assert after["step"] == before["step"] and torch.equal(after["w"], before["w"])
    assert _no_temp_files(good_file.parent)


def test_unsafe_values_are_refused_before_the_file_is_touched(good_file):
    np = pytest.importorskip("numpy")
    before = good_file.read_bytes()
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['rng'\]\[1\].*numpy"):
        save_checkpoint({"extra": {"rng": (1, np.zeros(3))}}, good_file)
    with pytest.raises(TypeError, match="set"):
        save_checkpoint({"s": {1, 2}}, good_file)
    assert good_file.read_bytes() == before and _no_temp_files(good_file.parent)


def test_save_into_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint({"a": 1}, tmp_path / "nope" / "c.pt")


@pytest.mark.slow
def test_kill_during_save_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "c.pt"
    writer = textwrap.dedent(f"""
        import torch
        from rcfd.checkpoint import save_checkpoint
        i = 0
        while True:
            i += 1
            save_checkpoint({{"w": torch.full((4_000_000,), float(i)), "i": i}}, {str(path)!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for delay in (0.3, 0.7, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", writer], cwd=root)
        try:
            deadline = time.time() + 60
            while not path.exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        back = load_checkpoint(path)  # complete: the old version or the new one
        assert torch.equal(back["w"], torch.full((4_000_000,), float(back["i"])))
        path.unlink()  # the next writer's first save is awaited afresh


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_in_a_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    zipped, legacy, plain = tmp_path / "zip.pt", tmp_path / "legacy.pt", tmp_path / "plain.pkl"
    payload = {"w": torch.ones(2), "x": _Malicious(str(marker))}
    torch.save(payload, zipped)
    with open(legacy, "wb") as f:
        torch.save(payload, f, _use_new_zipfile_serialization=False)
    with open(plain, "wb") as f:
        pickle.dump(payload, f)
    for path in (zipped, legacy, plain):
        with pytest.raises(UnsafeCheckpointError, match="_plant_marker.*trust"):
            load_checkpoint(path)
        assert not marker.exists(), f"loading {path.name} ran the pickled code"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "e.pt")


@pytest.mark.parametrize("keep", [0.5, 0.99, 8 / 4096])
def test_truncated_file(good_file, keep):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(good_file)


def test_flipped_byte_fails_the_crc_check(good_file):
    data = bytearray(good_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor payload
    good_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load_checkpoint(good_file)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [bytes(random.Random(0).randrange(256) for _ in range(3000)),
                                     b"hello, not a checkpoint\n",
                                     pickle.dumps({"a": 1}, protocol=4)])
def test_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path.name)) as info:
        load_checkpoint(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


# ------------------------------------------------------------- strict state-dict loading
def test_strict_load_names_the_mismatches():
    model = UNet(small_config())
    sd = dict(model.state_dict())
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["tail.2.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(model, sd, what="teacher")
    msg = str(info.value)
    assert "teacher" in msg and "1 missing: head.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "tail.2.weight: checkpoint (3, 32, 1, 1) vs model (3, 32, 3, 3)" in msg


def test_strict_load_counts_what_it_does_not_name():
    model = UNet(small_config())
    prefixed = {"module." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match=r"and \d+ more.*strip_wrapper_prefixes"):
        load_state_dict_strict(model, prefixed, show=3)
    load_state_dict_strict(model, ck.strip_wrapper_prefixes(prefixed))


# ------------------------------------------------------------- our diffusion format
class _Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_diffusion_checkpoint_round_trip(tmp_path):
    cfg = small_config(num_classes=None, dropout=0.1)
    model, ema = scramble(UNet(cfg)), scramble(UNet(cfg))
    path = save_diffusion_checkpoint(tmp_path / "d.pt", _Wrapper(model), T=8, time_scale=2,
                                     prediction="eps", ema_model=ema, extra={"step": 3})
    loaded, info = load_diffusion_checkpoint(path)
    assert (info.T, info.time_scale, info.prediction, info.source) == (8, 2, "eps", "rcfd")
    assert info.config == cfg and info.weights == "ema_state_dict" and info.extra == {"step": 3}
    assert not loaded.training and _outputs_equal(loaded, ema, cfg)
    raw, _ = load_diffusion_checkpoint(path, use_ema=False)
    assert _outputs_equal(raw, model, cfg)


def test_diffusion_checkpoint_without_ema(tmp_path):
    cfg = small_config()
    path = save_diffusion_checkpoint(tmp_path / "d.pt", UNet(cfg), T=16, time_scale=1)
    assert load_diffusion_checkpoint(path)[1].weights == "state_dict"
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_diffusion_checkpoint(path, use_ema=True)


@pytest.mark.parametrize("change, match", [
    (dict(version=ck.VERSION + 1), "upgrade rcfd"),
    (dict(kind="classifier"), "'classifier' model, not a 'diffusion'"),
    (dict(model_config={"ch": 33}), "invalid model_config"),
    (dict(T=32), "outside the time table"),
    (dict(prediction="v"), "prediction"),
    (dict(state_dict=None), "incomplete"),
])
def test_invalid_diffusion_checkpoints(tmp_path, change, match):
    cfg = small_config()
    ckpt = make_checkpoint("diffusion", cfg.to_dict(), UNet(cfg).state_dict(), T=16,
                           time_scale=1, prediction="x0")
    torch.save({**ckpt, **change}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=match):
        load_diffusion_checkpoint(tmp_path / "d.pt")


def test_unknown_dicts_and_non_dicts(tmp_path):
    torch.save({"weights": {}, "epoch": 3}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"neither.*\['epoch', 'weights'\]"):
        load_diffusion_checkpoint(tmp_path / "a.pt")
    torch.save(torch.zeros(3), tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_diffusion_checkpoint(tmp_path / "b.pt")


@pytest.mark.parametrize("bad, match", [
    (dict(kind="vae"), "kind"), (dict(T=None), "positive integer T"),
    (dict(prediction="v"), "prediction"),
])
def test_make_checkpoint_validates(bad, match):
    args = dict(kind="diffusion", model_config={}, state_dict={}, T=8, time_scale=1, prediction="x0")
    with pytest.raises(ValueError, match=match):
        make_checkpoint(**{**args, **bad})


# ------------------------------------------------------------- reference formats
def _reference_diffusion_file(path, cfg, T, time_scale, *, prefix="", with_ema=True):
    net, ema = scramble(UNet(cfg)), scramble(UNet(cfg))
    opt = torch.optim.Adam(net.parameters())
    ckpt = {"net_model": {prefix + k: v for k, v in net.state_dict().items()},
            "optim": opt.state_dict(), "step": 10, "T": T, "time_scale": time_scale,
            "x_T": torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)}
    if with_ema:
        ckpt["ema_model"] = ema.state_dict()
    torch.save(ckpt, path)
    return net, ema, ckpt["x_T"]


@pytest.mark.parametrize("T, time_scale, expect", [(16, 1, "ema_model"), (4, 4, "net_model")])
def test_reference_diffusion_checkpoint_loads(tmp_path, T, time_scale, expect):
    cfg = small_config(dropout=0.0)
    net, ema, x_T = _reference_diffusion_file(tmp_path / "r.pt", cfg, T, time_scale)
    model, info = load_diffusion_checkpoint(tmp_path / "r.pt", image_size=cfg.image_size)
    assert (info.source, info.weights, info.T, info.time_scale) == ("reference", expect, T, time_scale)
    assert info.config == cfg and info.prediction == "x0"
    assert torch.equal(info.extra["x_T"], x_T) and info.extra["step"] == 10
    assert _outputs_equal(model, ema if expect == "ema_model" else net, cfg)


def test_reference_checkpoint_with_wrapper_prefix_and_no_ema(tmp_path):
    cfg = small_config(dropout=0.0)
    net, _, _ = _reference_diffusion_file(tmp_path / "r.pt", cfg, 16, 1, prefix="module.",
                                          with_ema=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = load_diffusion_checkpoint(tmp_path / "r.pt", image_size=cfg.image_size)
    assert any("using 'net_model'" in str(w.message) for w in caught)
    assert info.weights == "net_model" and _outputs_equal(model, net, cfg)


def test_reference_cifar10_checkpoint_from_the_key_list(tmp_path):
    """A checkpoint written from the reference key list alone loads into the CIFAR-10 U-Net."""
    rows, _ = read_reference_keys()
    sd = {k: torch.randn(s) for k, s in rows}
    torch.save({"net_model": sd, "T": 8, "time_scale": 128, "x_T": torch.randn(1, 3, 32, 32)},
               tmp_path / "cifar.pt")
    model, info = load_diffusion_checkpoint(tmp_path / "cifar.pt")
    assert info.config == UNetConfig.cifar10(dropout=0.0) and info.weights == "net_model"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_classifier_checkpoints(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.save({"model": net.state_dict(), "acc": 95.1}, tmp_path / "ref.pt")
    sd, cfg = load_classifier_state_dict(tmp_path / "ref.pt")
    assert cfg == {} and sd.keys() == net.state_dict().keys()
    ours = make_checkpoint("classifier", {"arch": "resnet18"}, net.state_dict())
    save_checkpoint(ours, tmp_path / "ours.pt")
    sd, cfg = load_classifier_state_dict(tmp_path / "ours.pt")
    assert cfg == {"arch": "resnet18"} and torch.equal(sd["0.weight"], net[0].weight)
    torch.save({"net_model": {}}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_classifier_state_dict(tmp_path / "wrong.pt")
    save_diffusion_checkpoint(tmp_path / "diff.pt", UNet(small_config()), T=16, time_scale=1)
    with pytest.raises(CheckpointError, match="'diffusion' model, not a 'classifier'"):
        load_classifier_state_dict(tmp_path / "diff.pt")
