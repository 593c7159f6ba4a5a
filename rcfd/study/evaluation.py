"""The pipeline's evaluation stage: from a study config and its run directory to the calls of
:mod:`rcfd.evaluation` (which checkpoints, which classifiers, which reference images), and
the objective diagnostics of every distilled student (:mod:`rcfd.evaluation.objectives`)."""

from __future__ import annotations

import time
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
from rcfd.core.classifiers import frozen
from rcfd.evaluation.objectives import held_out_draws, student_losses, teacher_side
from rcfd.losses import RCFDLossConfig
from rcfd.methods import registry
from rcfd.methods.classifier import load_classifier, run_classifiers
from rcfd.methods.rcfd import resolve_classifier
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
                            progress=progress, out_dir=run_dir, teacher=("base", cfg.base.T),
                            checkpoint_name=lambda row: checkpoint_path(
                                run_dir, row.stage, row.unit).relative_to(run_dir).as_posix())
    if results is not None:
        results.update(preset=cfg.name, run_dir=str(run_dir), seeds=[cfg.seed], classifiers=classifiers,
                       dtype=sampling_dtype(cfg.eval.dtype, device),
                       diagnostics=objective_diagnostics(cfg, rows, run_dir, references, device))
    return results


# --------------------------------------------------------------------------- diagnostics


def distillation_objective(cfg):
    """The section of the first enabled method that distills into a classifier with an RCFD
    loss (``rcfd``, else ``cfd``): its ``classifier`` and ``loss`` are what the diagnostics'
    CFD loss uses. ``None`` when no such method runs."""
    for m in registry.methods():
        if m.distills_into is None or not m.enabled(cfg):
            continue
        for name in m.sections:
            section = getattr(cfg, name, None)
            if isinstance(getattr(section, "loss", None), RCFDLossConfig):
                return section
    return None


def _in_run(run_dir: Path, recorded) -> Path | None:
    """A checkpoint a student records as its teacher, as ``<stage>/<unit>.pt`` of this run
    directory (the run may have moved since); ``None`` when it is not there."""
    if not recorded:
        return None
    path = run_dir / Path(str(recorded)).parent.name / Path(str(recorded)).name
    return path if path.is_file() else None


def _checkpoints(rows, run_dir: Path):
    """``(row, path)`` of every evaluated checkpoint, once each, in row order."""
    seen = {}
    for row in rows:
        seen.setdefault(checkpoint_path(run_dir, row.stage, row.unit), row)
    return [(row, path) for path, row in seen.items()]


class _Diagnose:
    """One row of the diagnostics per checkpoint (:meth:`__call__`), each teacher's share
    computed once (a PD student and an RCFD student of ``pd/T8`` share it)."""

    def __init__(self, run_dir: Path, device, classifier, loss, draws):
        self.run_dir, self.device, self.classifier, self.loss, self.draws = run_dir, device, classifier, loss, draws
        self.sides: dict = {}

    def side(self, path: Path):
        if path not in self.sides:
            teacher, info = load_diffusion_checkpoint(path, self.device)
            self.sides[path] = (info, teacher_side(teacher, info, self.classifier, self.loss, self.draws))
        return self.sides[path]

    def __call__(self, row, path: Path) -> dict | None:
        """``None`` when the checkpoint is not a halving round of a teacher in this run (the
        base model, a CD student, a student of an outside teacher)."""
        student, info = load_diffusion_checkpoint(path, self.device)
        teacher_path = _in_run(self.run_dir, info.extra.get("teacher"))
        if teacher_path is None:
            return None
        teacher_info, side = self.side(teacher_path)
        if (teacher_info.T, 2 * teacher_info.time_scale) != (2 * info.T, info.time_scale):
            return None
        return {"key": row.key, "label": row.label, "checkpoint": _rel(path, self.run_dir),
                "teacher_checkpoint": _rel(teacher_path, self.run_dir), "T": info.T,
                "teacher_T": teacher_info.T, **student_losses(side, student, info.prediction)}


def objective_diagnostics(cfg, rows, run_dir: Path, references, device) -> dict | None:
    """The ``diagnostics`` of ``results.json``: every distilled student's PD and CFD losses
    and its teacher's, on one fixed set of held-out draws (:mod:`rcfd.evaluation.objectives`),
    with what they were computed with and how long it took. ``None`` when
    ``eval.diagnostics`` is 0, the run has no distillation classifier (none configured, or
    not trained: no CFD loss to compute) or no distilled student."""
    section = distillation_objective(cfg)
    if section is None or not cfg.eval.diagnostics:
        return None
    source = resolve_classifier(section, run_dir)
    if isinstance(source, Path) and not source.is_file():
        return None
    t0 = time.perf_counter()
    split = "test" if "test" in references.datasets else "train"
    images = references.datasets[split]
    draws = held_out_draws(images, cfg.seed, cfg.eval.diagnostics)
    classifier = frozen(load_classifier(source, device, section.classifier_arch,
                                        in_channels=images.channels))
    diagnose = _Diagnose(run_dir, device, classifier, section.loss, draws)
    found = (diagnose(row, path) for row, path in _checkpoints(rows, run_dir))
    out_rows = [r for r in found if r is not None]
    if not out_rows:
        return None
    loss = section.loss
    return {"num_samples": draws.x0.shape[0], "split": split, "seed": cfg.seed, "draws": draws.fingerprint,
            "classifier": _rel(Path(source), run_dir) if isinstance(source, Path) else str(source),
            "loss": {"tau": loss.tau, "kl_on": loss.kl_on, "dual_temperature": loss.dual_temperature,
                     "pd_kind": "both"},
            "rows": out_rows, "seconds": round(time.perf_counter() - t0, 2)}


def _rel(path: Path, run_dir: Path) -> str:
    try:
        return Path(path).relative_to(run_dir).as_posix()
    except ValueError:
        return Path(path).name


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
