"""The pipeline's evaluation stage: from a study config and its run directory to the calls of
:mod:`rcfd.evaluation` (which checkpoints, which classifiers, which reference images)."""

from __future__ import annotations

from pathlib import Path

from rcfd.io.checkpoint import load_diffusion_checkpoint
from rcfd.evaluation import (
    References,
    build_panel,
    check_extractors_available,
    evaluate_rows,
    load_references,
    panel_names,
)
from rcfd.methods import registry
from rcfd.methods.classifier import run_classifiers
from rcfd.report.plots import plot_loss_curves
from rcfd.report.results import LOSS_PLOT, results_table, write_results
from rcfd.samplers import sampling_dtype
from rcfd.io.files import read_jsonl
from rcfd.training.rundir import checkpoint_path

FEATURES_DIR = "features"


def distilled_classifiers(cfg) -> list:
    """What the enabled methods distill into (:attr:`rcfd.methods.registry.Method.distills_into`),
    in the order the pipeline runs them."""
    found = (m.distills_into(m.view(cfg)) for m in registry.methods()
             if m.distills_into is not None and m.enabled(cfg))
    return [t for t in found if t is not None]


def _classifier_paths(cfg, run_dir: Path):
    """``(evaluation classifier, distillation classifier, its architecture)`` checkpoints of a
    run (``None`` where there is none). Only our own run's classifiers are considered: a
    distillation classifier named by path is refused as the extractor too."""
    eval_ckpt = checkpoint_path(run_dir, "classifier", "eval") if cfg.eval_classifier is not None else None
    for target in distilled_classifiers(cfg):
        c = target.source
        path = checkpoint_path(run_dir, "classifier", c) if c in ("distill", "eval") else Path(c)
        if path.is_file():
            return eval_ckpt, path, target.arch
    return eval_ckpt, None, None


def _mlp_path(cfg, run_dir: Path) -> Path | None:
    """The run's MLP classifier checkpoint (the ``mlp-classifier`` extractor), ``None`` when
    its stage is off."""
    return checkpoint_path(run_dir, "classifier", "mlp") if cfg.mlp_classifier is not None else None


def names(cfg) -> tuple[str, ...]:
    return panel_names(cfg.eval.extractors, cfg.eval.inception, cfg.eval.inception_weights)


def check_evaluation(cfg) -> str:
    """Before anything trains: the reference data loads and every extractor of the panel will
    be there. Returns a few words naming them."""
    load_references(cfg.data)
    found = check_extractors_available(names(cfg), classifier=cfg.eval_classifier is not None,
                                       inception_weights=cfg.eval.inception_weights,
                                       primary=cfg.eval.primary,
                                       mlp_classifier=cfg.mlp_classifier is not None)
    return ", ".join(f"{k} ({v})" for k, v in found.items())


def evaluate_run(cfg, rows, run_dir: Path, device, dist, progress: bool = True) -> dict | None:
    """Sample and measure every row with the run's panel; on rank 0 write the grids and
    return the results dict (``None`` on the other ranks)."""
    references, panel, classifiers = None, (), {}
    if dist.is_main:
        references = References(load_references(cfg.data), device=device,
                                batch_size=cfg.eval.batch_size, cache_dir=run_dir / FEATURES_DIR)
        eval_ckpt, distill, arch = _classifier_paths(cfg, run_dir)
        mlp = _mlp_path(cfg, run_dir)
        panel = build_panel(names(cfg), references.image_shape,
                            train_images=references.datasets["train"].images,
                            classifier=eval_ckpt, distillation_classifier=distill,
                            distillation_arch=arch, inception_weights=cfg.eval.inception_weights,
                            device=device, mlp_classifier=mlp)
        classifiers = run_classifiers(distill=distill, evaluation=eval_ckpt, mlp=mlp)

    def load_model(row):
        return load_diffusion_checkpoint(checkpoint_path(run_dir, row.stage, row.unit), device)

    results = evaluate_rows(rows, load_model, eval_cfg=cfg.eval, references=references,
                            extractors=panel, device=device, dist=dist, seed=cfg.seed,
                            progress=progress, out_dir=run_dir, teacher=("base", cfg.base.T))
    if results is not None:
        results.update(preset=cfg.name, run_dir=str(run_dir), seeds=[cfg.seed], classifiers=classifiers,
                       dtype=sampling_dtype(cfg.eval.dtype, device))
    return results


def loss_logs(run_dir: Path, stages) -> dict[str, list[dict]]:
    """Every stage's metric log in the run directory: ``{"pd/T4": records, ...}``."""
    logs = {}
    for stage in stages:
        d = run_dir / stage
        for path in sorted(d.glob("*.jsonl"), key=lambda p: _unit_order(p.stem)) if d.is_dir() else []:
            logs[f"{stage}/{path.stem}"] = read_jsonl(path)
    return logs


def _unit_order(unit: str):
    return (0, -int(unit[1:])) if unit[:1] == "T" and unit[1:].isdigit() else (1, unit)


def finish_run_report(run_dir: Path, results: dict, stages) -> dict[str, Path]:
    """Loss curves and the results files of a finished evaluation."""
    results["loss_curves"] = LOSS_PLOT
    plot_loss_curves(loss_logs(run_dir, stages), run_dir / LOSS_PLOT)
    return write_results(run_dir, results)


def summary(results: dict) -> str:
    return results_table(results)
