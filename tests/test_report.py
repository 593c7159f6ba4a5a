"""Report artifacts against hand-made inputs: grids, loss curves, the Table-1-shaped results
table, the FID plot and the multi-seed aggregate."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rcfd import report


def _results(fids, seed=0, extractor="classifier:densenet_small:abc123def456"):
    entries = [{"method": m, "steps": s, "fid": f, "isc_mean": 10.0 / (1 + f), "isc_std": 0.1,
                "kid_mean": f / 1000, "kid_std": 0.0, "extractor": extractor, "num_samples": 1000}
               for (m, s), f in fids.items()]
    return {"preset": "digits", "dataset": "digits", "extractor": extractor, "num_reference": 1497,
            "seeds": [seed], "distillation_classifier": "resnet18", "entries": entries,
            "timings": {"base": 12.5, "pd": 30.0}}


FIDS = {("base", 8): 40.0, ("base", 64): 5.0, ("pd", 1): 30.0, ("pd", 2): 20.0, ("pd", 4): 12.0,
        ("pd", 8): 9.0, ("rcfd", 1): 25.0, ("rcfd", 2): 15.0, ("rcfd", 4): 10.0}


@pytest.mark.parametrize("n,nrow,size,pad,scale", [(1, None, 16, 2, 1), (7, 3, 5, 0, 2), (64, None, 16, 2, 2),
                                                    (10, 4, 32, 1, 1)])
def test_grid_size_and_content(tmp_path, n, nrow, size, pad, scale):
    images = torch.rand(n, 1, size, size) * 2 - 1
    w, h = report.grid_shape(n, size, nrow, pad, scale)
    path = report.save_grid(images, tmp_path / "g.png", nrow=nrow, pad=pad, scale=scale)
    with Image.open(path) as im:
        assert im.size == (w, h) and im.mode == "L"
        arr = np.asarray(im)
    # the first image sits at (pad, pad), enlarged by scale, as uint8 levels of the input
    first = report.image_grid(images[:1], pad=0, scale=1)
    np.testing.assert_array_equal(arr[pad:pad + size * scale:scale, pad:pad + size * scale:scale], first)
    cols = min(n, nrow or math.ceil(math.sqrt(n)))
    assert w == cols * (size * scale + pad) + pad and h == math.ceil(n / cols) * (size * scale + pad) + pad


def test_grid_rgb_and_uint8_input():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    g = report.image_grid(images, nrow=5, pad=1)
    assert g.shape == (6, 26, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[1:5, 1:5], images[0].permute(1, 2, 0).numpy())


def test_grid_rejects_bad_shape():
    with pytest.raises(ValueError, match="images must be"):
        report.image_grid(torch.zeros(2, 2, 4, 4))


def test_read_jsonl_skips_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in report.read_jsonl(p)] == [1, 2]
    p.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        report.read_jsonl(p)


def test_loss_series_picks_losses_only():
    recs = [{"step": 10, "loss": 1.0, "lr": 1e-3, "cfd": 0.2, "grad_norm": 3.0, "time": 1.0},
            {"step": 20, "loss": float("nan"), "lr": 1e-3, "cfd": 0.1},
            {"step": 30, "loss": 0.5, "event": "checkpoint"}]
    s = report.loss_series(recs)
    assert set(s) == {"loss", "cfd"}
    assert s["loss"] == ([10, 30], [1.0, 0.5]) and s["cfd"] == ([10, 20], [0.2, 0.1])


def test_plot_loss_curves_writes_png(tmp_path):
    logs = {"base": [{"step": i, "loss": 1 / (i + 1)} for i in range(20)],
            "rcfd T=4": [{"step": i, "loss": 0.1, "cfd": 0.05} for i in range(5)],
            "empty": []}
    path = report.plot_loss_curves(logs, tmp_path / "loss.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert report.plot_loss_curves({}, tmp_path / "none.png").exists()


def test_results_table_shape():
    r = _results(FIDS)
    table = report.results_table(r)
    lines = table.splitlines()
    assert lines[0] == "| method | 1 step | 2 steps | 4 steps | 8 steps | 64 steps |"
    assert [l.split("|")[1].strip() for l in lines[2:]] == ["DDIM (base model)", "PD", "RCFD-resnet18"]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in lines[2:]}
    assert rows["PD"][0] == f"FID 30.00 / IS {10 / 31:.2f}"
    assert rows["RCFD-resnet18"][3] == "" and rows["DDIM (base model)"][:3] == ["", "", ""]
    assert all(len(c) == 5 for c in rows.values())


def test_extractor_note_names_extractor():
    r = _results(FIDS)
    note = report.extractor_note(r)
    assert r["extractor"] in note and "1000 samples" in note and "1497" in note
    assert "not with published" in note
    r2 = _results(FIDS, extractor="inception-v3-compat")
    assert "not with published" not in report.extractor_note(r2)


def test_format_cell_handles_missing_and_spread():
    assert report.format_cell({"fid": float("nan")}) == "FID n/a / IS n/a"
    assert report.format_cell({"fid": 1.234, "fid_seed_std": 0.5, "isc_mean": 2.0, "isc_mean_seed_std": 0.25}) \
        == "FID 1.23 ± 0.50 / IS 2.00 ± 0.25"


def test_aggregate_mean_std_over_seeds():
    runs = [_results({k: v + d for k, v in FIDS.items()}, seed=s) for s, d in enumerate((0.0, 1.0, 2.0))]
    runs[2]["entries"] = [e for e in runs[2]["entries"] if (e["method"], e["steps"]) != ("pd", 8)]
    agg = report.aggregate(runs)
    keyed = {(e["method"], e["steps"]): e for e in agg["entries"]}
    assert set(keyed) == set(FIDS) - {("pd", 8)}  # only pairs every seed has
    e = keyed[("pd", 1)]
    assert e["fid"] == pytest.approx(31.0) and e["fid_seed_std"] == pytest.approx(1.0)
    assert e["per_seed"]["fid"] == [30.0, 31.0, 32.0] and e["n_seeds"] == 3
    assert agg["seeds"] == [0, 1, 2] and agg["extractor"] == runs[0]["extractor"]
    assert "31.00 ± 1.00" in report.results_table(agg)
    single = report.aggregate(runs[:1])
    assert all(e["fid_seed_std"] == 0.0 for e in single["entries"])
    with pytest.raises(ValueError):
        report.aggregate([])


def test_paired_comparison_and_per_seed_extractors():
    fids = [{("pd", 1): 30.0, ("rcfd", 1): 25.0, ("pd", 2): 20.0, ("rcfd", 2): 21.0},
            {("pd", 1): 60.0, ("rcfd", 1): 57.0, ("pd", 2): 40.0, ("rcfd", 2): 38.0}]
    runs = [_results(f, seed=s, extractor=f"classifier:densenet_small:{s}") for s, f in enumerate(fids)]
    agg = report.aggregate(runs)
    paired = {r["steps"]: r for r in agg["paired"]}
    assert paired[1]["per_seed"] == [-5.0, -3.0] and paired[1]["rcfd_better"] == 2
    assert paired[1]["fid_diff_mean"] == pytest.approx(-4.0)
    assert paired[1]["fid_diff_std"] == pytest.approx(math.sqrt(2.0))
    assert paired[2]["per_seed"] == [1.0, -2.0] and paired[2]["rcfd_better"] == 1
    # two seeds, two evaluation classifiers: both named, and the note says to pair by seed
    assert agg["extractor"] == "per-seed extractors: classifier:densenet_small:0, classifier:densenet_small:1"
    md = report.results_markdown(agg)
    assert "| 1 | -4.000 ± 1.414 | 2 of 2 seeds | -5.000, -3.000 |" in md
    assert "mixes the extractors' scales" in md


def test_write_results_round_trips(tmp_path):
    r = _results(FIDS)
    r["entries"][0]["grid"] = "samples/base_8.png"
    paths = report.write_results(tmp_path, r)
    assert json.loads(paths["json"].read_text()) == r
    md = paths["md"].read_text()
    assert report.results_table(r) in md and r["extractor"] in md
    assert f"]({report.FID_PLOT})" in md and "samples/base_8.png" in md and "| total | 42.5 |" in md
    with Image.open(paths["fid_plot"]) as im:
        assert im.format == "PNG"


def test_entries_validated():
    with pytest.raises(ValueError, match="entries"):
        report.results_table({})
    with pytest.raises(ValueError, match="method"):
        report.results_table({"entries": [{"method": "ddpm", "steps": 1}]})
