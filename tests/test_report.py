"""Report artifacts against hand-made inputs: grids, loss curves, the Table-1-shaped table over
any rows, one table per extractor, the floors, results.md/json, and the study report of a
multi-seed run with known positive, null and negative differences."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_stats import COMPARISONS, study

from rcfd.io import grids
from rcfd.io.files import read_jsonl
from rcfd.report import plots, stats
from rcfd.report import results as report
from rcfd.report import study as study_report

ROWS = [("base", "DDIM (base model)", "ddim", (1, 8, 32)), ("base/dpm-solver", "DPM-Solver++ (base)", "dpm-solver", (1, 8)),
        ("pd", "PD", "ddim", (1, 2, 4, 8)), ("rcfd", "RCFD-resnet18", "ddim", (1, 2, 4))]


def _metrics(fid, has_logits):
    ref = {"fid": fid, "kid": fid / 1000, "kid_std": 1e-4, "precision": 0.8, "recall": 0.6}
    return {"test": ref, "train": dict(ref, fid=fid - 0.5), "is": 10.0 / (1 + fid) if has_logits else None,
            "is_std": 0.1 if has_logits else None}


def _results(seed=0):
    entries = []
    for key, label, sampler, steps in ROWS:
        for s in steps:
            f = 5.0 + 10.0 / s + (1.0 if key == "pd" else 0.0)
            metrics = {"classifier": _metrics(f, True), "pixels": _metrics(2 * f, False)}
            entries.append({"method": key.split("/")[0], "label": label, "sampler": sampler, "steps": s, "key": key,
                            "metrics": metrics, "fid": f, "kid": f / 1000, "is": metrics["classifier"]["is"],
                            "grid": f"samples/{key.replace('/', '-')}_{s}steps.png", "checkpoint": "x.pt",
                            "seconds": 1.0})
    floors = {"test_vs_train": {"num": {"test": 300, "train": 1497},
                                "metrics": {"classifier": {"fid": 0.4, "kid": 1e-5, "precision": 0.9, "recall": 0.9},
                                            "pixels": {"fid": 1.3, "kid": 2e-5, "precision": 0.9, "recall": 0.8}}},
              "two_seeds": [{"key": "base", "label": "DDIM (base model)", "steps": 32, "num_samples": 2000,
                             "seeds": [seed, seed + 1_000_003],
                             "metrics": {x: {"fid": 0.05, "kid": 1e-6, "precision": 0.97, "recall": 0.97,
                                             "delta": {"test": {"fid": 0.02, "kid": 0.0},
                                                       "train": {"fid": -0.01, "kid": 0.0}}}
                                         for x in ("classifier", "pixels")}}]}
    return {"preset": "digits", "dataset": "digits", "seed": seed, "extractors": ["classifier", "pixels"],
            "extractor_details": {"classifier": "classifier:densenet_small:abc123def456", "pixels": "pixels"},
            "primary": {"extractor": "classifier", "reference": "test"}, "num_samples": 2000,
            "num_reference": {"test": 300, "train": 1497}, "teacher": {"key": "base", "steps": 32},
            "measurement": {"kid_subsets": 100, "kid_subset_size": 1000, "is_splits": 10, "pr_k": 3},
            "floors": floors, "entries": entries, "timings": {"base": 12.5, "pd": 30.0}}


# --------------------------------------------------------------------------- grids and curves


@pytest.mark.parametrize("n,nrow,size,pad,scale", [(1, None, 16, 2, 1), (7, 3, 5, 0, 2), (64, None, 16, 2, 2),
                                                    (10, 4, 32, 1, 1)])
def test_grid_size_and_content(tmp_path, n, nrow, size, pad, scale):
    images = torch.rand(n, 1, size, size) * 2 - 1
    w, h = grids.grid_shape(n, size, nrow, pad, scale)
    path = grids.save_grid(images, tmp_path / "g.png", nrow=nrow, pad=pad, scale=scale)
    with Image.open(path) as im:
        assert im.size == (w, h) and im.mode == "L"
        arr = np.asarray(im)
    first = grids.image_grid(images[:1], pad=0, scale=1)
    np.testing.assert_array_equal(arr[pad:pad + size * scale:scale, pad:pad + size * scale:scale], first)
    cols = min(n, nrow or math.ceil(math.sqrt(n)))
    assert w == cols * (size * scale + pad) + pad and h == math.ceil(n / cols) * (size * scale + pad) + pad


def test_grid_rgb_uint8_and_bad_shape():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    g = grids.image_grid(images, nrow=5, pad=1)
    assert g.shape == (6, 26, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[1:5, 1:5], images[0].permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="images must be"):
        grids.image_grid(torch.zeros(2, 2, 4, 4))


def test_read_jsonl_and_loss_series(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]  # a torn last line is skipped
    p.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)
    recs = [{"step": 10, "loss": 1.0, "lr": 1e-3, "cfd": 0.2}, {"step": 20, "loss": float("nan"), "cfd": 0.1}]
    assert plots.loss_series(recs) == {"loss": ([10], [1.0]), "cfd": ([10, 20], [0.2, 0.1])}


def test_figures_are_pngs(tmp_path):
    logs = {"base": [{"step": i, "loss": 1 / (i + 1)} for i in range(60)], "empty": []}
    cells = {(k, label, s): torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
             for k, label, _, steps in ROWS for s in steps}
    paths = [plots.plot_loss_curves(logs, tmp_path / "loss.png"), plots.plot_loss_curves({}, tmp_path / "none.png"),
             plots.save_sample_table(cells, tmp_path / "side.png"),
             plots.plot_metric_vs_steps(report.fid_series(_results()), tmp_path / "fid.png")]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(ValueError, match="no samples"):
        plots.save_sample_table({}, tmp_path / "x.png")


# --------------------------------------------------------------------------- results.md


def _table(text):
    lines = text.splitlines()
    return lines[0], {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in lines[2:]}


def test_results_table_is_generic_over_rows():
    r = _results()
    head, rows = _table(report.results_table(r))
    assert head == "| method | 1 step | 2 steps | 4 steps | 8 steps | 32 steps |"
    assert list(rows) == [label for _, label, _, _ in ROWS]  # every row, in the order given
    pd1 = next(e for e in r["entries"] if e["key"] == "pd" and e["steps"] == 1)
    assert rows["PD"][0] == f"FID {pd1['fid']:.2f} / IS {pd1['is']:.2f}"
    assert rows["RCFD-resnet18"][3:] == ["", ""] and rows["DPM-Solver++ (base)"][1:3] == ["", ""]
    assert rows["DDIM (base model)"][4].endswith("(teacher)") and "(teacher)" not in rows["PD"][3]


def test_extractor_and_floor_tables():
    r = _results()
    head, _ = _table(report.extractor_table(r, "pixels"))
    assert head.startswith("| row | steps | FID (test) | KID (test) | P (test) | R (test) | FID (train)")
    assert "IS" not in head  # pixels have no logits
    assert report.extractor_table(r, "classifier").splitlines()[0].endswith("| IS |")
    assert len(report.extractor_table(r, "pixels").splitlines()) == 2 + len(r["entries"])  # a line per entry
    floors = report.floors_table(r)
    assert "| `classifier` | 0.400 | 1e-05 | 0.900 | 0.900 | 0.050 | 1e-06 | 0.020 | -0.010 |" in floors
    assert report.floors_table({**r, "floors": {}}) == ""


def test_results_markdown_names_everything(tmp_path):
    r = _results()
    r["side_by_side"] = "samples/side_by_side.png"
    paths = report.write_results(tmp_path, r)
    assert json.loads(paths["json"].read_text()) == r
    md = paths["md"].read_text()
    for piece in (report.results_table(r), report.extractor_table(r, "pixels"), report.floors_table(r),
                  "classifier:densenet_small:abc123def456", "test (300 images), train (1497 images)",
                  f"]({report.FID_PLOT})", "samples/side_by_side.png", "samples/pd_1steps.png", "| total | 42.5 |",
                  "None of these numbers compares with published Inception FIDs"):
        assert piece in md, piece
    with Image.open(paths["fid_plot"]) as im:
        assert im.format == "PNG"


def _diagnostics():
    row = {"key": "rcfd", "label": "RCFD-resnet18", "checkpoint": "rcfd/T4.pt", "teacher_checkpoint": "pd/T8.pt",
           "T": 4, "teacher_T": 8, "draws": "0123456789abcdef", "student": {"pd": 0.0019, "cfd": 0.0045},
           "teacher": {"pd": 0.0043, "cfd": 0.0204}}
    return {"num_samples": 300, "split": "test", "seed": 0, "draws": "0123456789abcdef",
            "classifier": "classifier/distill.pt", "loss": {"tau": 0.95, "kl_on": "features", "pd_kind": "both"},
            "rows": [row, dict(row, key="pd", label="PD", student={"pd": 0.0006, "cfd": 0.0049})], "seconds": 4.2}


def test_objective_diagnostics_section(tmp_path):
    """Each student's PD and CFD losses next to its teacher's, with the draws and the
    classifier named; results without diagnostics (older runs) have no section."""
    r = {**_results(), "diagnostics": _diagnostics()}
    md = report.write_results(tmp_path, r)["md"].read_text()
    table = report.diagnostics_table(report.check_results(r).diagnostics)
    assert "## Objective diagnostics" in md and table in md
    lines = [line for line in table.splitlines() if line.startswith("| RCFD") or line.startswith("| PD")]
    assert lines == ["| RCFD-resnet18 | 4 | pd/T8.pt | 0.0019 | 0.0043 | 0.0045 | 0.0204 |",
                     "| PD | 4 | pd/T8.pt | 0.0006 | 0.0043 | 0.0049 | 0.0204 |"]
    for piece in ("300 held-out draws", "`0123456789abcdef`", "`classifier/distill.pt`", "tau 0.95"):
        assert piece in table, piece
    assert "Objective diagnostics" not in report.results_markdown(_results())
    assert report.diagnostics_table(None) == ""
    bad = {**r, "diagnostics": {**_diagnostics(), "rows": [{"key": "pd"}]}}
    with pytest.raises(ValueError, match=r"diagnostics\.rows\[0\]"):
        report.check_results(bad)


def test_results_validated():
    with pytest.raises(ValueError, match="entries"):
        report.results_table({})
    with pytest.raises(ValueError, match="extractors"):
        report.results_table({"entries": []})
    bad = {**_results(), "entries": [{"key": "x", "label": "X", "steps": "1", "metrics": {}}]}
    with pytest.raises(ValueError, match=r"entries\[0\]\.steps: Input should be a valid integer"):
        report.results_table(bad)


# --------------------------------------------------------------------------- the study


def test_study_report_reads_the_numbers(tmp_path):
    per_seed = [{**r, "run_dir": str(tmp_path / f"seed{k}")} for k, r in enumerate(study())]
    paths = study_report.write_study(tmp_path, per_seed, COMPARISONS, commit="abc1234",
                                     platform={"cpu": "Test CPU", "threads": 2, "torch": torch.__version__})
    md = paths["md"].read_text()
    assert "Commit `abc1234`" in md and "Test CPU" in md and "threads 2" in md
    assert "Under `a` (FID against test, 10 seeds), RCFD vs PD: better at 1 and 2 steps." in md
    assert "Under `a` (FID against test, 10 seeds), CFD vs PD: no difference shown at 1 and 2 steps." in md
    assert "Under `b` (FID against test, 10 seeds), Slow vs PD: worse at 1 and 2 steps." in md
    assert "**The extractors disagree** on RCFD vs PD at 1 step (in opposite directions)" in md
    assert "FID and KID disagree on RCFD vs PD" in md and "after the Holm-Bonferroni correction" in md
    assert "| p (t) | p (t, Holm) | p (Wilcoxon) | p (Wilcoxon, Holm) |" in md
    assert "(teacher: upper bound)" in md and "## Paired differences: FID against train" in md
    summary = json.loads(paths["json"].read_text())
    assert summary["seeds"] == list(range(10)) and summary["commit"] == "abc1234"
    assert summary["runs"] == [f"seed{k}" for k in range(10)] and str(tmp_path) not in md
    assert "references 300 test / 1497 train images" in md
    assert stats.FAMILIES_TEXT in md
    section = md.split("## Conclusions")[1].split("![")[0]
    assert summary["conclusions"] == [l[2:] for l in section.splitlines() if l.startswith("- ")]
    assert "- RCFD vs PD by extractor family (FID against test, 10 seeds): under classifier features (`a`, `b`)" in md
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    measured = sum(ref in m for r in per_seed for e in r["entries"] for m in e["metrics"].values()
                   for ref in ("test", "train"))
    assert len(rows) == measured == 420  # (10 cells x 2 references + 1 x 1) x 2 extractors x 10 seeds
    first = per_seed[0]["entries"][0]
    assert float(rows[0]["fid"]) == first["metrics"]["a"]["test"]["fid"] and rows[0]["seed"] == "0"
    for key in ("paired_plot", "fid_plot"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG"
    with pytest.raises(ValueError, match="at least one seed"):
        study_report.write_study(tmp_path, [], COMPARISONS, commit="x", platform={})


def test_paired_table_prints_raw_and_holm_p():
    base = {"method": "rcfd", "baseline": "pd", "method_label": "RCFD", "baseline_label": "PD", "metric": "fid",
            "reference": "test", "mean": -1.0, "ci_low": -1.5, "ci_high": -0.5, "p_t": 0.03, "p_wilcoxon": 0.02,
            "method_better_in": 9, "n": 10}
    rows = stats.adjust_rows([dict(base, extractor="a", steps=1), dict(base, extractor="a", steps=2)])
    table = study_report.paired_table(rows, "fid", "test").splitlines()
    assert len(table) == 4 and all(line.count("|") == 12 for line in table)
    assert table[2] == ("| RCFD − PD | `a` | 1 | -1.000 | [-1.500, -0.500] | 0.03 | 0.06 | 0.02 | 0.04 | 9 of 10 "
                        "| no difference shown (unadjusted: better) |")
