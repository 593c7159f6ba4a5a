"""Checkpoints: atomic save, safe (weights_only) load, our format, reference-format import."""

import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from rcfd.io import checkpoint as ck
from rcfd.io.checkpoint import (CheckpointError, StateDictMismatchError, UnsafeCheckpointError,
                             load_checkpoint, load_classifier_state_dict,
                             load_diffusion_checkpoint, load_state_dict_strict, make_checkpoint,
                             save_checkpoint, save_diffusion_checkpoint)
from rcfd.core.classifiers import ClassifierConfig, build as build_classifier
from rcfd.core.unet import UNet, UNetConfig
from rcfd.evaluation.measure import dataset_spec_for

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
        from rcfd.io.checkpoint import save_checkpoint
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
    (dict(prediction="velocity"), "prediction"),
    (dict(schedule={"kind": "linear"}), "field 'schedule'"),
    (dict(schedule={"kind": "diffusers", "alphas_cumprod": [0.9, 1.5], "grid": 16}), "schedule"),
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
    (dict(prediction="velocity"), "prediction"),
    (dict(schedule={"kind": "linear"}), "invalid noise schedule"),
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
    config = ClassifierConfig(name="resnet18", width=4, in_channels=1)
    real = build_classifier(config)
    save_checkpoint(make_checkpoint("classifier", config.to_dict(), real.state_dict()),
                    tmp_path / "ours.pt")
    sd, cfg = load_classifier_state_dict(tmp_path / "ours.pt")
    assert cfg == config.to_dict() and torch.equal(sd["fc.weight"], real.fc.weight)
    save_checkpoint(make_checkpoint("classifier", config.to_dict(), net.state_dict()),
                    tmp_path / "other.pt")  # weights of another network: named, not loaded
    with pytest.raises(StateDictMismatchError, match=r"other.pt.*missing: conv1.weight"):
        load_classifier_state_dict(tmp_path / "other.pt")
    torch.save({"net_model": {}}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_classifier_state_dict(tmp_path / "wrong.pt")
    save_diffusion_checkpoint(tmp_path / "diff.pt", UNet(small_config()), T=16, time_scale=1)
    with pytest.raises(CheckpointError, match="'diffusion' model, not a 'classifier'"):
        load_classifier_state_dict(tmp_path / "diff.pt")


# ------------------------------------------------------------- hostile files: sizes
def _rss_growth_mib(fn):
    """Peak resident memory added while ``fn`` runs (ru_maxrss: KiB on Linux)."""
    resource = pytest.importorskip("resource")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_a_huge_model_config_is_checked_before_it_is_built(tmp_path):
    """1 KB of weights whose model_config asks for ch=4096 (~100 GB as a real UNet): the
    mismatch is named from a meta-device copy, and no memory is spent on the model."""
    cfg = small_config()
    ckpt = make_checkpoint("diffusion", {**cfg.to_dict(), "ch": 4096, "ch_mult": [1, 2]},
                           UNet(cfg).state_dict(), T=16, time_scale=1, prediction="x0")
    torch.save(ckpt, tmp_path / "d.pt")

    def load():
        with pytest.raises(StateDictMismatchError, match=r"d.pt \(state_dict\).*shape mismatch"):
            load_diffusion_checkpoint(tmp_path / "d.pt")

    assert _rss_growth_mib(load) < 200


def _broadcast_state_dict(model):
    """Every tensor of ``model``'s state dict as a stride-0 view of one value: a few bytes
    in a file, the full size once copied into a model."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


def test_broadcast_tensors_are_refused_before_the_model_is_built(tmp_path):
    with torch.device("meta"):
        big = UNet(UNetConfig(ch=1024, ch_mult=(1, 2, 2), num_res_blocks=2))  # ~1.2e9 parameters
    torch.save({"net_model": _broadcast_state_dict(big), "T": 8, "time_scale": 2},
               tmp_path / "r.pt")
    assert (tmp_path / "r.pt").stat().st_size < 1 << 20

    def load():
        with pytest.raises(StateDictMismatchError, match=r"r.pt \(net_model\).*not stored in full"):
            load_diffusion_checkpoint(tmp_path / "r.pt")

    assert _rss_growth_mib(load) < 200


def test_classifier_checkpoints_are_checked_on_the_meta_device(tmp_path):
    config = ClassifierConfig(name="resnet18", width=4096)  # ~45e9 parameters
    with torch.device("meta"):
        big = build_classifier(config)
    small = build_classifier(ClassifierConfig(name="resnet18", width=4))
    save_checkpoint(make_checkpoint("classifier", config.to_dict(), small.state_dict()),
                    tmp_path / "ours.pt")
    torch.save({"model": _broadcast_state_dict(big)}, tmp_path / "ref.pt")

    def load():
        with pytest.raises(StateDictMismatchError, match=r"ours.pt.*shape mismatch"):
            ck.load_classifier_checkpoint(tmp_path / "ours.pt")
        with pytest.raises(StateDictMismatchError, match=r"ref.pt.*not stored in full"):
            ck.load_classifier_checkpoint(tmp_path / "ref.pt", arch="resnet18")
        with pytest.raises(CheckpointError, match=r"ref.pt: .*densenet121"):
            ck.load_classifier_checkpoint(tmp_path / "ref.pt", arch="densenet121")

    assert _rss_growth_mib(load) < 200


def test_load_classifier_checkpoint_round_trips(tmp_path):
    config = ClassifierConfig(name="resnet18", width=4)
    net = scramble(build_classifier(config)).eval()
    save_checkpoint(make_checkpoint("classifier", config.to_dict(), net.state_dict()), tmp_path / "o.pt")
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "r.pt")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    ours = ck.load_classifier_checkpoint(tmp_path / "o.pt")
    ref = ck.load_classifier_checkpoint(tmp_path / "r.pt", arch="resnet18")
    with torch.no_grad():
        assert torch.equal(ours(x)[0], net(x)[0]) and not ours.training
        assert torch.equal(ref.fc.weight, net.fc.weight)  # normalisation differs: CIFAR-10's
    with pytest.raises(CheckpointError, match=r"r.pt is a reference classifier.*architecture"):
        ck.load_classifier_checkpoint(tmp_path / "r.pt")


def test_check_state_dict_names_wrong_kinds_and_non_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    sd = dict(model.state_dict())
    sd["0.weight"] = sd["0.weight"].double()  # another precision: converted, accepted
    ck.check_state_dict(model, sd)
    sd["0.bias"] = torch.zeros(3, dtype=torch.int64)
    sd["1.num_batches_tracked"] = "seven"
    with pytest.raises(StateDictMismatchError) as e:
        ck.check_state_dict(model, sd, "net")
    assert "0.bias: checkpoint torch.int64 vs model torch.float32" in str(e.value)
    assert "1.num_batches_tracked: checkpoint holds 'seven', not a tensor" in str(e.value)


def test_a_compressed_zip_that_expands_is_refused(tmp_path):
    import zipfile

    torch.save({"w": torch.zeros(2_000_000)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as z, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))
    with pytest.raises(CheckpointError, match=r"deflated.pt is a \d+-byte archive whose members expand"):
        load_checkpoint(tmp_path / "deflated.pt")


# ------------------------------------------------------------- hostile files: fields
def _reference_file(path, **fields):
    cfg = small_config(dropout=0.0)
    torch.save({"net_model": UNet(cfg).state_dict(), "ema_model": UNet(cfg).state_dict(),
                "T": 4, "time_scale": 4, **fields}, path)


@pytest.mark.parametrize("field, value", [
    ("T", "eight"), ("T", 8.0), ("T", True), ("T", -8), ("T", 0), ("T", None), ("T", [8]),
    ("time_scale", "4"), ("time_scale", 4.5), ("time_scale", False), ("time_scale", -1),
])
def test_reference_fields_are_validated(tmp_path, field, value):
    _reference_file(tmp_path / "r.pt", **{field: value})
    with pytest.raises(CheckpointError, match=rf"r.pt: field '{field}' must be a positive integer"):
        load_diffusion_checkpoint(tmp_path / "r.pt", image_size=8)


def test_reference_huge_T_is_outside_the_time_table(tmp_path):
    _reference_file(tmp_path / "r.pt", T=10**30)
    with pytest.raises(CheckpointError, match=r"r.pt: schedule index .* outside the time table"):
        load_diffusion_checkpoint(tmp_path / "r.pt", image_size=8)
    _reference_file(tmp_path / "r.pt", T=torch.tensor(4))  # an integer tensor is an integer
    assert load_diffusion_checkpoint(tmp_path / "r.pt", image_size=8)[1].T == 4
    torch.save({"net_model": {"head.weight": "weights"}, "T": 4, "time_scale": 4}, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match=r"r.pt: field 'net_model' must map names to tensors"):
        load_diffusion_checkpoint(tmp_path / "r.pt", image_size=8)


@pytest.mark.parametrize("change, match", [
    (dict(version=True), "field 'version' must be a positive integer"),
    (dict(version="1"), "field 'version'"),
    (dict(model_config=["ch", 32]), "no 'model_config' dict"),
    (dict(model_config={1: 2}), "no 'model_config' dict"),
    (dict(prediction=5), "field 'prediction' must be one of"),
    (dict(prediction=["x0"]), "field 'prediction'"),
    (dict(T="16"), "field 'T' must be a positive integer"),
    (dict(time_scale=1.0), "field 'time_scale'"),
    (dict(state_dict={"head.weight": [1.0]}), "field 'state_dict' must map names to tensors"),
    (dict(ema_state_dict={"head.weight": None}), "field 'ema_state_dict'"),
    (dict(ema_state_dict=7), "no 'ema_state_dict' dict"),
    (dict(extra=["step", 3]), "field 'extra' must be a dict"),
    (dict(extra={"data": {"name": "digits", "size": torch.ones(3)}}),
     r"field extra\['data'\].*invalid: a tensor \(3,\) at \['size'\] is not a plain JSON value"),
    (dict(extra={"data": {"name": "digits", "sizes": [1, {2: 3}]}}), r"field extra\['data'\].*key 2 in \['sizes'\]\[1\]"),
    (dict(extra={"data": "cifar10"}), r"field extra\['data'\]"),
    (dict(kind=["diffusion"]), "not a 'diffusion' one"),
])
def test_every_field_of_our_format_is_validated(tmp_path, change, match):
    cfg = small_config()
    ckpt = make_checkpoint("diffusion", cfg.to_dict(), UNet(cfg).state_dict(), T=16,
                           time_scale=1, prediction="x0", extra={"data": {"name": "digits"}})
    torch.save({**ckpt, **change}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=match) as e:
        load_diffusion_checkpoint(tmp_path / "d.pt")
    assert str(tmp_path / "d.pt") in str(e.value)


def test_a_valid_data_record_loads(tmp_path):
    cfg = small_config()
    data = {"name": "folder", "path": "imgs", "image_size": 8}
    save_diffusion_checkpoint(tmp_path / "d.pt", UNet(cfg), T=16, time_scale=1, extra={"data": data})
    info = load_diffusion_checkpoint(tmp_path / "d.pt")[1]
    assert info.extra["data"] == data
    assert dataset_spec_for(info).to_dict() == {**dataset_spec_for(info).to_dict(), **data}


def test_a_data_record_that_is_no_dataset_is_refused_where_the_dataset_is_made(tmp_path):
    """io checks only that extra['data'] is plain JSON; what it means is checked when a
    dataset is made from it, with the same clear error naming the field and the key."""
    cfg = small_config()
    save_diffusion_checkpoint(tmp_path / "d.pt", UNet(cfg), T=16, time_scale=1,
                              extra={"data": {"name": "digits", "size": 3}})
    info = load_diffusion_checkpoint(tmp_path / "d.pt")[1]  # plain JSON: loads
    with pytest.raises(CheckpointError, match=r"field extra\['data'\].*invalid.*size"):
        dataset_spec_for(info)


# ------------------------------------------------------------- refused files: no dangerous advice
_TORCH_ADVICE = re.compile(r"weights_only\W{0,3}(=|set to)\W{0,3}False", re.IGNORECASE)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_no_refusal_repeats_torchs_advice_to_disable_safe_loading(tmp_path):
    """Every load path, on malicious, garbage and foreign files (a file given as Inception
    weights is one of these): the error names the file and never suggests
    ``weights_only=False``."""
    marker = tmp_path / "marker"
    payload = {"w": torch.ones(2), "x": _Malicious(str(marker))}
    files = {"zip.pt": None, "legacy.pt": None, "plain.pkl": pickle.dumps(payload),
             "garbage.pt": bytes(random.Random(1).randrange(256) for _ in range(5000)),
             "text.pth": b"not weights\n", "inception.pth": pickle.dumps({"a": {1, 2}}, 4),
             "numpy.pt": pickle.dumps({"x": __import__("numpy").zeros(3)}, 2)}
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    torch.save(payload, tmp_path / "zip.pt")
    with open(tmp_path / "legacy.pt", "wb") as f:
        torch.save(payload, f, _use_new_zipfile_serialization=False)
    loaders = (load_checkpoint, load_diffusion_checkpoint, load_classifier_state_dict,
               lambda p: ck.load_classifier_checkpoint(p, arch="resnet18"))
    for name in files:
        for load in loaders:
            with pytest.raises(CheckpointError) as e:
                load(tmp_path / name)
            msg = str(e.value)
            assert name in msg and not _TORCH_ADVICE.search(msg), msg
            assert "weights_only" not in msg.replace("weights_only=True", ""), msg
    assert not marker.exists()


def test_torch_reason_keeps_the_cause_and_drops_the_advice():
    e = pickle.UnpicklingError(
        "Weights only load failed. This file can still be loaded, to do so you have two options, "
        "\x1b[1mdo those steps only if you trust the source of the checkpoint\x1b[0m.\n\t(1) "
        "Re-running `torch.load` with `weights_only` set to `False` will likely succeed.\n\t"
        "WeightsUnpickler error: Unsupported operand 149. Please use torch.serialization...")
    assert ck.torch_reason(e) == "UnpicklingError: Unsupported operand 149"
    assert ck.torch_reason(RuntimeError("use weights_only=False")) == "RuntimeError"


# ------------------------------------------------------------- writes the machine refuses
def test_read_only_directory_is_an_oserror_naming_the_path(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root?) can write into a read-only directory")
        with pytest.raises(OSError, match=str(ro / "c.pt")) as e:
            save_checkpoint({"a": 1}, ro / "c.pt")
        assert "Permission denied" in str(e.value) and os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)


def test_refused_temporary_file_is_an_oserror_naming_the_path(tmp_path, monkeypatch):
    """The same, simulated (running as root makes a read-only directory writable)."""
    import errno
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".c.pt.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'c.pt'}: Permission denied") as e:
        save_checkpoint({"a": 1}, tmp_path / "c.pt")
    assert e.value.errno == errno.EACCES and os.listdir(tmp_path) == []


@pytest.mark.parametrize("previous", [False, True])
def test_full_disk_leaves_no_partial_or_temporary_file(tmp_path, monkeypatch, previous):
    import errno

    path = tmp_path / "c.pt"
    if previous:
        save_checkpoint({"w": torch.ones(10), "step": 1}, path)
    real_fdopen = os.fdopen

    class FullDisk:  # accepts 64 KiB, then ENOSPC, as a nearly full disk does
        def __init__(self, f):
            self.f, self.left = f, 1 << 16

        def write(self, b):
            if len(b) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError, match=rf"cannot write {path}: No space left on device") as e:
        save_checkpoint({"w": torch.randn(100_000), "step": 2}, path)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and _no_temp_files(tmp_path)
    if previous:
        assert load_checkpoint(path)["step"] == 1
    else:
        assert not path.exists()


# ------------------------------------------------------------- stale temporary files
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_of_the_same_checkpoint_are_removed(tmp_path):
    old = time.time() - 3600
    dead, alive = _dead_pid(), os.getpid()
    names = {
        f".c.pt.pid{dead}.abcd1234.tmp": False,  # a killed writer: removed
        ".c.pt.x1y2z3_4.tmp": False,  # an older version's name, no pid: removed
        f".c.pt.pid{alive}.abcd1234.tmp": True,  # a writer still running here: kept
        f".c.pt.pid{dead}.later123.tmp": True,  # written after this save began: kept
        f".d.pt.pid{dead}.abcd1234.tmp": True,  # another checkpoint's: kept
        f".c.pt.5.pid{dead}.abcd1234.tmp": True,  # checkpoint "c.pt.5": kept
        "c.pt.abcd1234.tmp": True, "notes.tmp": True,  # not our pattern: kept
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (old, old))
    future = time.time() + 3600
    os.utime(tmp_path / f".c.pt.pid{dead}.later123.tmp", (future, future))
    save_checkpoint({"a": 1}, tmp_path / "c.pt")
    left = set(os.listdir(tmp_path))
    assert left == {n for n, keep in names.items() if keep} | {"c.pt"}
    assert ck.temp_file_pattern(tmp_path / "c.pt").fullmatch(f".c.pt.pid{alive}.abcd1234.tmp")


@pytest.mark.slow
def test_concurrent_writers_both_finish(tmp_path):
    """Two processes saving the same path at once: neither deletes the other's temporary
    file (its writer is alive), both saves succeed, the result is one of them."""
    path = tmp_path / "c.pt"
    writer = textwrap.dedent(f"""
        import sys, torch
        from rcfd.io.checkpoint import save_checkpoint
        for i in range(15):
            save_checkpoint({{"w": torch.full((300_000,), float(sys.argv[1])), "i": i}}, {str(path)!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(k)], cwd=root,
                              stderr=subprocess.PIPE) for k in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    back = load_checkpoint(path)
    assert back["i"] == 14 and back["w"][0].item() in (1.0, 2.0) and _no_temp_files(tmp_path)
