"""torchrun / DDP helpers, and a 2-process gloo run against one process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rcfd import distributed as dist
from rcfd.io.files import read_jsonl
from rcfd.training.rundir import metrics_path

REPO = Path(__file__).resolve().parents[1]


def test_single_process_helpers_are_identities():
    x = torch.arange(6.0).reshape(3, 2)
    assert dist.gather_cat(x) is x
    assert dist.all_reduce_mean(x) is x
    assert dist.all_reduce_mean({"a": torch.tensor(1.5), "b": 2}) == {"a": 1.5, "b": 2.0}
    assert dist.gather_objects({"k": 1}) == [{"k": 1}]
    assert dist.is_main()
    dist.barrier()


def test_env_info(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist.env_info() == dist.DistInfo() and not dist.init_distributed("cpu").enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 4, 1, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        dist.env_info()


def test_resolve_device():
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            dist.resolve_device("cuda")


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from rcfd import distributed as dist
    from rcfd.study.presets import get_preset
    from rcfd.methods.base import train_base
    from rcfd.methods.pd import train_pd
    from rcfd.training.rundir import RunContext

    info = dist.init_distributed("cpu")
    cfg = get_preset("smoke")
    base = cfg.base.replace(steps=6, log_interval=1, checkpoint_interval=3)
    pd = cfg.pd.replace(final_T=8, steps_per_round=4)
    run = RunContext(sys.argv[1], device="cpu", progress=False, dist=info)
    path = train_base(base, cfg.data, run)
    train_pd(pd, path, cfg.data, run)
    mine = torch.full((info.rank + 1, 2), float(info.rank))
    gathered = dist.gather_cat(mine, info)
    mean = dist.all_reduce_mean({"r": float(info.rank)})
    if info.is_main:
        with open(sys.argv[1] + "/collectives.json", "w") as f:
            json.dump({"world": info.world_size, "backend": info.backend,
                       "gathered": gathered.tolist(), "mean": mean["r"]}, f)
    dist.cleanup()
""")


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    """The same global batch over 2 ranks (each half of it) gives the loss curve of one
    process, up to float summation order; only rank 0 writes."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _run([sys.executable, str(script), str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(script), str(two)], tmp_path)
    for stage, unit in (("base", "model"), ("pd", "T8")):
        a = read_jsonl(metrics_path(one, stage, unit))
        b = read_jsonl(metrics_path(two, stage, unit))
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-7), (stage, ra["step"])
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
    c = json.loads((two / "collectives.json").read_text())
    assert (c["world"], c["backend"], c["mean"]) == (2, "gloo", 0.5)
    assert c["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert sorted(p.name for p in (two / "base").iterdir()) == sorted(
        p.name for p in (one / "base").iterdir())


@pytest.mark.slow
def test_cli_under_torchrun_exits_cleanly(tmp_path):
    """`torchrun -m rcfd.train` on 2 gloo processes trains, writes once (rank 0) and leaves
    the process group before exiting (exit code 0 on both ranks)."""
    out = tmp_path / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "rcfd.train", "base", "--preset", "smoke", "--set", "base.steps=4",
          "--no-progress", "--out", str(out)], tmp_path)
    assert (out / "base" / "model.safetensors").is_file()
    assert len(read_jsonl(metrics_path(out, "base", "model"))) >= 1
