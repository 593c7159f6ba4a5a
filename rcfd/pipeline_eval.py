"""The pipeline's evaluation stage: from a study config and its run directory to the calls of
:mod:`rcfd.evaluation` (which checkpoints, which extractors, which reference images)."""

from __future__ import annotations

import time
from pathlib import Path

from rcfd.checkpoint import load_diffusion_checkpoint
from rcfd.errors import UsageError
from rcfd.evaluation.extractors import check_extractor_available, make_extractor
from rcfd.evaluation.measure import load_reference, measure, sample_images
from rcfd.methods.rcfd import resolve_classifier
from rcfd import report
from rcfd.report import display_scale, save_grid
from rcfd.training.logger import read_metrics
from rcfd.training.rundir import checkpoint_path

SAMPLES_DIR, GRID_IMAGES = "samples", 64


def check_evaluation(cfg) -> str:
    """Before anything trains: the reference data loads and an extractor will be there.
    Returns a few words naming the extractor."""
    load_reference(cfg.data)
    return check_extractor_available(cfg)


def _classifier_paths(cfg, run_dir: Path):
    """``(evaluation classifier, distillation classifier)`` checkpoints of a run (``None``
    where there is none)."""
    eval_ckpt = checkpoint_path(run_dir, "classifier", "eval") if cfg.eval_classifier is not None else None
    if cfg.eval.extractor == "classifier" and (eval_ckpt is None or not eval_ckpt.is_file()):
        raise UsageError(f"{eval_ckpt} does not exist: train the evaluation classifier first "
                         f"(python -m rcfd.train classifier --out {run_dir})")
    distill = resolve_classifier(cfg.rcfd, run_dir)
    distill = distill if isinstance(distill, Path) and distill.is_file() else None
    return (eval_ckpt if eval_ckpt is not None and eval_ckpt.is_file() else None), distill


def evaluate_run(cfg, rows, run_dir: Path, device, dist, progress: bool = True) -> dict | None:
    """Sample and measure every row; on rank 0 write the grids and return the results dict
    (``None`` on the other ranks)."""
    missing = [str(checkpoint_path(run_dir, r.stage, r.unit)) for r in rows
               if not checkpoint_path(run_dir, r.stage, r.unit).is_file()]
    if missing:
        raise UsageError(f"cannot evaluate: missing checkpoint(s) {', '.join(dict.fromkeys(missing))}; "
                         "run their stages first")
    reference = load_reference(cfg.data)
    shape = (reference.channels, reference.image_size, reference.image_size)
    extractor = None
    if dist.is_main:
        eval_ckpt, distill = _classifier_paths(cfg, run_dir)
        extractor = make_extractor(shape, inception_weights=cfg.eval.inception_weights,
                                   classifier=eval_ckpt, distillation_classifier=distill,
                                   distillation_arch=cfg.rcfd.classifier_arch,
                                   prefer=cfg.eval.extractor, device=device)
        print(f"evaluating with extractor {extractor.label}: {cfg.eval.num_samples} samples per "
              f"row against the {len(reference)} training images", flush=True)
    entries, loaded = [], {}
    for i, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        path = checkpoint_path(run_dir, row.stage, row.unit)
        if path not in loaded:
            loaded.clear()
            loaded[path] = load_diffusion_checkpoint(path, device)
        model, info = loaded[path]
        images = sample_images(model, info, num_samples=cfg.eval.num_samples, num_steps=row.steps,
                               sampler=row.sampler, batch_size=cfg.eval.batch_size, device=device,
                               seed=cfg.seed, dist=dist, progress=progress)
        if not dist.is_main:
            continue
        grid = Path(SAMPLES_DIR) / f"{row.key.replace('/', '_')}_{row.steps}steps.png"
        save_grid(images[:GRID_IMAGES], run_dir / grid, scale=display_scale(shape[-1]))
        print(f"[{i}/{len(rows)}] {row.label}, {row.steps} step{'s' if row.steps > 1 else ''}: ",
              end="", flush=True)
        r = measure(images, reference, extractor, device=device, run_dir=run_dir, seed=cfg.seed,
                    batch_size=cfg.eval.batch_size)
        entries.append({"method": row.method, "label": row.label, "sampler": row.sampler,
                        "key": row.key, "steps": row.steps, **r,
                        "checkpoint": str(path.relative_to(run_dir)), "grid": str(grid),
                        "seconds": round(time.perf_counter() - t0, 2)})
    if not dist.is_main:
        return None
    return {"preset": cfg.name, "dataset": cfg.data.name, "extractor": extractor.label,
            "num_samples": cfg.eval.num_samples, "num_reference": len(reference),
            "seeds": [cfg.seed], "device": str(device), "run_dir": str(run_dir), "entries": entries}


def loss_logs(run_dir: Path, stages) -> dict[str, list[dict]]:
    """Every stage's metric log in the run directory: ``{"pd/T4": records, ...}``."""
    logs = {}
    for stage in stages:
        d = run_dir / stage
        for path in sorted(d.glob("*.jsonl"), key=lambda p: _unit_order(p.stem)) if d.is_dir() else []:
            logs[f"{stage}/{path.stem}"] = read_metrics(path)
    return logs


def _unit_order(unit: str):
    return (0, -int(unit[1:])) if unit[:1] == "T" and unit[1:].isdigit() else (1, unit)


def finish_run_report(run_dir: Path, results: dict, stages) -> dict[str, Path]:
    """Loss curves and the results files of a finished evaluation."""
    results["loss_curves"] = report.LOSS_PLOT
    report.plot_loss_curves(loss_logs(run_dir, stages), run_dir / report.LOSS_PLOT)
    return report.write_results(run_dir, results)


def summary(results: dict) -> str:
    return report.results_table(results) + "\n" + report.extractor_note(results)
