"""The one training loop every stage runs through.

:func:`run_job` trains one resumable unit (a :class:`Job`) in a run directory laid out as
:mod:`rcfd.trainers.rundir` describes. The ``.train.pt`` state holds the model, EMA,
optimizer, step, every RNG state (as tensors and lists, so it stays ``weights_only``
loadable), the data position and the config, so a resumed run continues exactly (on the
CPU: the same losses, bit for bit). SIGINT/SIGTERM finish the current step, write the
state and raise :class:`Interrupted` (a ``SystemExit`` with code 0). Only rank 0 writes.
The optimizer, learning-rate schedule and EMA are in :mod:`rcfd.trainers.optim`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rcfd import distributed as dist
from rcfd.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from rcfd.trainers.optim import EMA, OptimSpec, grad_norm, lr_at, make_optimizer
from rcfd.trainers.rundir import (
    RunContext,
    StageExistsError,
    append_metrics,
    checkpoint_path,
    metrics_path,
    state_path,
    trim_metrics,
)

STATE_FORMAT = "rcfd-train-state"


# --------------------------------------------------------------------------- errors


class ResumeError(ValueError):
    """A training state cannot be resumed as asked (another config, another world size)."""


class NonFiniteLossError(RuntimeError):
    """A loss (or gradient norm) became NaN or infinite."""


class Interrupted(SystemExit):
    """Training stopped on request (SIGINT/SIGTERM or ``RunContext.stop_after``) after
    writing a resumable checkpoint; exits the process with code 0 when not caught."""

    def __init__(self, message: str, checkpoint: Path | None, step: int):
        super().__init__(0)
        self.message, self.checkpoint, self.step = message, checkpoint, step

    def __str__(self) -> str:
        return self.message


def configure_threads(threads: int | None = None, processes: int = 1) -> int:
    """Set torch's intra-op threads for a CPU run and return the number. ``None``: an equal
    share, among the ``processes`` of this job on the machine, of the cores that are idle
    now (cores in this process's affinity minus those busy, at least 1): on a busy machine,
    threads that wait for each other's cores make a step many times slower than one thread
    does. "Busy" is measured on this process's CPUs over a quarter of a second
    (:func:`busy_cores`), not taken from the machine's load average, which still counts a
    build that finished a minute ago."""
    if threads is None:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cores = cores or 1
        busy = busy_cores()
        if busy is None:  # no /proc/stat (not Linux): the 1-minute load average
            busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        idle = max(1, min(cores, int(round(cores - busy))))
        threads = max(1, idle // max(1, processes))
    torch.set_num_threads(threads)
    return threads


def cpu_times(stat_text: str, cpus=None) -> tuple[int, int]:
    """``(idle, total)`` clock ticks from the text of ``/proc/stat``: of the CPUs numbered in
    ``cpus`` (their ``cpuN`` lines), or of all of them (the ``cpu`` line). Idle includes
    iowait; total is user .. steal (guest time is already in user)."""
    want = None if cpus is None else {f"cpu{i}" for i in cpus}
    idle = total = 0
    found = False
    for line in stat_text.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or len(fields) < 6:
            continue
        if (want is None and fields[0] != "cpu") or (want is not None and fields[0] not in want):
            continue
        ticks = [int(v) for v in fields[1:9]]
        idle, total, found = idle + ticks[3] + ticks[4], total + sum(ticks), True
    if not found:
        raise ValueError("no matching cpu lines in the /proc/stat text")
    return idle, total


def busy_cores(window: float = 0.25) -> float | None:
    """How many of this process's CPUs (its affinity set; all CPUs where that is unknown)
    were busy over the next ``window`` seconds, from two readings of ``/proc/stat``; ``None``
    where it cannot be read."""
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            return cpu_times(f.read(), cpus)

    try:
        idle0, total0 = read()
        time.sleep(window)
        idle1, total1 = read()
    except (OSError, ValueError):
        return None
    if total1 <= total0:
        return None
    count = len(cpus) if cpus else os.cpu_count() or 1
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * count


# --------------------------------------------------------------------------- seeds and RNG


def stage_seed(seed: int, *key: Any) -> int:
    """A 63-bit seed that is a hash of ``(seed, *key)``, e.g. ``(seed, "pd", "T16", rank)``."""
    text = ":".join(map(str, (seed, *key)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG state as tensors/lists/ints (``weights_only``-safe)."""
    v, s, g = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "python": [v, list(s), g],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "generator": None if generator is None else generator.get_state()}
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


# --------------------------------------------------------------------------- the job


@dataclass
class StepInfo:
    """What a loss function needs besides the model and its share of the batch."""

    step: int
    generator: torch.Generator  # seeded from (seed, stage, unit): the same on every rank
    rank: int
    world_size: int
    global_batch: int


@dataclass
class Job:
    """One unit of training. ``loss_fn(model, x, y, info) -> (loss, terms)`` gets this
    rank's share ``x`` of the global batch; ``terms`` are 0-dim tensors to log.
    ``finalize(model, ema_model, extra) -> Path`` writes the unit's ``<unit>.pt`` (rank
    0). ``sample_fn(model, path)`` writes a sample grid; ``eval_fn(model) -> dict`` logs
    metrics (e.g. test accuracy) and may keep a best state in ``extra``."""

    stage: str
    unit: str
    model: nn.Module
    loss_fn: Callable
    batches: Any  # rcfd.data.loader.Batches
    steps: int
    optim: OptimSpec
    config: dict
    finalize: Callable
    ema_decay: float | None = None
    grad_clip: float | None = None
    log_interval: int = 10
    checkpoint_interval: int = 1000
    sample_fn: Callable | None = None
    sample_interval: int | None = None
    eval_fn: Callable | None = None
    eval_interval: int | None = None
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    seed_offset: int = 0
    rank_generator: bool = False  # True: the step generator is seeded per rank too
    extra: dict = field(default_factory=dict)  # job state saved with the checkpoint


class _Signals:
    """Turn SIGINT/SIGTERM into a flag while the loop runs (main thread only)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _log(run: RunContext, msg: str) -> None:
    if run.is_main:
        print(f"rcfd: {msg}", file=sys.stderr, flush=True)


def run_job(job: Job, run: RunContext) -> Path:
    """Train ``job`` to ``job.steps`` (resuming from its state when ``run.resume``) and
    return the path ``job.finalize`` wrote."""
    device = run.torch_device
    info = run.dist
    paths = {k: f(run.run_dir, job.stage, job.unit)
             for k, f in (("final", checkpoint_path), ("state", state_path), ("log", metrics_path))}
    if run.is_main:
        paths["final"].parent.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    model = job.model.to(device)
    if job.channels_last and cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    ema = EMA(model, job.ema_decay) if job.ema_decay is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, job.optim, fused=job.optim.fused and cuda)
    seed = run.seed + job.seed_offset
    generator = torch.Generator(device=device).manual_seed(
        stage_seed(seed, job.stage, job.unit, *(("rank", info.rank) if job.rank_generator else ())))
    torch.manual_seed(stage_seed(seed, job.stage, job.unit, "rank", info.rank))
    start, elapsed, skipped = 0, 0.0, 0
    if run.resume and paths["state"].exists():
        start, elapsed, skipped = _load_state(paths["state"], job, model, ema, optimizer,
                                              generator, info)
        _log(run, f"resuming {job.stage}/{job.unit} at step {start} from {paths['state']}")
    if run.is_main:
        trim_metrics(paths["log"], start)
    trained = model
    if info.enabled:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None)
    if job.compile and cuda:
        trained = torch.compile(trained)

    def save_state(step: int) -> Path | None:
        rngs = dist.gather_objects(rng_state(generator), info)
        if run.is_main:
            save_checkpoint(_state_dict(job, model, ema, optimizer, rngs, step,
                                        elapsed + time.perf_counter() - t0, skipped),
                            paths["state"])
        dist.barrier()
        return paths["state"]

    from tqdm.auto import tqdm

    bar = tqdm(total=job.steps, initial=start, desc=f"{job.stage}/{job.unit}",
               disable=not (run.progress and run.is_main), mininterval=5.0, dynamic_ncols=True,
               file=sys.stderr)
    t0, step, done_here = time.perf_counter(), start, 0
    with _Signals(run.handle_signals) as signals, bar:
        while step < job.steps:
            x, y = next(job.batches)
            if job.channels_last and cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(job.optim, step, job.steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sinfo = StepInfo(step, generator, info.rank, info.world_size, job.batches.batch_size)
            with _autocast(device, job.bf16):
                loss, terms = job.loss_fn(trained, x, y, sinfo)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = grad_norm(params, job.grad_clip)
            local = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                     "_norm": norm, "_stop": float(signals.received is not None)}
            reduced = dist.all_reduce_mean(local)  # one host sync per step
            gnorm = reduced["_norm"]
            finite = math.isfinite(reduced["loss"]) and math.isfinite(gnorm)
            if finite:
                optimizer.step()
                if ema is not None:
                    ema.update(model)
            else:
                skipped += 1
                if skipped > run.skip_nonfinite:
                    last = paths["state"] if paths["state"].exists() else None
                    bad = {k: v for k, v in reduced.items() if not k.startswith("_")}
                    raise NonFiniteLossError(
                        f"{job.stage}/{job.unit}: non-finite loss at step {step + 1} "
                        f"(terms {bad}, grad norm {gnorm}); the last good checkpoint is "
                        f"{last or 'none (no checkpoint was written yet)'}; lower the lr or "
                        f"pass skip_nonfinite=N to skip up to N such steps")
                _log(run, f"{job.stage}/{job.unit}: skipped step {step + 1} with a non-finite "
                          f"loss ({skipped} of {run.skip_nonfinite} allowed)")
            step += 1
            done_here += 1
            bar.update(1)
            if run.is_main and (step % job.log_interval == 0 or step == job.steps or not finite):
                row = {"step": step, **{k: v for k, v in reduced.items() if not k.startswith("_")},
                       "lr": lr, "grad_norm": gnorm,
                       "time": round(elapsed + time.perf_counter() - t0, 3)}
                if not finite:
                    row["skipped"] = True
                append_metrics(paths["log"], row)
                bar.set_postfix(loss=f"{reduced['loss']:.4g}", refresh=False)
            if job.eval_fn is not None and run.is_main and job.eval_interval and (
                    step % job.eval_interval == 0 or step == job.steps):
                metrics = job.eval_fn(model, job.extra, step)
                if run.is_main and metrics:
                    append_metrics(paths["log"], {"step": step, **metrics})
            if job.sample_fn is not None and run.is_main and job.sample_interval and (
                    step % job.sample_interval == 0 or step == job.steps):
                _save_samples(job, ema.model if ema is not None else model, step, run)
            stop = reduced["_stop"] > 0 or (run.stop_after is not None and done_here >= run.stop_after)
            if step < job.steps and (stop or step % job.checkpoint_interval == 0):
                saved = save_state(step)
                if stop:
                    why = (f"signal {signal.Signals(signals.received).name}"
                           if signals.received is not None else f"stop_after={run.stop_after}")
                    msg = (f"{job.stage}/{job.unit} interrupted ({why}) at step {step}/"
                           f"{job.steps}; checkpoint: {saved}; continue with resume=True "
                           f"(--resume)")
                    _log(run, msg)
                    raise Interrupted(msg, saved, step)
    job.extra["steps"], job.extra["skipped_steps"] = step, skipped
    out = paths["final"]
    if run.is_main:
        out = job.finalize(model, None if ema is None else ema.model, job.extra, out)
        paths["state"].unlink(missing_ok=True)
    dist.barrier()
    if start < job.steps and reduced["_stop"] > 0:  # a signal during the last step
        msg = f"{job.stage}/{job.unit} finished ({out}) and stopped on a signal; continue " \
              "with resume=True (--resume)"
        _log(run, msg)
        raise Interrupted(msg, out, step)
    return out


# --------------------------------------------------------------------------- state


def _state_dict(job, model, ema, optimizer, rngs, step, elapsed, skipped) -> dict:
    return {"format": STATE_FORMAT, "stage": job.stage, "unit": job.unit, "step": step,
            "steps": job.steps, "elapsed": elapsed, "skipped": skipped,
            "model": unwrap_model(model).state_dict(),
            "ema": None if ema is None else ema.model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rngs,
            "data": job.batches.state_dict(), "config": job.config, "extra": job.extra}


def _load_state(path, job, model, ema, optimizer, generator, info):
    s = load_checkpoint(path, map_location="cpu")
    if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
        raise StageExistsError(f"{path} is not a training state of rcfd; delete it or use overwrite")
    if s["config"] != job.config or s["steps"] != job.steps:
        diff = _diff(s["config"], job.config)
        raise ResumeError(f"cannot resume {path}: it was made with a different config "
                         f"({', '.join(diff[:5]) or 'steps'}); resume with the same config, "
                         "or pass overwrite=True to start again")
    unwrap_model(model).load_state_dict(s["model"])
    if ema is not None:
        ema.model.load_state_dict(s["ema"])
    optimizer.load_state_dict(s["optimizer"])
    job.batches.load_state_dict(s["data"])
    if len(s["rng"]) != info.world_size:
        raise ResumeError(f"cannot resume {path}: it was written by {len(s['rng'])} processes, "
                         f"this run has {info.world_size}; resume with the same world size")
    set_rng_state(s["rng"][info.rank], generator)
    job.extra.update(s["extra"])
    return s["step"], s["elapsed"], s["skipped"]


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _save_samples(job: Job, model: nn.Module, step: int, run: RunContext) -> None:
    """Call ``job.sample_fn(model, path)`` in eval mode, without moving the training RNG."""
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            job.sample_fn(model, run.run_dir / job.stage / f"{job.unit}_step{step:07d}.png")
    finally:
        model.train(was)
