"""Hostile and careless inputs on the command lines (docs/reliability.md, "The rules"): every
user mistake ends with one line ``error: ...`` and exit code 2, a refusing machine with one
line naming the path and exit code 1, a traceback only with --debug; a refused command
changes nothing on disk; --resume continues exactly or refuses naming what changed; SIGTERM
before training stops cleanly."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcfd.io import files as atomicio
from rcfd.study import pipeline
from rcfd.cli import common, sample, train
from rcfd.errors import EnvironmentFailure, ResumeError, StageExistsError
from rcfd.study.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--no-progress", "--threads", "1",
        "--set", "distill_classifier.steps=2", "--set", "eval_classifier.steps=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, code, expected_code=2, *needles):
    """Our own one-line error (tests/test_cli.py uses it too): exit ``expected_code``, exactly
    one stderr line starting with ``error: ``, the last one, holding every needle; no
    traceback and no argparse usage text. Returns that line."""
    err = capsys.readouterr().err
    said = err.splitlines()
    lines = [line for line in said if line.startswith("error: ")]
    assert code == expected_code, err
    assert "Traceback" not in err and not err.startswith("usage:"), err
    assert len(lines) == 1 and said[-1] == lines[0], err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A run directory holding the smoke preset's classifier stage (and its config.json)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train.main(["classifier", "--preset", "smoke", "--out", str(out), *TINY]) == 0
    return out


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_refused_run_changes_nothing(classifier_run, capsys):
    before = snapshot(classifier_run)
    code = train.main(["classifier", "--preset", "smoke", "--out", str(classifier_run), *TINY,
                       "--set", "distill_classifier.lr=0.2"])
    one_line_error(capsys, code, 2, "holds another run", "distill_classifier", "--overwrite")
    code = train.main(["classifier", "--preset", "smoke", "--out", str(classifier_run), "--resume",
                       *TINY, "--set", "base.steps=3"])
    one_line_error(capsys, code, 2, "cannot resume", "base", "same config")
    code = train.main(["classifier", "--preset", "smoke", "--out", str(classifier_run), *TINY])
    one_line_error(capsys, code, 2, "finished classifier stage", "--resume", "--overwrite")
    assert snapshot(classifier_run) == before


def test_a_run_may_change_only_what_trains_nothing(classifier_run):
    cfg = get_preset("smoke").with_overrides(
        {"device": "cpu", "threads": 1, "distill_classifier.steps": 2, "eval_classifier.steps": 2})
    resume = pipeline.RunOptions(resume=True)
    pipeline.check_run_dir(cfg.with_overrides({"eval.num_samples": 32}), classifier_run, resume)
    with pytest.raises(ResumeError, match="differs in pd"):
        pipeline.check_run_dir(cfg.with_overrides({"pd.lr": 1e-3}), classifier_run, resume)
    pipeline.check_run_dir(cfg.with_overrides({"eval.num_samples": 32}), classifier_run,
                           pipeline.RunOptions())  # another evaluation of the same run
    with pytest.raises(StageExistsError, match="differs in base"):
        pipeline.check_run_dir(cfg.with_overrides({"base.steps": 3}), classifier_run,
                               pipeline.RunOptions())


def test_a_stage_without_its_inputs_writes_nothing(tmp_path, capsys):
    out = tmp_path / "empty"
    code = train.main(["pd", "--preset", "smoke", "--out", str(out), *TINY])
    one_line_error(capsys, code, 2, "base", "model.safetensors", "run the base stage first")
    code = train.main(["evaluate", "--preset", "smoke", "--out", str(out), *TINY])
    one_line_error(capsys, code, 2, "does not exist", "run the")
    assert not out.exists()


def test_a_batch_larger_than_the_data_is_refused_first(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(["--preset", "smoke", "--out", str(out), *TINY, "--set", "base.batch_size=5000"])
    one_line_error(capsys, code, 2, "base.batch_size=5000", "1497 training images")
    assert not out.exists()


def test_torn_files_of_a_run_are_named(classifier_run, tmp_path, capsys):
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "config.json").write_text('{"name": "smo')  # a plain write killed half way
    code = train.main(["base", "--out", str(torn), *TINY])
    one_line_error(capsys, code, 2, str(torn / "config.json"), "not valid JSON")
    with pytest.raises(ValueError, match=r"timings\.json.*not valid JSON.*Delete it"):
        (tmp_path / "timings.json").write_text("{")
        atomicio.read_json(tmp_path / "timings.json", "stage timings")


def test_a_refusing_machine_is_one_line_naming_the_path(capsys):
    try:
        os.mkdir("/sys/rcfd-test-run")
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EACCES, errno.EROFS):
            pytest.skip(f"needs a /sys that refuses writes ({e})")
    else:
        os.rmdir("/sys/rcfd-test-run")
        pytest.skip("this machine lets us write into /sys")
    code = train.main(["classifier", "--preset", "smoke", "--out", "/sys/rcfd-test-run", *TINY])
    line = one_line_error(capsys, code, 1, "/sys/rcfd-test-run")
    assert "bug" not in line


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    model = tmp_path / "m.npz"
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomicio.os, "fsync", full)
    with pytest.raises(EnvironmentFailure, match="cannot write .*m.npz: No space left"):
        atomicio.write_text(model, "x")
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary file
    monkeypatch.setattr(atomicio.os, "fsync", real_fsync)
    assert common._report(EnvironmentFailure(model, OSError(errno.ENOSPC, "No space"))) == 1
    assert common._report(PermissionError(errno.EACCES, "Permission denied", "/x/y")) == 1
    assert "Permission denied: /x/y" in capsys.readouterr().err


def test_a_bug_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(argv):
        raise RuntimeError("boom")

    assert common.run_cli(broken, []) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: boom (this is a bug in rcfd; rerun with --debug" in err
    assert "Traceback" not in err
    with pytest.raises(RuntimeError, match="boom"):
        common.run_cli(broken, ["--debug"])
    monkeypatch.setenv("RCFD_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        common.run_cli(broken, [])


def test_sample_refuses_before_writing(tmp_path, capsys):
    code = sample.main([str(tmp_path / "none.pt"), "--out", str(tmp_path / "o" / "x.png")])
    one_line_error(capsys, code, 2, "none.pt")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("after", [0.3, 3.0])
def test_sigterm_before_training_stops_cleanly(tmp_path, after):
    """While importing (0.3 s) or while setting up (3 s, before the first step), SIGTERM
    ends the command with exit 0 and a message, not the default exit 143."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "rcfd.train", "--preset", "smoke", "--out",
                             str(out), "--no-progress", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and "stopped" not in err:
        pytest.skip("the command finished before the signal")
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err


def test_dry_run_prints_the_resolved_threads_choice(capsys):
    assert train.main(["--dry-run", "--threads", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == 3
