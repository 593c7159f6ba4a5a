"""The one training loop every stage runs through.

:func:`run_job` trains one resumable unit (a :class:`Job`) in a run directory laid out as
:mod:`rcfd.training.rundir` describes, resuming from its state (:mod:`rcfd.training.state`)
when asked. SIGINT/SIGTERM finish the current step, write the state and raise
:class:`~rcfd.errors.Interrupted` (a ``SystemExit`` with code 0). A non-finite loss stops
with the last good checkpoint named (or skips up to ``skip_nonfinite`` such steps). Only
rank 0 writes. The optimizer, learning-rate schedule and EMA are in
:mod:`rcfd.training.optim`; metrics go through :class:`~rcfd.training.logger.MetricsLogger`.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rcfd import distributed as dist
from rcfd.io.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from rcfd.errors import Interrupted, NonFiniteLossError
from rcfd.training import state as st
from rcfd.core.fallback import fallback_message
from rcfd.core.precision import autocast, training_dtype
from rcfd.training.fast_step import ObjectiveStep, compile_step
from rcfd.training.logger import MetricsLogger
from rcfd.training.optim import EMA, OptimSpec, grad_norm, lr_at, make_optimizer
from rcfd.training.rundir import (
    RunContext,
    metrics_path,
    new_checkpoint_path,
    state_path,
    tensorboard_dir,
)


@dataclass
class StepInfo:
    """What a loss function needs besides the model and its share of the batch."""

    step: int
    generator: torch.Generator  # seeded from (seed, stage, unit): the same on every rank
    rank: int
    world_size: int
    global_batch: int

    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch (noise drawn for the global batch)."""
        per = self.global_batch // self.world_size
        return slice(self.rank * per, self.rank * per + per)


@dataclass
class Job:
    """One unit of training. ``loss_fn(model, x, y, info) -> (loss, terms)`` gets this
    rank's share ``x`` of the global batch; ``terms`` are 0-dim tensors to log.
    ``finalize(model, ema_model, extra, path) -> Path`` writes the unit's checkpoint
    ``<unit>.safetensors`` (rank 0). ``sample_fn(model, path)`` writes a sample grid;
    ``eval_fn(model, extra, step) -> dict`` logs metrics (e.g. test accuracy) and may keep
    a best state in ``extra``. ``data`` identifies the training data (a resume on other
    data is refused).

    ``state``: modules the method keeps besides the student (target networks, buffers),
    saved in ``<unit>.train.pt`` at every checkpoint and loaded back into the same modules
    before a resume's first step. ``after_step(steps_done, student)``: called after every
    applied optimiser step (after the EMA, outside any compiled region, on every rank) with
    the step count (skipped non-finite steps count but get no call) and the unwrapped
    student, e.g. to update a target (:func:`rcfd.training.ema.ema_update_`).

    ``compile`` takes effect on CUDA only (:func:`rcfd.training.fast_step.compile_step`):
    a ``loss_fn`` that is an :class:`~rcfd.training.fast_step.ObjectiveStep` then runs
    compiled as a whole (the fast step), any other has its model compiled; ``bf16``
    (autocast) and ``channels_last`` also take effect on CUDA only."""

    stage: str
    unit: str
    model: nn.Module
    loss_fn: Callable
    batches: Any  # rcfd.data.loader.Batches
    steps: int
    optim: OptimSpec
    config: dict
    finalize: Callable
    data: dict = field(default_factory=dict)
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
    state: Mapping[str, nn.Module] = field(default_factory=dict)  # the method's own state
    after_step: Callable[[int, nn.Module], None] | None = None


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


def log_line(run: RunContext, msg: str) -> None:
    """A progress message on stderr, from rank 0."""
    if run.is_main:
        print(f"rcfd: {msg}", file=sys.stderr, flush=True)


def run_job(job: Job, run: RunContext) -> Path:
    """Train ``job`` to ``job.steps`` (resuming from its state when ``run.resume``) and
    return the path ``job.finalize`` wrote."""
    return _Trainer(job, run).run()


class _Trainer:
    """The state of one :func:`run_job` call, split into its phases."""

    def __init__(self, job: Job, run: RunContext):
        self.job, self.run_ctx, self.info = job, run, run.dist
        self.device = run.torch_device
        self.cuda = self.device.type == "cuda"
        self.compiled = compile_step(job.compile, self.device)
        self.amp_dtype = training_dtype(job.bf16, self.device)
        d, stage, unit = run.run_dir, job.stage, job.unit
        self.final, self.state = new_checkpoint_path(d, stage, unit), state_path(d, stage, unit)
        self.logger = MetricsLogger(metrics_path(d, stage, unit), tensorboard_dir(d, stage, unit))
        model = job.model.to(self.device)
        if job.channels_last and self.cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.ema = EMA(model, job.ema_decay) if job.ema_decay is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, job.optim, fused=job.optim.fused and self.cuda)
        seed = run.seed + job.seed_offset
        rank_key = ("rank", self.info.rank) if job.rank_generator else ()
        self.generator = torch.Generator(device=self.device).manual_seed(
            st.stage_seed(seed, stage, unit, *rank_key))
        torch.manual_seed(st.stage_seed(seed, stage, unit, "rank", self.info.rank))
        self.identity = st.identity(job.config, job.steps, job.data, self.info.world_size,
                                    self.device)
        self.step, self.elapsed, self.skipped, self.t0 = 0, 0.0, 0, time.perf_counter()

    # ------------------------------------------------------------------ phases

    def run(self) -> Path:
        job, run = self.job, self.run_ctx
        if run.resume and self.state.exists():
            self._resume()
            log_line(run, f"resuming {job.stage}/{job.unit} at step {self.step} from {self.state}")
        if run.is_main:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.logger.start(self.step)
        trained = self.model
        if self.info.enabled:
            trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.cuda else None)
        self.eager_trained = trained
        self.loss_fn, self.trained = self._fast_path(trained)
        start, reduced = self.step, {"_stop": 0.0}
        self.t0 = time.perf_counter()
        bar = tqdm(total=job.steps, initial=start, desc=f"{job.stage}/{job.unit}",
                   disable=not (run.progress and run.is_main), mininterval=5.0,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            with _Signals(run.handle_signals) as signals, bar:
                done_here = 0
                while self.step < job.steps:
                    t_step = time.perf_counter()
                    reduced = self._train_step(signals)  # ends in a host sync
                    if self.compiled and done_here == 0:
                        log_line(run, f"compiled the {job.stage} step ({job.unit}) in "
                                      f"{time.perf_counter() - t_step:.1f} s")
                    done_here += 1
                    bar.update(1)
                    self._after_step(reduced, bar, done_here, signals)
        finally:
            self.logger.close()
        return self._finish(start, reduced)

    def _fast_path(self, trained) -> tuple[Callable, Any]:
        """``(loss_fn, trained)`` of the steps: when the step compiles, an ``ObjectiveStep``
        compiled as a whole (in the stage's region), any other ``loss_fn`` with its model
        compiled; a compile that raises already here falls back (:meth:`_fall_back`)."""
        fn = self.job.loss_fn
        if not self.compiled:
            return fn, trained
        try:
            if isinstance(fn, ObjectiveStep):
                return fn.compiled(region=self.job.stage), trained
            return fn, torch.compile(trained)
        except Exception as exc:  # a fast path that fails degrades to the eager step
            self._fall_back(exc)
            return fn, trained

    def _fall_back(self, exc: Exception) -> None:
        """Continue on the eager step, with the one line saying why and which switch."""
        job = self.job
        self.compiled = False
        self.loss_fn, self.trained = job.loss_fn, self.eager_trained
        what = f"compiling the {job.stage} step ({job.unit})"
        log_line(self.run_ctx, fallback_message(
            what, exc, f"--set {job.stage}.options.compile=false"))

    def _loss_and_backward(self, x, y, sinfo) -> tuple[torch.Tensor, dict]:
        """The step's loss and terms, its gradients accumulated. A compiled step that raises
        (torch.compile compiles at the first call, the backward at the first backward) is
        run again eagerly from the same RNG states, so the step is the eager step's."""
        if not self.compiled:
            return self._forward_backward(x, y, sinfo)
        saved = _RNGState(self.generator, self.device)
        try:
            return self._forward_backward(x, y, sinfo)
        except Exception as exc:  # a fast path that fails degrades to the eager step
            saved.restore()
            self._fall_back(exc)
            return self._forward_backward(x, y, sinfo)

    def _forward_backward(self, x, y, sinfo) -> tuple[torch.Tensor, dict]:
        with autocast(self.device, self.amp_dtype):
            loss, terms = self.loss_fn(self.trained, x, y, sinfo)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, terms

    def _train_step(self, signals) -> dict:
        job = self.job
        x, y = next(job.batches)
        if job.channels_last and self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_at(job.optim, self.step, job.steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        sinfo = StepInfo(self.step, self.generator, self.info.rank, self.info.world_size,
                         job.batches.batch_size)
        loss, terms = self._loss_and_backward(x, y, sinfo)
        norm = grad_norm(self.params, job.grad_clip)
        local = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                 "_norm": norm, "_stop": float(signals.received is not None)}
        reduced = dist.all_reduce_mean(local)  # one host sync per step
        finite = math.isfinite(reduced["loss"]) and math.isfinite(reduced["_norm"])
        if finite:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            self._skip_nonfinite(reduced)
        self.step += 1
        if finite and job.after_step is not None:
            job.after_step(self.step, unwrap_model(self.model))
        reduced.update(_lr=lr, _finite=finite)
        return reduced

    def _skip_nonfinite(self, reduced: dict) -> None:
        job, run = self.job, self.run_ctx
        self.skipped += 1
        if self.skipped > run.skip_nonfinite:
            last = self.state if self.state.exists() else None
            bad = {k: v for k, v in reduced.items() if not k.startswith("_")}
            raise NonFiniteLossError(
                f"{job.stage}/{job.unit}: non-finite loss at step {self.step + 1} "
                f"(terms {bad}, grad norm {reduced['_norm']}); the last good checkpoint is "
                f"{last or 'none (no checkpoint was written yet)'}; lower the learning rate, or "
                f"pass --skip-nonfinite N to skip up to N such steps")
        log_line(run, f"{job.stage}/{job.unit}: skipped step {self.step + 1} with a non-finite "
                      f"loss ({self.skipped} of {run.skip_nonfinite} allowed)")

    def _after_step(self, reduced: dict, bar, done_here: int, signals) -> None:
        job, run, step = self.job, self.run_ctx, self.step
        last = step == job.steps
        if run.is_main and (step % job.log_interval == 0 or last or not reduced["_finite"]):
            row = {"step": step, **{k: v for k, v in reduced.items() if not k.startswith("_")},
                   "lr": reduced["_lr"], "grad_norm": reduced["_norm"],
                   "time": round(self.elapsed + time.perf_counter() - self.t0, 3)}
            if not reduced["_finite"]:
                row["skipped"] = True
            self.logger.log(row)
            bar.set_postfix(loss=f"{reduced['loss']:.4g}", refresh=False)
        if job.eval_fn is not None and run.is_main and job.eval_interval and (
                step % job.eval_interval == 0 or last):
            metrics = job.eval_fn(self.model, job.extra, step)
            if metrics:
                self.logger.log({"step": step, **metrics})
        if job.sample_fn is not None and run.is_main and job.sample_interval and (
                step % job.sample_interval == 0 or last):
            self._save_samples()
        stop = reduced["_stop"] > 0 or (run.stop_after is not None and done_here >= run.stop_after)
        if not last and (stop or step % job.checkpoint_interval == 0):
            saved = self._save_state()
            if stop:
                why = (f"signal {signal.Signals(signals.received).name}"
                       if signals.received is not None else f"stop_after={run.stop_after}")
                msg = (f"{job.stage}/{job.unit} interrupted ({why}) at step {step}/{job.steps}; "
                       f"checkpoint: {saved}; continue with --resume")
                log_line(run, msg)
                raise Interrupted(msg, saved, step)

    def _finish(self, start: int, reduced: dict) -> Path:
        job, run = self.job, self.run_ctx
        job.extra["steps"], job.extra["skipped_steps"] = self.step, self.skipped
        out = self.final
        if run.is_main:
            out = job.finalize(self.model, None if self.ema is None else self.ema.model,
                               job.extra, out)
            self.state.unlink(missing_ok=True)
        dist.barrier()
        if start < job.steps and reduced["_stop"] > 0:  # a signal during the last step
            msg = f"{job.stage}/{job.unit} finished ({out}) and stopped on a signal; continue " \
                  "with --resume"
            log_line(run, msg)
            raise Interrupted(msg, out, self.step)
        return out

    # ------------------------------------------------------------------ state

    def _save_state(self) -> Path:
        rngs = dist.gather_objects(st.rng_state(self.generator), self.info)
        if self.run_ctx.is_main:
            job = self.job
            save_checkpoint({
                "format": st.STATE_FORMAT, "stage": job.stage, "unit": job.unit,
                "step": self.step, "elapsed": self.elapsed + time.perf_counter() - self.t0,
                "skipped": self.skipped, "identity": self.identity,
                "model": unwrap_model(self.model).state_dict(),
                "ema": None if self.ema is None else self.ema.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rngs,
                "data": job.batches.state_dict(), "extra": job.extra,
                "method_state": st.method_state(job.state)}, self.state)
        dist.barrier()
        return self.state

    def _resume(self) -> None:
        s = st.read_state(self.state, load_checkpoint(self.state, map_location="cpu"))
        st.check_identity(self.state, s["identity"], self.identity)
        unwrap_model(self.model).load_state_dict(s["model"])
        if self.ema is not None:
            self.ema.model.load_state_dict(s["ema"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.job.batches.load_state_dict(s["data"])
        st.set_rng_state(s["rng"][self.info.rank], self.generator)
        self.job.extra.update(s["extra"])
        st.load_method_state(self.state, s, self.job.state)
        self.step, self.elapsed, self.skipped = s["step"], s["elapsed"], s["skipped"]

    def _save_samples(self) -> None:
        """Call ``job.sample_fn(model, path)`` in eval mode, without moving the training RNG."""
        job = self.job
        model = self.ema.model if self.ema is not None else self.model
        was = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                job.sample_fn(model, self.run_ctx.run_dir / job.stage / f"{job.unit}_step{self.step:07d}.png")
        finally:
            model.train(was)


class _RNGState:
    """The step generator's and the global RNGs' states (CPU, and the step's CUDA device),
    to run a failed compiled step again from where it started. Reading them copies a few
    bytes on the host: no device sync."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator, self.gen_state = generator, generator.get_state()
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    def restore(self) -> None:
        self.generator.set_state(self.gen_state)
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
