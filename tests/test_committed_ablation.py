"""The committed one-round ablation (docs/results/digits-ablation) says what its files hold: each
budget's study is what `python -m rcfd.report` writes from its seeds' results, byte for byte, and
the claims its README makes about the seeds hold on the committed numbers: a budget-1 seed is the
default re-run's 4-step column of the same seed, bit for bit, and a 10x seed shares the budget-1
seed's base model, teacher and classifiers."""

import json
import shutil
from pathlib import Path

import pytest

from rcfd.cli import report

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
ABLATION = RESULTS / "digits-ablation"
RERUN = RESULTS / "digits-study-rerun"
SEEDS = (0, 1, 2, 5, 6, 7)
BUDGETS = ("budget-1", "budget-10x")


def results(folder, seed):
    return json.loads((folder / f"seed{seed}" / "results.json").read_text())


def rows(r):
    return {(e["key"], e["steps"]): e["metrics"] for e in r["entries"]}


@pytest.mark.parametrize("budget", BUDGETS)
def test_each_study_is_written_again_from_its_seeds(tmp_path, budget):
    # copies, laid out as in the folder: study.json names its runs relative to the study
    for s in SEEDS:
        (tmp_path / f"seed{s}").mkdir()
        for name in ("results.json", "config.json"):
            shutil.copy(ABLATION / budget / f"seed{s}" / name, tmp_path / f"seed{s}" / name)
    assert report.main([*(str(tmp_path / f"seed{s}") for s in SEEDS), "--out", str(tmp_path / "study")]) == 0
    for name in ("study.json", "study.md", "per_seed.csv"):
        assert (tmp_path / "study" / name).read_text() == (ABLATION / budget / "study" / name).read_text(), name


@pytest.mark.parametrize("seed", SEEDS)
def test_budget_1_is_the_default_studys_4_step_column(seed):
    ablation, rerun = results(ABLATION / "budget-1", seed), results(RERUN, seed)
    mine, theirs = rows(ablation), rows(rerun)
    assert set(mine) == {("pd", 4), ("rcfd", 4), ("cfd", 4), ("base", 4), ("base", 64)}
    for key in mine:
        assert mine[key] == theirs[key], key
    assert ablation["classifiers"] == rerun["classifiers"]
    four = [row for row in rerun["diagnostics"]["rows"] if row["T"] == 4]
    assert ablation["diagnostics"]["rows"] == four


@pytest.mark.parametrize("seed", SEEDS)
def test_10x_shares_the_budget_1_base_teacher_and_classifiers(seed):
    ten, one = results(ABLATION / "budget-10x", seed), results(ABLATION / "budget-1", seed)
    assert ten["preset"] == "digits-ablation-10x" and one["preset"] == "digits-ablation"
    for key in (("base", 4), ("base", 64)):
        assert rows(ten)[key] == rows(one)[key], key
    assert ten["classifiers"] == one["classifiers"]
    assert [r["teacher"] for r in ten["diagnostics"]["rows"]] == [r["teacher"] for r in one["diagnostics"]["rows"]]
    assert ten["diagnostics"]["draws"] == one["diagnostics"]["draws"]
    # and the students are not the same: the 10x rounds trained ten times as long
    assert rows(ten)[("pd", 4)] != rows(one)[("pd", 4)]
