"""`python -m rcfd.report`: the study of finished seed runs, written from their results alone,
is the committed study to every byte (the re-run's interim six-seed aggregate, written by
rcfd.report.study.write_study); seeds that are not one study, a missing or malformed file,
and a missing or disagreeing platform are one line `error: ...`, exit 2, and nothing written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rcfd.__main__ import main as rcfd_main
from rcfd.cli import report
from test_cli_errors import one_line_error

RERUN = Path(__file__).resolve().parent.parent / "docs" / "results" / "digits-study-rerun"
SEEDS = (0, 1, 2, 5, 6, 7)
INTERIM = RERUN / "interim-6-seeds"
# The record the interim aggregate was written with (its README's snippet).
PLATFORM = {"rcfd": "0.1.0", "commit": "f23a170a9f7b", "torch": "2.14.1+cu130", "python": "3.11.7",
            "device": "cpu", "device_name": "AMD EPYC", "threads": 1, "machine": "x86_64"}


@pytest.fixture()
def seeds(tmp_path):
    """The six committed seeds' results.json and config.json, laid out as in the re-run's folder."""
    for s in SEEDS:
        d = tmp_path / f"seed{s}"
        d.mkdir()
        for name in ("results.json", "config.json"):
            shutil.copy(RERUN / f"seed{s}" / name, d / name)
    (tmp_path / "platform.json").write_text(json.dumps(PLATFORM))
    return tmp_path


def run(seeds, dirs, *extra):
    return report.main([*(str(seeds / f"seed{s}") for s in dirs), "--out", str(seeds / "study"), *extra])


def edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_it_writes_the_committed_study_again(seeds):
    assert run(seeds, SEEDS, "--platform", str(seeds / "platform.json")) == 0
    for name in ("study.json", "study.md", "per_seed.csv"):
        assert (seeds / "study" / name).read_text() == (INTERIM / name).read_text(), name
    assert (seeds / "study" / "paired_differences.png").stat().st_size > 0


def test_a_recorded_platform_needs_no_file(seeds):
    for s in SEEDS:  # as results.json records it from now on
        edit(seeds / f"seed{s}" / "results.json", lambda r: r.update(platform=PLATFORM))
    assert run(seeds, SEEDS[:3]) == 0
    summary = json.loads((seeds / "study" / "study.json").read_text())
    assert summary["platform"] == PLATFORM and summary["commit"] == "f23a170a9f7b"
    assert summary["seeds"] == [0, 1, 2]


def test_results_without_a_platform_need_the_file(seeds, capsys):
    code = run(seeds, SEEDS[:2])
    one_line_error(capsys, code, 2, "does not record its platform", "--platform")
    assert not (seeds / "study").exists()


def test_a_platform_file_cannot_override_recorded_ones(seeds, capsys):
    edit(seeds / "seed0" / "results.json", lambda r: r.update(platform=PLATFORM))
    code = run(seeds, SEEDS[:2], "--platform", str(seeds / "platform.json"))
    one_line_error(capsys, code, 2, "leave --platform out")


@pytest.mark.parametrize("key, value", [("threads", 2), ("commit", "0123456789ab"), ("torch", "2.11.0")])
def test_seeds_of_other_platforms_are_refused(seeds, capsys, key, value):
    edit(seeds / "seed0" / "results.json", lambda r: r.update(platform=PLATFORM))
    edit(seeds / "seed1" / "results.json", lambda r: r.update(platform={**PLATFORM, key: value}))
    code = run(seeds, SEEDS[:2])
    one_line_error(capsys, code, 2, "another platform", key)
    assert not (seeds / "study").exists()


def test_the_cpu_model_name_may_differ(seeds):
    edit(seeds / "seed0" / "results.json", lambda r: r.update(platform=PLATFORM))
    edit(seeds / "seed1" / "results.json", lambda r: r.update(platform={**PLATFORM, "device_name": "AMD EPYC 9B14"}))
    assert run(seeds, SEEDS[:2]) == 0


@pytest.mark.parametrize("key, value", [("eval.num_samples", 500), ("threads", 2), ("base.steps", 10)])
def test_configs_that_differ_beyond_the_seed_are_refused(seeds, capsys, key, value):
    section, _, field = key.rpartition(".")
    edit(seeds / "seed1" / "config.json",
         lambda c: (c[section] if section else c).update({field: value}))
    code = run(seeds, SEEDS[:3], "--platform", str(seeds / "platform.json"))
    one_line_error(capsys, code, 2, "is not a seed of the study", (section or field))
    assert not (seeds / "study").exists()


def test_a_seed_given_twice_is_refused(seeds, capsys):
    code = run(seeds, (0, 1, 0), "--platform", str(seeds / "platform.json"))
    one_line_error(capsys, code, 2, "seed 0 is given twice")


def test_results_and_config_of_different_seeds_are_refused(seeds, capsys):
    shutil.copy(seeds / "seed2" / "results.json", seeds / "seed1" / "results.json")
    code = run(seeds, (0, 1), "--platform", str(seeds / "platform.json"))
    one_line_error(capsys, code, 2, "results.json is of seed 2 but config.json of seed 1")


def test_a_folder_without_results_is_refused(seeds, capsys):
    (seeds / "seed1" / "results.json").unlink()
    code = run(seeds, (0, 1), "--platform", str(seeds / "platform.json"))
    one_line_error(capsys, code, 2, "seed1", "results.json does not exist")


def test_malformed_results_are_refused_with_their_path(seeds, capsys):
    edit(seeds / "seed1" / "results.json", lambda r: r.pop("entries"))
    code = run(seeds, (0, 1), "--platform", str(seeds / "platform.json"))
    one_line_error(capsys, code, 2, "seed1", "entries")


@pytest.mark.parametrize("content", ["[1, 2]", "not json"])
def test_a_bad_platform_file_is_refused(seeds, capsys, content):
    (seeds / "platform.json").write_text(content)
    code = run(seeds, (0, 1), "--platform", str(seeds / "platform.json"))
    one_line_error(capsys, code, 2, "platform")


def test_both_entry_points_run_it(seeds):
    """`python -m rcfd.report` and `python -m rcfd report` are this command."""
    for cmd in (["-m", "rcfd.report"], ["-m", "rcfd", "report"]):
        done = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "SEED_DIR" in done.stdout, done.stderr
    assert rcfd_main(["report", str(seeds / "seed0"), str(seeds / "seed1"), "--out", str(seeds / "s"),
                      "--platform", str(seeds / "platform.json")]) == 0
    assert (seeds / "s" / "study.md").is_file()
