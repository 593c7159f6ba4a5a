"""The metrics logger: JSON lines always, TensorBoard event files when tensorboard is
installed, and a resumed unit's log trimmed to its checkpoint in both."""

import json
import time

import pytest

from rcfd.training import logger as logger_mod
from rcfd.io.files import read_jsonl
from rcfd.training.logger import MetricsLogger


def events(directory):
    """The event files of ``directory``, read back with TensorBoard's own reader."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = reader.EventAccumulator(str(directory))
    accumulator.Reload()
    return accumulator


def scalars(directory, tag):
    """``[(step, value)]`` of a TensorBoard scalar."""
    return [(e.step, e.value) for e in events(directory).Scalars(tag)]


def test_rows_go_to_jsonl_and_tensorboard(tmp_path):
    if logger_mod.SummaryWriter is None:
        pytest.skip("tensorboard is not installed")
    log = MetricsLogger(tmp_path / "m.jsonl", tmp_path / "tb")
    log.start(0)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step, "skipped": True, "name": "x",
                 "nan": float("nan")})
    log.close()
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 0.5
    got = scalars(tmp_path / "tb", "loss")
    assert [s for s, _ in got] == [1, 2, 3] and got[2][1] == pytest.approx(1 / 3)
    tags = events(tmp_path / "tb").Tags()["scalars"]
    assert "loss" in tags and not {"skipped", "name", "nan"} & set(tags)  # numbers only


def test_a_resumed_log_drops_the_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    first = MetricsLogger(path, tmp_path / "tb")
    first.start(0)
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)})
    first.close()
    # A resume is a new process in a later second. TensorBoard reads event files in name
    # order, and a name is the second, host, pid and a per-process counter: within one
    # second of one process the counter decides, and "10" sorts before "9".
    time.sleep(1.1)
    again = MetricsLogger(path, tmp_path / "tb")
    again.start(3)  # resumed from the state of step 3: steps 4, 5 are trained again
    again.log({"step": 4, "loss": 40.0})
    again.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    if logger_mod.SummaryWriter is not None:
        assert dict(scalars(tmp_path / "tb", "loss"))[4] == 40.0
    fresh = MetricsLogger(path)
    fresh.start(0)
    fresh.close()
    assert read_jsonl(path) == []


def test_without_tensorboard_only_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(logger_mod, "SummaryWriter", None)
    log = MetricsLogger(tmp_path / "m.jsonl", tmp_path / "tb")
    assert not log.tensorboard
    log.start(0)
    log.log({"step": 1, "loss": 2.0})
    log.close()
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1, "loss": 2.0}]
    assert not (tmp_path / "tb").exists()


def test_a_torn_last_line_is_dropped_and_a_damaged_log_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1}]
    path.write_text('{"st\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl: line 1 is not JSON"):
        read_jsonl(path)
