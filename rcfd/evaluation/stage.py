"""The evaluation stage the pipeline calls: sample every row, measure it with the panel
against both reference splits, measure the noise floors, and return the results dict that
``results.json`` holds (:mod:`rcfd.report.results` turns it into ``results.md``).

    references = References(load_references(spec), device=device, cache_dir=run_dir / "features")
    panel = build_panel(names, references.image_shape, train_images=references.datasets["train"].images,
                        classifier=eval_ckpt, distillation_classifier=distill_ckpt, device=device)
    results = evaluate_rows(rows, load_model, eval_cfg=cfg.eval, references=references,
                            extractors=panel, device=device, dist=dist, seed=cfg.seed, out_dir=run_dir)

Every row is sampled from the same noise (the run's ``seed``), so the grids of the rows show
the same samples side by side. The two-seed floor samples the floor rows a second time from
``seed + FLOOR_SEED_OFFSET``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rcfd import distributed
from rcfd.errors import ConfigError, UsageError
from rcfd.evaluation.extractors import DEFAULT_EXTRACTORS
from rcfd.evaluation.features import FeatureExtractor
from rcfd.evaluation.measure import sample_images
from rcfd.evaluation.panel import (
    References,
    data_floor,
    measure_panel,
    panel_features,
    protocol,
    two_seed_floor,
)
from rcfd.io.grids import display_scale, save_grid
from rcfd.io.modelfile import MODEL_SUFFIX
from rcfd.report.plots import save_sample_table

FLOOR_SEED_OFFSET = 1_000_003
GRID_DIR, SIDE_BY_SIDE = "samples", "samples/side_by_side.png"
SIDE_BY_SIDE_IMAGES = 8
FLOOR_MODES = ("first", "all", "none")


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation stage reads of the ``eval`` config section (any object with these
    attributes; missing ones take these defaults). These are THE evaluation defaults: the
    study's ``eval`` section (:class:`rcfd.study.config.EvalConfig`) and ``python -m
    rcfd.evaluate`` take theirs from here, and say where they override one.

    * ``num_samples`` per row (and per floor set): 50,000 by default, the standard FID sample
      count (the presets set their own); ``batch_size`` for sampling and features;
    * ``primary``: the extractor of the Table-1-shaped table and the flattened ``fid``/``kid``/
      ``is`` of each entry; ``reference``: its split (``"test"``, the held-out images);
    * ``floor``: which rows are sampled a second time for the two-seed floor: ``"first"``
      (the first row given), ``"all"``, ``"none"``, or a row key (its row with the fewest
      steps: the cheapest, e.g. ``"pd"`` for the one-step PD student);
    * ``grid_images``: images per row in its sample grid."""

    num_samples: int = 50_000
    batch_size: int = 500
    extractors: tuple[str, ...] = DEFAULT_EXTRACTORS
    primary: str = "classifier"
    reference: str = "test"
    floor: str = "first"
    grid_images: int = 64
    dtype: str = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> EvalSettings:
        if isinstance(cfg, cls):
            return cfg
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        if "extractors" in values:
            values["extractors"] = tuple(values["extractors"])
        return cls(**values)

    def check(self, names: Sequence[str], splits: Sequence[str]) -> None:
        if self.primary not in names:
            raise ConfigError(f"eval.primary={self.primary!r} is not one of the extractors {list(names)}")
        if self.reference not in splits:
            raise ConfigError(f"eval.reference={self.reference!r}: the data has only the splits {list(splits)}")
        if self.num_samples < 20 or self.batch_size < 1:
            raise ConfigError(f"eval.num_samples must be >= 20 and batch_size >= 1, got "
                              f"{self.num_samples}, {self.batch_size}")


def floor_rows(rows: Sequence, floor: str) -> list:
    """The rows sampled twice for the two-seed floor (:class:`EvalSettings`, ``floor``)."""
    if floor in FLOOR_MODES:
        return {"first": list(rows[:1]), "all": list(rows), "none": []}[floor]
    mine = [r for r in rows if r.key == floor]
    if not mine:
        raise ConfigError(f"eval.floor must be one of {FLOOR_MODES} or a row key "
                          f"({sorted({r.key for r in rows})}), got {floor!r}")
    return [min(mine, key=lambda r: r.steps)]


def _grid_name(row, steps: int) -> str:
    return f"{GRID_DIR}/{row.key.replace('/', '-')}_{steps}steps.png"


def _entry(row, metrics: Mapping, primary: str, reference: str,
           checkpoint_name: Callable[[Any], str] | None) -> dict:
    p = metrics[primary]
    checkpoint = (checkpoint_name(row) if checkpoint_name is not None
                  else f"{row.stage}/{row.unit}{MODEL_SUFFIX}")
    return {"method": row.method, "label": row.label, "sampler": row.sampler, "steps": row.steps,
            "key": row.key, "metrics": metrics, "fid": p[reference]["fid"], "kid": p[reference]["kid"],
            "is": p["is"], "precision": p[reference]["precision"], "recall": p[reference]["recall"],
            "checkpoint": checkpoint}


class _ModelCache:
    """The last loaded model (rows of one checkpoint follow each other)."""

    def __init__(self, load_model: Callable):
        self.load_model, self.key, self.value = load_model, None, None

    def __call__(self, row):
        if self.key != (row.stage, row.unit):
            self.value = None  # free the previous model first
            self.value, self.key = self.load_model(row), (row.stage, row.unit)
        return self.value


def evaluate_rows(rows: Sequence, load_model: Callable, *, eval_cfg: Any, references: References,
                  extractors: Sequence[FeatureExtractor], device: Any = "cpu", dist=None, seed: int = 0,
                  progress: bool = True, use_cuda_graph: bool = True, out_dir: str | Path | None = None,
                  teacher: tuple[str, int] | None = None, say: Callable[[str], None] = print,
                  checkpoint_name: Callable[[Any], str] | None = None) -> dict | None:
    """Sample and measure every row (``rows``: :class:`rcfd.methods.registry.Row` in table
    order; ``load_model(row) -> (model, info)`` of its checkpoint), then the floors. Under
    torchrun every rank samples its share and rank 0 measures; the other ranks get ``None``
    (and may pass ``references=None, extractors=()``: only rank 0 uses them).
    ``out_dir``: where the sample grids go (``samples/``); ``teacher``: ``(key, steps)`` of
    the row that is the distillation teacher (labelled as the upper bound in reports);
    ``checkpoint_name(row)``: the entry's ``checkpoint`` (default ``<stage>/<unit>.safetensors``).
    Returns the results dict (module docstring of :mod:`rcfd.report.results`)."""
    cfg = EvalSettings.from_config(eval_cfg)
    dist = dist or distributed.SINGLE
    names = [e.name for e in extractors]
    if dist.is_main:
        cfg.check(names, references.splits)
    if not rows:
        raise UsageError("nothing to evaluate: no rows (no method produced a sampler)")
    cache, entries, cells = _ModelCache(load_model), [], {}
    twice = floor_rows(rows, cfg.floor)
    floors: dict[str, Any] = {"two_seeds": [], "test_vs_train": None}
    if dist.is_main:
        floors["test_vs_train"] = data_floor(extractors, references, seed=seed)
    for i, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        model, info = cache(row)
        sample = {"num_samples": cfg.num_samples, "num_steps": row.steps, "sampler": row.sampler,
                  "batch_size": cfg.batch_size, "device": device, "dist": dist, "progress": progress,
                  "use_cuda_graph": use_cuda_graph, "dtype": cfg.dtype}
        images = sample_images(model, info, seed=seed, **sample)
        t1 = time.perf_counter()
        second = sample_images(model, info, seed=seed + FLOOR_SEED_OFFSET, **sample) if row in twice else None
        if not dist.is_main:
            continue
        feats = panel_features(images, extractors, device=device, batch_size=cfg.batch_size)
        metrics = measure_panel(feats, extractors, references, seed=seed)
        entry = _entry(row, metrics, cfg.primary, cfg.reference, checkpoint_name)
        if second is not None:
            floors["two_seeds"].append({
                "key": row.key, "label": row.label, "steps": row.steps, "num_samples": cfg.num_samples,
                "seeds": [seed, seed + FLOOR_SEED_OFFSET],
                "metrics": two_seed_floor(feats, panel_features(second, extractors, device=device,
                                                                batch_size=cfg.batch_size),
                                          metrics, extractors, references, seed=seed)})
        if out_dir is not None:
            entry["grid"] = _grid_name(row, row.steps)
            save_grid(images[:cfg.grid_images], Path(out_dir) / entry["grid"],
                      scale=display_scale(images.shape[-1]))
        cells[(row.key, row.label, row.steps)] = images[:SIDE_BY_SIDE_IMAGES]
        entry.update(sample_seconds=round(t1 - t0, 2), seconds=round(time.perf_counter() - t0, 2))
        entries.append(entry)
        say(f"[{i}/{len(rows)}] {row.label}, {row.steps} step{'s' if row.steps > 1 else ''}: "
            + format_metrics(metrics, cfg.reference))
    if not dist.is_main:
        return None
    results = {
        "dataset": references.name, "seed": seed, "extractors": names,
        "extractor_details": {e.name: e.detail for e in extractors},
        "primary": {"extractor": cfg.primary, "reference": cfg.reference},
        "num_samples": cfg.num_samples, "num_reference": references.counts, "measurement": protocol(),
        "teacher": None if teacher is None else {"key": teacher[0], "steps": teacher[1]},
        "floors": floors, "entries": entries, "device": str(device),
    }
    if out_dir is not None and cells:
        save_sample_table(cells, Path(out_dir) / SIDE_BY_SIDE)
        results["side_by_side"] = SIDE_BY_SIDE
    return results


def format_metrics(metrics: Mapping[str, Mapping], reference: str = "test") -> str:
    """One line per extractor, every number named: ``[random-conv vs test] FID 1.23 KID 0.0045
    P 0.81 R 0.77 | vs train FID ...`` (+ ``IS`` where the extractor has logits)."""
    lines = []
    for name, m in metrics.items():
        parts = []
        for split in sorted((s for s in m if s in ("test", "train")), key=lambda s: s != reference):
            r = m[split]
            parts.append(f"vs {split} FID {r['fid']:.4f} KID {r['kid']:.5f} P {r['precision']:.3f} "
                         f"R {r['recall']:.3f}")
        isc = f" | IS {m['is']:.3f} ± {m['is_std']:.3f}" if m.get("is") is not None else ""
        lines.append(f"[{name}] " + " | ".join(parts) + isc)
    return "\n    ".join([""] + lines)
