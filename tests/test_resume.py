"""Resume exactness, signals, and crashes mid-write, at the trainer level."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rcfd.io.checkpoint import load_checkpoint, load_diffusion_checkpoint
from rcfd.core.unet import UNetConfig
from rcfd.data import DatasetSpec
from rcfd.errors import Interrupted, ResumeError, StageExistsError
from rcfd.methods.base import BaseStageConfig, train_base
from rcfd.methods.classifier import ClassifierStageConfig, train_classifier
from rcfd.methods.common import TrainOptions
from rcfd.methods.pd import PDStageConfig, train_pd
from rcfd.io.files import read_jsonl
from rcfd.training.rundir import RunContext, metrics_path, state_path

CPU = TrainOptions(bf16=False, channels_last=False, fused=False, compile=False)
DATA = DatasetSpec(name="digits", image_size=8)
# dropout on, so that resuming must restore the global RNG too
UNET = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn=(), num_res_blocks=1,
                  dropout=0.1, num_time_indices=9)
BASE = BaseStageConfig(unet=UNET, T=8, lr=1e-3, warmup=3, batch_size=16, steps=10,
                       ema_decay=0.9, sample_interval=10 ** 6, num_sample_images=0,
                       checkpoint_interval=1000, log_interval=1, options=CPU)
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_ctx(path, **kw):
    return RunContext(path, device="cpu", progress=False, **kw)


def logged(run_dir, stage, unit):
    return [{k: v for k, v in r.items() if k != "time"}
            for r in read_jsonl(metrics_path(run_dir, stage, unit))]


def assert_same_weights(a, b):
    ma, _ = load_diffusion_checkpoint(a, use_ema=False)
    mb, _ = load_diffusion_checkpoint(b, use_ema=False)
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), k


def interrupted_then_resumed(train, run_dir, stops):
    """Run ``train(run)`` stopping after each of ``stops`` steps, then to the end."""
    for n in stops:
        with pytest.raises(Interrupted) as e:
            train(run_ctx(run_dir, resume=True, stop_after=n))
        assert e.value.code == 0 and e.value.checkpoint.exists()
    return train(run_ctx(run_dir, resume=True))


def test_base_resume_is_bitwise_exact(tmp_path):
    full = train_base(BASE, DATA, run_ctx(tmp_path / "a"))
    resumed = interrupted_then_resumed(lambda run: train_base(BASE, DATA, run),
                                       tmp_path / "b", stops=[4, 3])
    assert logged(tmp_path / "a", "base", "model") == logged(tmp_path / "b", "base", "model")
    assert len(logged(tmp_path / "b", "base", "model")) == BASE.steps
    assert_same_weights(full, resumed)
    ema_a, _ = load_diffusion_checkpoint(full)
    ema_b, _ = load_diffusion_checkpoint(resumed)
    assert all(torch.equal(x, y) for x, y in zip(ema_a.parameters(), ema_b.parameters()))


def test_pd_resume_across_rounds_is_exact(tmp_path):
    teacher = train_base(BASE.replace(steps=2), DATA, run_ctx(tmp_path / "t"))
    cfg = PDStageConfig(final_T=2, steps_per_round=5, long_round_steps=5, lr=1e-3,
                        batch_size=16, sample_interval=10 ** 6, num_sample_images=0,
                        checkpoint_interval=1000, log_interval=1, options=CPU)
    a = train_pd(cfg, teacher, DATA, run_ctx(tmp_path / "a"))
    b = interrupted_then_resumed(lambda run: train_pd(cfg, teacher, DATA, run),
                                 tmp_path / "b", stops=[3, 4])  # the 2nd stops in round 2
    for unit in ("T4", "T2"):
        assert logged(tmp_path / "a", "pd", unit) == logged(tmp_path / "b", "pd", unit)
    for x, y in zip(a, b):
        assert_same_weights(x, y)


def test_classifier_resume_is_exact(tmp_path):
    cfg = ClassifierStageConfig(arch="resnet18", width=8, epochs=None, steps=8, batch_size=32,
                                autoaugment=True, eval_interval=3, log_interval=1, options=CPU)
    train_classifier(cfg, DATA, run_ctx(tmp_path / "a"))
    interrupted_then_resumed(lambda run: train_classifier(cfg, DATA, run), tmp_path / "b",
                             stops=[4])
    assert logged(tmp_path / "a", "classifier", "distill") == logged(
        tmp_path / "b", "classifier", "distill")


def test_resume_refuses_a_different_config(tmp_path):
    with pytest.raises(Interrupted):
        train_base(BASE, DATA, run_ctx(tmp_path, stop_after=2))
    with pytest.raises(ResumeError, match=r"config\.lr: 0\.001 -> 0\.002.*same config"):
        train_base(BASE.replace(lr=2e-3), DATA, run_ctx(tmp_path, resume=True))


def test_resume_refuses_other_data_and_another_thread_count(tmp_path):
    with pytest.raises(Interrupted):
        train_base(BASE, DATA, run_ctx(tmp_path, stop_after=2))
    other = DatasetSpec(name="digits", image_size=8, split_seed=1)
    with pytest.raises(ResumeError, match=r"data\.split_seed: 0 -> 1.*same data"):
        train_base(BASE, other, run_ctx(tmp_path, resume=True))
    torch.set_num_threads(2)
    try:
        with pytest.raises(ResumeError, match=r"threads: 1 -> 2.*same --threads"):
            train_base(BASE, DATA, run_ctx(tmp_path, resume=True))
    finally:
        torch.set_num_threads(1)  # the module's one_thread fixture


def test_unfinished_stage_needs_resume_or_overwrite(tmp_path):
    with pytest.raises(Interrupted):
        train_base(BASE, DATA, run_ctx(tmp_path, stop_after=2))
    with pytest.raises(StageExistsError, match="unfinished base stage"):
        train_base(BASE, DATA, run_ctx(tmp_path))


# --------------------------------------------------------------------------- processes

SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from rcfd.core.unet import UNetConfig
    from rcfd.data import DatasetSpec
    from rcfd.methods.base import BaseStageConfig, train_base
    from rcfd.methods.common import TrainOptions
    from rcfd.training.rundir import RunContext
    unet = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn=(),
                      num_res_blocks=1, dropout=0.0, num_time_indices=9)
    cfg = BaseStageConfig(unet=unet, T=8, steps=100000, batch_size=16, warmup=1,
                          sample_interval=10 ** 6, num_sample_images=0, log_interval=1,
                          checkpoint_interval=int(sys.argv[2]),
                          options=TrainOptions(bf16=False, channels_last=False, fused=False))
    train_base(cfg, DatasetSpec(name="digits", image_size=8),
               RunContext(sys.argv[1], device="cpu", progress=False, resume=True))
""")


def start(tmp_path, checkpoint_interval):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"),
                             str(checkpoint_interval)], env=env, stderr=subprocess.PIPE,
                            text=True)


def wait_for_rows(tmp_path, n, proc, timeout=120):
    log = metrics_path(tmp_path / "run", "base", "model")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("training did not log in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_exits_zero(tmp_path, sig):
    proc = start(tmp_path, checkpoint_interval=10 ** 6)
    wait_for_rows(tmp_path, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    path = state_path(tmp_path / "run", "base", "model")
    assert proc.returncode == 0, err
    assert f"checkpoint: {path}" in err and sig.name in err
    state = load_checkpoint(path)
    rows = read_jsonl(metrics_path(tmp_path / "run", "base", "model"))
    assert state["step"] == rows[-1]["step"] >= 2  # the step in flight was finished and saved


@pytest.mark.slow
def test_kill9_mid_write_leaves_a_loadable_checkpoint(tmp_path):
    """A checkpoint every step, the process killed at arbitrary moments: the state on disk
    is always complete (the previous one or the new one), and training resumes from it."""
    steps_seen = []
    for delay in (0.05, 0.13, 0.31):
        proc = start(tmp_path, checkpoint_interval=1)
        wait_for_rows(tmp_path, (steps_seen[-1] if steps_seen else 0) + 3, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        state = load_checkpoint(state_path(tmp_path / "run", "base", "model"))
        assert state["format"] == "rcfd-train-state"
        steps_seen.append(state["step"])
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]
