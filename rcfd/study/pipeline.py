"""The whole study, stage by stage, in one run directory (DESIGN.md, "Data flow"): every
registered training method in order (:mod:`rcfd.methods`), then the evaluation of every
sampler they produce, then the report.

:func:`run_pipeline` runs one stage or all of them and times each; :func:`run_study` repeats
the pipeline per seed and writes the paired comparison. The run directory holds, besides the
methods' checkpoints and metric logs (see :mod:`rcfd.training.rundir`): ``config.json``,
``timings.json``, ``samples/``, ``loss_curves.png``, ``results.json`` and ``results.md``.
Nothing is written until every check that can refuse the command has passed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rcfd import distributed
from rcfd.io.files import read_json, write_json
from rcfd.data import load_dataset
from rcfd.evaluation.stage import floor_rows
from rcfd.errors import ResumeError, StageExistsError, UsageError
from rcfd.study.evaluation import check_evaluation, evaluate_run, finish_run_report, summary
from rcfd.methods import registry
from rcfd.study.configfile import save_config
from rcfd.study.runinfo import commit, header, platform_record
from rcfd.report.study import write_study
from rcfd.training.rundir import RunContext, checkpoint_path
from rcfd.training.threads import configure_threads

log = logging.getLogger("rcfd")

TIMINGS_JSON, CONFIG_JSON = "timings.json", "config.json"
HARMLESS_CHANGES = ("eval",)  # config sections a run directory's later commands may change


@dataclass(frozen=True)
class RunOptions:
    """How to treat what the run directory already holds, and how to show progress."""

    resume: bool = False
    overwrite: bool = False
    skip_nonfinite: int = 0
    progress: bool = True


def _say(msg: str = "", dist=None) -> None:
    if dist is None or dist.is_main:
        print(msg, flush=True)


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def stage_plan(cfg) -> dict[str, str]:
    """One line per stage that ``cfg`` switches on, saying what it trains or measures."""
    plan = {m.name: m.describe(m.view(cfg)) for m in registry.methods() if m.enabled(cfg)}
    plan["evaluate"] = (f"{len(evaluation_rows(cfg))} (sampler, steps) pairs x "
                        f"{cfg.eval.num_samples} samples, against the {cfg.eval.reference} split")
    return plan


def evaluation_rows(cfg) -> list[registry.Row]:
    """Every sampler the enabled methods produce that ``eval.methods`` asks to measure."""
    wanted = cfg.eval.methods
    return [row for m in registry.methods() if m.enabled(cfg) and (wanted is None or m.name in wanted)
            for row in m.rows(m.view(cfg))]


def setup(cfg):
    """Join torchrun's process group (if any), pick the device and the thread count."""
    try:
        dist = distributed.init_distributed(cfg.device)
        device = distributed.resolve_device(cfg.device, dist)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"device {cfg.device!r}: {e}") from None
    # torchrun's processes on this machine share its cores
    configure_threads(cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    return dist, device


# --------------------------------------------------------------------------- the run directory


def check_run_dir(cfg, run_dir: Path, options: RunOptions) -> None:
    """Refuse, before anything is written, a run directory that holds another run: a config
    that differs in what was trained (anything but the evaluation settings), unless
    ``--overwrite``."""
    path = run_dir / CONFIG_JSON
    if not path.is_file() or options.overwrite:
        return
    saved, now = read_json(path, "the run's config"), cfg.to_dict()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if not changed:
        return
    if all(k in HARMLESS_CHANGES for k in changed):
        return
    keys = ", ".join(changed)
    if options.resume:
        raise ResumeError(f"cannot resume {run_dir}: its config.json differs in {keys}, which "
                          "changes what was trained; resume with the same config (omit --preset/"
                          "--config/--set to use the saved one) or pass --overwrite")
    raise StageExistsError(f"{run_dir} holds another run (its config.json differs in {keys}); "
                           "choose another --out, or pass --overwrite to replace it")


def check_inputs(cfg, run_dir: Path, stages: list[str]) -> None:
    """Refuse, before anything is written, a command whose stages read checkpoints that
    neither exist nor are made by a stage of this command."""
    for s in stages:
        if s == "evaluate":
            paths = [checkpoint_path(run_dir, r.stage, r.unit) for r in evaluation_rows(cfg)]
        else:
            method = registry.get(s)
            paths = method.inputs(method.view(cfg), run_dir)
        for path in paths:
            producer = path.parent.name
            if path.parent.parent != run_dir and not path.exists():  # a teacher of the config's
                raise UsageError(f"{path} does not exist (the {s} stage's teacher); give a "
                                 "diffusion checkpoint or a diffusers model folder")
            if producer not in stages and not (path.is_file() or path.is_dir()):
                raise UsageError(f"{path} does not exist: run the {producer} stage first "
                                 f"(python -m rcfd.train {producer} --out {run_dir})")


def check_floor(cfg, stages: list[str]) -> None:
    """Refuse, before anything is trained, an ``eval.floor`` that names a row key none of
    the rows to evaluate has (else the evaluation would stop on it after training)."""
    if "evaluate" in stages:
        floor_rows(evaluation_rows(cfg), cfg.eval.floor)


def check_batch_sizes(cfg, stages: list[str]) -> None:
    """Refuse, before anything is written, a training batch larger than the training split."""
    sections = [(key, getattr(cfg, key)) for s in stages if s != "evaluate"
                for key in registry.get(s).sections if getattr(cfg, key) is not None]
    sized = [(key, sec.batch_size) for key, sec in sections if hasattr(sec, "batch_size")]
    if not sized:
        return
    n = len(load_dataset(cfg.data, "train"))
    for key, batch in sized:
        if batch > n:
            raise UsageError(f"{key}.batch_size={batch} is larger than the {n} training images of "
                             f"{cfg.data.name}; set {key}.batch_size to at most {n}")


def _record_timing(run_dir: Path, stage: str, seconds: float, *, add: bool = False) -> None:
    """Record a stage's wall time; ``add`` (a resumed training stage) adds it to what earlier
    runs recorded, so that skipping a finished stage does not erase its time."""
    path = run_dir / TIMINGS_JSON
    timings = read_json(path, "stage timings") if path.is_file() else {}
    timings[stage] = round(seconds + (timings.get(stage, 0.0) if add else 0.0), 2)
    order = {s: i for i, s in enumerate([m.name for m in registry.methods()] + ["evaluate"])}
    write_json(path, dict(sorted(timings.items(), key=lambda kv: order.get(kv[0], 99))))


# --------------------------------------------------------------------------- the pipeline


def stages_to_run(cfg, stage: str) -> list[str]:
    if stage == "all":
        return [m.name for m in registry.methods() if m.enabled(cfg)] + ["evaluate"]
    if stage != "evaluate" and not registry.get(stage).enabled(cfg):
        raise UsageError(f"the {stage} stage is switched off in this config (its section is "
                         f"null); set it, e.g. --set {next(iter(registry.get(stage).sections))}.<key>=...")
    return [stage]


def run_pipeline(cfg, run_dir: str | os.PathLike, *, stage: str = "all",
                 options: RunOptions = RunOptions(), source: str = "preset", dist=None,
                 device=None) -> dict | None:
    """Run ``stage`` (or ``"all"``) of the study described by ``cfg`` in ``run_dir``; after
    an evaluation, the results dict (rank 0)."""
    run_dir = Path(run_dir)
    if dist is None:
        dist, device = setup(cfg)
    stages = stages_to_run(cfg, stage)
    check_floor(cfg, stages)
    extractor = check_evaluation(cfg) if "evaluate" in stages else None  # data and extractor, first
    check_run_dir(cfg, run_dir, options)
    check_inputs(cfg, run_dir, stages)
    check_batch_sizes(cfg, stages)
    _say(header(cfg, run_dir, device, dist, source), dist)
    plan = stage_plan(cfg)
    if extractor is not None:
        plan["evaluate"] += f": {extractor}"
    for i, s in enumerate(stages, 1):
        _say(f"  [{i}/{len(stages)}] {s:<10} {plan[s]}", dist)
    if dist.is_main:
        save_config(cfg, run_dir / CONFIG_JSON)
    run = RunContext(run_dir=run_dir, device=device, seed=cfg.seed, resume=options.resume,
                     overwrite=options.overwrite, skip_nonfinite=options.skip_nonfinite,
                     progress=options.progress, dist=dist)
    t_start, results = time.perf_counter(), None
    for i, s in enumerate(stages, 1):
        _say(f"\n== [{i}/{len(stages)}] {s}: {plan[s]}", dist)
        t0 = time.perf_counter()
        if s == "evaluate":
            results = evaluate_run(cfg, evaluation_rows(cfg), run_dir, device, dist,
                                   progress=options.progress)
        else:
            method = registry.get(s)
            paths = method.train(method.view(cfg), run)
            _say(f"   checkpoints: {', '.join(str(p) for p in paths)}", dist)
        seconds = time.perf_counter() - t0
        if dist.is_main:
            _record_timing(run_dir, s, seconds, add=options.resume and s != "evaluate")
        _say(f"== {s} done in {fmt_time(seconds)} (elapsed {fmt_time(time.perf_counter() - t_start)})", dist)
    if results is not None:
        results["timings"] = read_json(run_dir / TIMINGS_JSON, "stage timings")
        results["platform"] = platform_record(device)  # what python -m rcfd.report checks
        paths = finish_run_report(run_dir, results, [m.name for m in registry.methods()])
        _say("\n" + summary(results), dist)
        _say(f"\nresults: {', '.join(str(p) for p in paths.values())}", dist)
    _say(f"total {fmt_time(time.perf_counter() - t_start)}", dist)
    return results


def comparisons(cfg) -> list[tuple[str, str]]:
    """``(method, baseline)`` row keys compared by seed in a study (the enabled methods; a
    method's key is its rows' ``method/sampler`` when they use another sampler than DDIM)."""
    def key(method):
        rows = method.rows(method.view(cfg)) if method.enabled(cfg) else []
        return rows[0].key if rows else method.name
    return [(key(m), key(registry.get(m.compare_to))) for m in registry.methods()
            if m.compare_to and m.enabled(cfg)]


def run_study(cfg, out: str | os.PathLike, *, num_seeds: int, stage: str = "all",
              options: RunOptions = RunOptions(), source: str = "preset") -> dict | None:
    """The pipeline once per seed ``cfg.seed + k`` in ``out/seed<seed>``, then (after an
    evaluation) the per-seed numbers, the paired comparisons with intervals and tests, and
    the aggregated tables in ``out/study.md`` / ``study.json``."""
    out = Path(out)
    dist, device = setup(cfg)
    seeds = [cfg.seed + k for k in range(num_seeds)]
    check_run_dir(cfg, out, options)
    if dist.is_main:
        save_config(cfg, out / CONFIG_JSON)
    per_seed = []
    for k, seed in enumerate(seeds, 1):
        _say(f"\n######## seed {seed} ({k}/{num_seeds})", dist)
        seed_cfg = cfg.replace(seed=seed)
        per_seed.append(run_pipeline(seed_cfg, out / f"seed{seed}", stage=stage, options=options,
                                     source=source, dist=dist, device=device))
    if not dist.is_main or "evaluate" not in stages_to_run(cfg, stage):
        return None
    study = write_study(out, per_seed, comparisons(cfg), commit=commit() or "unknown",
                        platform=platform_record(device))
    _say(f"\nstudy over {num_seeds} seeds: {', '.join(str(p) for p in study.values())}", dist)
    return study
