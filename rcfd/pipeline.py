"""The whole study, stage by stage, in one run directory (DESIGN.md, "Data flow")::

    classifier (distillation + evaluation) -> base -> PD rounds -> RCFD rounds -> evaluate

:func:`run_pipeline` runs one stage or all of them and times each; :func:`evaluate_run`
samples every (method, steps) pair, measures IS/FID/KID and writes the report;
:func:`run_study` repeats the pipeline per seed and aggregates mean ± std. The run
directory holds, besides the trainers' checkpoints and metric logs (see
:mod:`rcfd.trainers.rundir`): ``config.json``, ``timings.json``, ``samples/<method>_<steps>steps.png``,
``loss_curves.png``, ``fid_vs_steps.png``, ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rcfd import report
from rcfd.train import UsageError

log = logging.getLogger("rcfd")

TRAIN_STAGES = ("classifier", "base", "pd", "rcfd")
TIMINGS_JSON, SAMPLES_DIR, GRID_IMAGES = "timings.json", "samples", 64


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


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# --------------------------------------------------------------------------- header and plan


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line(device: torch.device, dist) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        what = f"{device} {p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = f"cpu {cpu_name()}"
    world = f", {dist.world_size} processes ({dist.backend})" if dist.enabled else ""
    return f"{what}, {torch.get_num_threads()} threads{world}"


def backend_line(device: torch.device) -> str:
    from rcfd import ops

    what = {"extension": "fused kernel of rcfd._C", "triton": "Triton kernel", "reference": "PyTorch reference"}
    parts = [f"{op} -> {(b := ops.backend(op, device))} ({what.get(b, b)})" for op in ("ddim_update", "feature_kl")]
    if not ops.extension_loaded():
        parts.append(f"(extension rcfd._C not loaded: {ops.extension_error()})")
    return ", ".join(parts)


def stage_plan(cfg, num_train: int) -> dict[str, str]:
    """One line per stage saying what it trains or measures."""
    from rcfd.config import halving_rounds

    def clf(c):
        steps = c.steps if c.steps is not None else c.epochs * (num_train // c.batch_size)
        return f"{c.role} {c.arch}{'' if c.width is None else f' (width {c.width})'}, {steps} steps"

    pd_rounds = halving_rounds(cfg.base.T, cfg.pd.final_T)
    rc_rounds = halving_rounds(cfg.rcfd.start_T, cfg.rcfd.final_T)
    loss = cfg.rcfd.loss
    pairs = evaluation_pairs(cfg)
    return {
        "classifier": ", ".join(clf(c) for c in cfg.classifier_stages()),
        "base": f"T={cfg.base.T}, {cfg.base.steps} steps, batch {cfg.base.batch_size}",
        "pd": f"{cfg.base.T} -> {cfg.pd.final_T}: {len(pd_rounds)} rounds, "
              f"{sum(cfg.pd.round_steps(s) for _, s in pd_rounds)} steps",
        "rcfd": f"{cfg.rcfd.start_T} -> {cfg.rcfd.final_T}: {len(rc_rounds)} rounds, "
                f"{sum(cfg.rcfd.round_steps(s) for _, s in rc_rounds)} steps, classifier "
                f"{cfg.rcfd.classifier}, tau {loss.tau}, alpha {loss.alpha}, beta {loss.beta}",
        "evaluate": f"{len(pairs)} (method, steps) pairs x {cfg.eval.num_samples} samples, "
                    f"extractor {cfg.eval.extractor}",
    }


def header(cfg, run_dir: Path, device: torch.device, dist, source: str) -> str:
    import rcfd

    return "\n".join([
        f"rcfd {rcfd.__version__} | torch {torch.__version__} | python {platform.python_version()}",
        f"device   {device_line(device, dist)}",
        f"backends {backend_line(device)}",
        f"config   {cfg.name} ({source}), seed {cfg.seed}, data {cfg.data.name}"
        f"{'' if cfg.data.path is None else ' at ' + cfg.data.path}",
        f"run dir  {run_dir}",
    ])


# --------------------------------------------------------------------------- training stages


def _ckpt(run_dir: Path, stage: str, unit: str) -> Path:
    from rcfd.trainers.rundir import checkpoint_path

    return checkpoint_path(run_dir, stage, unit)


def _need(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{path} does not exist: run the {stage} stage first "
                         f"(python -m rcfd.train {stage} --out {path.parent.parent})")
    return path


def run_stage(stage: str, cfg, run) -> list[Path]:
    """Train one stage with the trainers; returns the checkpoints it wrote (or kept)."""
    from rcfd import trainers

    d = run.run_dir
    if stage == "classifier":
        return [trainers.train_classifier(c, cfg.data, run) for c in cfg.classifier_stages()]
    if stage == "base":
        return [trainers.train_base(cfg.base, cfg.data, run)]
    if stage == "pd":
        return trainers.train_pd(cfg.pd, _need(_ckpt(d, "base", "model"), "base"), cfg.data, run)
    if stage == "rcfd":
        teacher = _need(_ckpt(d, "pd", f"T{cfg.rcfd.start_T}"), "pd")
        classifier = trainers.resolve_classifier(cfg.rcfd, d)
        if isinstance(classifier, Path):
            _need(classifier, "classifier")
        return trainers.train_rcfd(cfg.rcfd, teacher, classifier, cfg.data, run)
    raise ValueError(f"unknown stage {stage!r}")


def _record_timing(run_dir: Path, stage: str, seconds: float) -> dict:
    path = run_dir / TIMINGS_JSON
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = round(seconds, 2)
    order = {s: i for i, s in enumerate((*TRAIN_STAGES, "evaluate"))}
    timings = dict(sorted(timings.items(), key=lambda kv: order.get(kv[0], 99)))
    path.write_text(json.dumps(timings, indent=2) + "\n")
    return timings


def _write_config(cfg, run_dir: Path, dist) -> None:
    from rcfd.config import save_config

    path = run_dir / "config.json"
    if dist.is_main:
        if path.is_file():
            old = json.loads(path.read_text())
            changed = [k for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k)]
            if changed:
                _say(f"note: {path} held another config (sections {', '.join(sorted(changed))} differ); "
                     "writing the new one")
        save_config(cfg, path)


# --------------------------------------------------------------------------- evaluation


def evaluation_pairs(cfg) -> list[tuple[str, int, str, str]]:
    """``(method, steps, stage, unit)`` of every sampler to measure: DDIM on the base model
    at ``eval.base_steps`` (``eval.steps`` when those are empty and ``methods`` has "base"),
    and each distilled student whose ``T`` is in ``eval.steps``."""
    from rcfd.config import halving_rounds

    base_steps = cfg.eval.base_steps or (cfg.eval.steps if "base" in cfg.eval.methods else ())
    pairs = [("base", s, "base", "model") for s in sorted(base_steps)]
    students = {"pd": {s for _, s in halving_rounds(cfg.base.T, cfg.pd.final_T)},
                "rcfd": {s for _, s in halving_rounds(cfg.rcfd.start_T, cfg.rcfd.final_T)}}
    for method in ("pd", "rcfd"):
        if method in cfg.eval.methods:
            pairs += [(method, s, method, f"T{s}") for s in sorted(cfg.eval.steps) if s in students[method]]
    return pairs


def evaluate_run(cfg, run_dir: Path, device: torch.device, dist, options: RunOptions) -> dict | None:
    """Sample and measure every pair of :func:`evaluation_pairs`; on rank 0 write the grids,
    the loss curves and the results (``results.json``, ``results.md``, FID plot) and return
    the results dict (``None`` on the other ranks)."""
    from rcfd.checkpoint import load_diffusion_checkpoint
    from rcfd.evaluate import extractor_for_run, load_reference, measure, sample_images

    pairs = evaluation_pairs(cfg)
    missing = [str(_ckpt(run_dir, st, u)) for _, _, st, u in pairs if not _ckpt(run_dir, st, u).is_file()]
    if missing:
        raise UsageError(f"cannot evaluate: missing checkpoint(s) {', '.join(missing)}; run their stages first")
    reference = load_reference(cfg.data)
    shape = (reference.channels, reference.image_size, reference.image_size)
    extractor = extractor_for_run(cfg, run_dir, shape, device) if dist.is_main else None
    if dist.is_main:
        _say(f"evaluating with extractor {extractor.label}: {cfg.eval.num_samples} samples per pair "
             f"against the {len(reference)} training images")
    entries, loaded = [], {}
    for i, (method, steps, stage, unit) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        path = _ckpt(run_dir, stage, unit)
        if path not in loaded:
            loaded.clear()
            loaded[path] = load_diffusion_checkpoint(path, device)
        model, info = loaded[path]
        images = sample_images(model, info, num_samples=cfg.eval.num_samples, num_steps=steps,
                               batch_size=cfg.eval.batch_size, device=device, seed=cfg.seed, dist=dist,
                               progress=options.progress)
        if not dist.is_main:
            continue
        grid = Path(SAMPLES_DIR) / f"{method}_{steps}steps.png"
        report.save_grid(images[:GRID_IMAGES], run_dir / grid, scale=report.display_scale(shape[-1]))
        print(f"[{i}/{len(pairs)}] {report.METHOD_LABELS[method]}, {steps} step{'s' if steps > 1 else ''}: ",
              end="", flush=True)
        r = measure(images, reference, extractor, device=device, run_dir=run_dir, seed=cfg.seed,
                    batch_size=cfg.eval.batch_size)
        entries.append({"method": method, "steps": steps, **r,
                        "checkpoint": str(path.relative_to(run_dir)), "grid": str(grid),
                        "seconds": round(time.perf_counter() - t0, 2)})
    if not dist.is_main:
        return None
    return {"preset": cfg.name, "dataset": cfg.data.name, "extractor": extractor.label,
            "num_samples": cfg.eval.num_samples, "num_reference": len(reference), "seeds": [cfg.seed],
            "distillation_classifier": _distillation_name(cfg),
            "evaluation_classifier": None if cfg.eval_classifier is None else cfg.eval_classifier.arch,
            "device": str(device), "run_dir": str(run_dir), "entries": entries}


def _distillation_name(cfg) -> str:
    c = cfg.rcfd.classifier
    if c == "distill":
        return cfg.distill_classifier.arch
    if c == "eval" and cfg.eval_classifier is not None:
        return cfg.eval_classifier.arch
    return cfg.rcfd.classifier_arch or Path(c).stem


def loss_logs(run_dir: Path) -> dict[str, list[dict]]:
    """Every stage's metric log in the run directory: ``{"pd/T4": records, ...}``."""
    logs = {}
    for stage in TRAIN_STAGES:
        d = run_dir / stage
        for path in sorted(d.glob("*.jsonl"), key=lambda p: _unit_order(p.stem)) if d.is_dir() else []:
            logs[f"{stage}/{path.stem}"] = report.read_jsonl(path)
    return logs


def _unit_order(unit: str):
    return (0, -int(unit[1:])) if unit[:1] == "T" and unit[1:].isdigit() else (1, unit)


def finish_report(run_dir: Path, results: dict) -> dict[str, Path]:
    """Loss curves, timings and results files of a finished evaluation."""
    timings_path = run_dir / TIMINGS_JSON
    results["timings"] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    results["loss_curves"] = report.LOSS_PLOT
    report.plot_loss_curves(loss_logs(run_dir), run_dir / report.LOSS_PLOT)
    return report.write_results(run_dir, results)


# --------------------------------------------------------------------------- the pipeline


def setup(cfg):
    """Join torchrun's process group (if any), pick the device and thread count."""
    from rcfd import distributed

    try:
        dist = distributed.init_distributed(cfg.device)
        device = distributed.resolve_device(cfg.device, dist)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"device {cfg.device!r}: {e}") from None
    if device.type == "cpu" or cfg.threads is not None:
        from rcfd.trainers.loop import configure_threads

        # torchrun's processes on this machine share its cores
        configure_threads(cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    return dist, device


def run_pipeline(cfg, run_dir: str | os.PathLike, *, stage: str = "all",
                 options: RunOptions = RunOptions(), source: str = "preset", dist=None,
                 device=None) -> dict | None:
    """Run ``stage`` (or ``"all"``) of the study described by ``cfg`` in ``run_dir``; after
    an evaluation, the results dict (rank 0)."""
    from rcfd.evaluate import check_extractor_available, load_reference
    from rcfd.trainers import RunContext

    run_dir = Path(run_dir)
    if dist is None:
        dist, device = setup(cfg)
    stages = [*TRAIN_STAGES, "evaluate"] if stage == "all" else [stage]
    reference = load_reference(cfg.data)  # a missing or unreadable data path fails here, first
    extractor = check_extractor_available(cfg) if "evaluate" in stages else None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _say(header(cfg, run_dir, device, dist, source), dist)
    plan = stage_plan(cfg, len(reference))
    if extractor is not None:
        plan["evaluate"] += f": {extractor}"
    for i, s in enumerate(stages, 1):
        _say(f"  [{i}/{len(stages)}] {s:<10} {plan[s]}", dist)
    _write_config(cfg, run_dir, dist)
    run = RunContext(run_dir=run_dir, device=device, seed=cfg.seed, resume=options.resume,
                     overwrite=options.overwrite, skip_nonfinite=options.skip_nonfinite,
                     progress=options.progress, dist=dist)
    t_start, results = time.perf_counter(), None
    for i, s in enumerate(stages, 1):
        _say(f"\n== [{i}/{len(stages)}] {s}: {plan[s]}", dist)
        t0 = time.perf_counter()
        if s == "evaluate":
            results = evaluate_run(cfg, run_dir, device, dist, options)
        else:
            paths = run_stage(s, cfg, run)
            _say(f"   checkpoints: {', '.join(str(p) for p in paths)}", dist)
        seconds = time.perf_counter() - t0
        if dist.is_main:
            _record_timing(run_dir, s, seconds)
        _say(f"== {s} done in {_fmt_time(seconds)} (elapsed {_fmt_time(time.perf_counter() - t_start)})", dist)
    if results is not None:
        paths = finish_report(run_dir, results)
        _say("\n" + report.results_table(results) + "\n" + report.extractor_note(results), dist)
        _say(f"\nresults: {paths['md']} (table), {paths['json']}, {paths['fid_plot']}, "
             f"{run_dir / report.LOSS_PLOT}, sample grids in {run_dir / SAMPLES_DIR}", dist)
    _say(f"total {_fmt_time(time.perf_counter() - t_start)}", dist)
    return results


def run_study(cfg, out: str | os.PathLike, *, num_seeds: int, stage: str = "all",
              options: RunOptions = RunOptions(), source: str = "preset") -> dict | None:
    """The pipeline once per seed ``cfg.seed + k`` in ``out/seed<seed>``, then (after an
    evaluation) the mean and std over seeds in ``out/results.{json,md}``."""
    out = Path(out)
    dist, device = setup(cfg)
    seeds = [cfg.seed + k for k in range(num_seeds)]
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, out, dist)
    per_seed = []
    for k, seed in enumerate(seeds, 1):
        _say(f"\n######## seed {seed} ({k}/{num_seeds})", dist)
        r = run_pipeline(cfg.with_overrides({"seed": seed}), out / f"seed{seed}", stage=stage,
                         options=options, source=source, dist=dist, device=device)
        per_seed.append(r)
    if not dist.is_main or stage not in ("all", "evaluate"):
        return None
    agg = report.aggregate(per_seed)
    agg["runs"] = [f"seed{s}" for s in seeds]
    paths = report.write_results(out, agg, title=f"Results: {cfg.name}, {num_seeds} seeds (mean ± std)")
    _say("\n" + report.results_table(agg), dist)
    _say(f"\nresults over {num_seeds} seeds: {paths['md']}, {paths['json']}, {paths['fid_plot']}", dist)
    return agg
