"""rcfd.evaluation.evaluate_rows (the stage the pipeline calls) and `python -m rcfd.evaluate`
on a tiny diffusion model: the results dict, the floors, the grids, every number named."""

import json

import numpy as np
import pytest
import torch

from rcfd.io.checkpoint import load_diffusion_checkpoint, save_diffusion_checkpoint
from rcfd.cli import evaluate as cli
from rcfd.core.unet import UNet, UNetConfig
from rcfd.data import DatasetSpec, ImageDataset, load_dataset
from rcfd.distributed import DistInfo
from rcfd.errors import ConfigError, UsageError
from rcfd.evaluation import EvalSettings, References, evaluate_rows
from rcfd.evaluation.features import PixelExtractor, RandomConvExtractor
from rcfd.evaluation.stage import floor_rows
from rcfd.methods.registry import Row

SHAPE = (1, 16, 16)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=16, in_channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1,
                           num_time_indices=5, dropout=0.0))
    with torch.no_grad():  # a model whose samples depend on its input (a fresh UNet outputs ~0)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_diffusion_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", unet, T=4, time_scale=1)


@pytest.fixture(scope="module")
def references():
    train, test = load_dataset(DatasetSpec(), "train"), load_dataset(DatasetSpec(), "test")
    return References({"train": ImageDataset(train.images[:200], None, 0, "digits", "train"),
                       "test": ImageDataset(test.images[:60], None, 0, "digits", "test")})


@pytest.fixture(scope="module")
def panel(references):
    return [RandomConvExtractor(SHAPE, fit_images=references.datasets["train"].images), PixelExtractor(SHAPE)]


def _rows():
    return [Row("base", "DDIM (base model)", 4, "base", "model"), Row("base", "DDIM (base model)", 1, "base", "model"),
            Row("base", "PNDM (base model)", 4, "base", "model", sampler="pndm"),
            Row("copy", "Copy", 1, "base", "model")]


def test_evaluate_rows_results_floors_and_grids(checkpoint, references, panel, tmp_path):
    loads, said = [], []

    def load(row):
        loads.append(row.key)
        return load_diffusion_checkpoint(checkpoint)

    cfg = EvalSettings(num_samples=40, batch_size=16, extractors=("random-conv", "pixels"), primary="pixels")
    r = evaluate_rows(_rows(), load, eval_cfg=cfg, references=references, extractors=panel, seed=3,
                      progress=False, out_dir=tmp_path, teacher=("base", 4), say=said.append)
    assert loads == ["base"]  # rows of one checkpoint load it once
    assert r["extractors"] == ["random-conv", "pixels"] and r["primary"] == {"extractor": "pixels", "reference": "test"}
    assert r["num_reference"] == {"test": 60, "train": 200} and r["teacher"] == {"key": "base", "steps": 4}
    assert [(e["key"], e["steps"]) for e in r["entries"]] == [("base", 4), ("base", 1), ("base/pndm", 4), ("copy", 1)]
    e = r["entries"][1]
    assert e["fid"] == e["metrics"]["pixels"]["test"]["fid"] and e["is"] is None
    assert set(e["metrics"]["random-conv"]) == {"test", "train", "is", "is_std"}
    assert e["checkpoint"] == "base/model.safetensors" and (tmp_path / e["grid"]).is_file()
    # the same model, steps and noise under two labels: the same numbers
    assert r["entries"][3]["metrics"] == e["metrics"]
    assert (tmp_path / r["side_by_side"]).is_file()
    two = r["floors"]["two_seeds"]
    assert len(two) == 1 and two[0]["key"] == "base" and two[0]["seeds"] == [3, 3 + 1_000_003]
    m = two[0]["metrics"]["pixels"]
    assert m["fid"] > 0 and set(m["delta"]) == {"test", "train"}  # another seed: other samples
    assert r["floors"]["test_vs_train"]["metrics"]["pixels"]["fid"] > 0
    assert len(said) == 4 and all("[random-conv] vs test FID" in s and "[pixels] vs test FID" in s for s in said)
    json.dumps(r)  # plain data


def test_evaluate_rows_checks_its_settings(checkpoint, references, panel):
    def run(**kw):
        cfg = EvalSettings(**{"num_samples": 40, "primary": "pixels", **kw})
        return evaluate_rows(_rows()[:1], lambda row: load_diffusion_checkpoint(checkpoint), eval_cfg=cfg,
                             references=references, extractors=panel, progress=False)

    with pytest.raises(ConfigError, match="primary"):
        run(primary="classifier")
    with pytest.raises(ConfigError, match="floor must be one of"):
        run(floor="sometimes")
    assert [(r.key, r.steps) for r in floor_rows(_rows(), "base")] == [("base", 1)]  # the cheapest
    assert floor_rows(_rows(), "all") == _rows() and floor_rows(_rows(), "none") == []
    with pytest.raises(ConfigError, match="num_samples"):
        run(num_samples=10)
    with pytest.raises(UsageError, match="no rows"):
        evaluate_rows([], None, eval_cfg=EvalSettings(primary="pixels"), references=references, extractors=panel)
    assert EvalSettings.from_config(type("Cfg", (), {"num_samples": 99, "extractors": ["pixels"]})()) == \
        EvalSettings(num_samples=99, extractors=("pixels",))


def test_other_ranks_only_sample(checkpoint):
    loads = []

    def load(row):
        loads.append(row.key)
        return load_diffusion_checkpoint(checkpoint)

    rank1 = DistInfo(rank=1, world_size=2)  # no process group: this rank's share, nothing gathered
    r = evaluate_rows(_rows()[:2], load, eval_cfg=EvalSettings(num_samples=20), references=None, extractors=(),
                      dist=rank1, progress=False)
    assert r is None and loads == ["base"]


def test_nan_samples_are_measured_as_black_with_a_warning(references, panel):
    class Diverged(torch.nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, float("nan"))

    info = load_diffusion_checkpoint  # only its attributes are read: build a fake one
    fake = type("Info", (), {"T": 4, "time_scale": 1, "prediction": "x0",
                             "config": UNetConfig(image_size=16, in_channels=1, ch=32, ch_mult=(1,), attn=(),
                                                  num_res_blocks=1, num_time_indices=5)})()
    del info
    with pytest.warns(RuntimeWarning, match="NaN"):
        r = evaluate_rows(_rows()[1:2], lambda row: (Diverged(), fake),
                          eval_cfg=EvalSettings(num_samples=20, primary="pixels", floor="none"),
                          references=references, extractors=panel, progress=False, say=lambda s: None)
    assert np.isfinite(r["entries"][0]["fid"])


# --------------------------------------------------------------------------- the command line


def test_cli_prints_every_number_with_its_extractor(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main([str(checkpoint), "--steps", "1", "2", "--num-samples", "30", "--batch-size", "30",
                     "--extractor", "pixels", "--floor", "--json", str(out), "--no-progress", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "[pixels] vs test FID" in text and "vs train FID" in text and "noise floors" in text
    r = json.loads(out.read_text())
    assert [e["steps"] for e in r["entries"]] == [1, 2] and r["extractors"] == ["pixels"]
    assert r["num_reference"] == {"test": 300, "train": 1497} and r["sampler"] == "ddim"


def test_cli_refuses_bad_requests(checkpoint, capsys):
    assert cli.main([str(checkpoint), "--steps", "3", "--extractor", "pixels", "--device", "cpu"]) == 2
    assert "must divide" in capsys.readouterr().err
    assert cli.main([str(checkpoint), "--extractor", "classifier", "--device", "cpu"]) == 2
    assert "evaluation classifier" in capsys.readouterr().err
    assert cli.main([str(checkpoint), "--num-samples", "0", "--device", "cpu"]) == 2
