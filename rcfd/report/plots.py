"""The figures a run leaves behind: every row's samples side by side, the curves of every
term each stage logged (:data:`BOOKKEEPING` aside), FID against steps per extractor, and the
paired differences of a study with their confidence intervals. Pure functions of plain data plus the file they write.

matplotlib is imported inside the plotting functions (with ``Agg``): it is slow to import
and only the report needs it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rcfd.io.files import atomic_write
from rcfd.io.grids import image_grid

# --------------------------------------------------------------------------- loss curves

# The fields of a metric log that are bookkeeping, not terms: where the step is, how fast it
# went, the optimiser's settings. Every other finite number a stage logs (its loss, every term
# of its objective, whatever a plug-in method logs, the metrics of its eval_fn) is plotted.
BOOKKEEPING = ("step", "epoch", "position", "time", "elapsed", "lr", "grad_norm", "seconds",
               "images_per_s", "steps_per_s", "rank", "round", "T", "time_scale", "skipped")


def loss_series(records: Iterable[Mapping]) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` of every finite numeric field of a metric log's records
    except the :data:`BOOKKEEPING` ones (so every logged term is a series, whatever its
    name); booleans and non-numbers are left out. Records without a ``step`` are numbered."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, rec in enumerate(records):
        step = rec.get("step", i)
        for key, v in rec.items():
            if key in BOOKKEEPING or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                steps, values = out.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(v))
    return out


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_panels(logs: Mapping[str, Sequence[Mapping]]) -> list[tuple[str, dict]]:
    """``[(stage, series)]``: the panels of :func:`plot_loss_curves`, one per stage with at
    least one series (:func:`loss_series`), ``loss`` first and the other terms by name."""
    panels = []
    for name, recs in logs.items():
        series = {k: v for k, v in loss_series(recs).items() if v[1]}
        if series:
            panels.append((name, dict(sorted(series.items(), key=lambda kv: (kv[0] != "loss", kv[0])))))
    return panels


def _value_scale(series: Mapping[str, tuple[list[int], list[float]]]) -> tuple[str, dict]:
    """A log axis when every value is positive; otherwise symmetric-log (terms that go
    negative or reach zero, such as the diversity term, are still drawn), linear near zero
    below the smallest non-zero magnitude."""
    values = [v for _, vs in series.values() for v in vs]
    if min(values) > 0:
        return "log", {}
    tiny = [abs(v) for v in values if v != 0]
    return "symlog", {"linthresh": min(tiny) if tiny else 1.0}


def plot_loss_curves(logs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """One panel per stage (``logs``: stage name -> metric-log records), every logged term
    (:func:`loss_panels`) against the step, on a log axis (symmetric-log when a term is not
    positive), smoothed when long. Stages without a term are skipped; with none at all the
    figure says so."""
    plt = _pyplot()
    panels = loss_panels(logs)
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no loss records", ha="center", va="center")
    for ax, (name, series) in zip(axes.flat, panels):
        for i, (key, (steps, values)) in enumerate(series.items()):
            color = f"C{i % 10}"
            if len(values) > 50:
                ax.plot(steps, values, color=color, linewidth=0.5, alpha=0.3)
                ax.plot(steps, smooth(values, max(5, len(values) // 25)), color=color, linewidth=1.2, label=key)
            else:
                ax.plot(steps, values, color=color, linewidth=1.2, label=key)
        scale, kw = _value_scale(series)
        ax.set_yscale(scale, **kw)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save_figure(fig, path)


def _pyplot():
    import matplotlib  # slow to import; only figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path) -> Path:
    plt = _pyplot()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)




# --------------------------------------------------------------------------- rows side by side


def _steps_label(steps: int) -> str:
    return f"{steps} step{'s' if steps != 1 else ''}"


def save_sample_table(cells: Mapping[tuple[str, str, int], torch.Tensor], path: str | os.PathLike,
                      per_row: int = 4) -> Path:
    """One figure of every row's samples side by side: ``cells`` maps ``(key, label, steps)``
    to a few uint8 images (the same noise in every cell); one figure row per ``(key,
    label)`` in the order given, one column per number of steps (ascending), each cell a
    small grid of ``per_row`` images a line."""
    if not cells:
        raise ValueError("no samples to show")
    rows = list(dict.fromkeys((k, label) for k, label, _ in cells))
    steps = sorted({s for _, _, s in cells})
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(steps), squeeze=False,
                             figsize=(1.2 + 1.6 * len(steps), 0.4 + 1.0 * len(rows)))
    for r, (key, label) in enumerate(rows):
        for c, s in enumerate(steps):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                ax.set_title(_steps_label(s), fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            images = cells.get((key, label, s))
            if images is not None:
                grid = image_grid(images, nrow=per_row, pad=1)
                ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255,
                          interpolation="nearest")
    fig.tight_layout()
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- metrics


def plot_metric_vs_steps(series: Mapping[str, Mapping[str, Sequence[tuple[int, float, float]]]],
                         path: str | os.PathLike, *, metric: str = "FID", note: str = "") -> Path:
    """One panel per extractor (``series``: extractor -> row label -> ``[(steps, value,
    error)]``), the metric against the number of steps on a log2 axis, error bars where the
    error is non-zero (the spread over seeds); the value axis is logarithmic when the values
    are positive and span more than 20-fold."""
    plt = _pyplot()
    n = max(1, len(series))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    markers = "os^vD<>pP*"
    for ax, (extractor, rows) in zip(axes.flat, series.items()):
        ticks = set()
        values = []
        for i, (label, pts) in enumerate(rows.items()):
            pts = sorted(p for p in pts if p[1] is not None and math.isfinite(p[1]))
            if not pts:
                continue
            xs, ys, err = zip(*pts)
            ticks.update(xs)
            values += ys
            ax.errorbar(xs, ys, yerr=err if any(err) else None, fmt=markers[i % len(markers)] + "-",
                        capsize=3, label=label, linewidth=1.1, markersize=4)
        ax.set_xscale("log", base=2)
        if values and min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}, extractor {extractor}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if note:
        fig.suptitle(note, fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_paired_differences(rows: Sequence[Mapping], path: str | os.PathLike, *, metric: str = "fid") -> Path:
    """The paired differences of a study (:func:`rcfd.report.stats.paired_comparisons` rows of one
    ``metric`` and reference): one panel per extractor, per comparison the mean difference
    at each step count with its 95% interval; the zero line is "no difference"."""
    plt = _pyplot()
    rows = [r for r in rows if r["metric"] == metric]
    extractors = list(dict.fromkeys(r["extractor"] for r in rows)) or ["(none)"]
    comparisons = list(dict.fromkeys((r["method_label"], r["baseline_label"]) for r in rows))
    fig, axes = plt.subplots(1, len(extractors), figsize=(4.2 * len(extractors), 3.4), squeeze=False)
    for ax, extractor in zip(axes.flat, extractors):
        ax.set_xscale("log", base=2)
        ticks = set()
        for i, (m, b) in enumerate(comparisons):
            pts = sorted((r["steps"], r["mean"], r["ci_low"], r["ci_high"]) for r in rows
                         if r["extractor"] == extractor and (r["method_label"], r["baseline_label"]) == (m, b)
                         and r["ci_low"] is not None)
            if not pts:
                continue
            steps, mean, lo, hi = (np.asarray(v, dtype=np.float64) for v in zip(*pts))
            x = steps * 2 ** (0.08 * (i - (len(comparisons) - 1) / 2))  # side by side on the log axis
            ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=3, label=f"{m} − {b}",
                        markersize=4)
            ticks.update(int(s) for s in steps)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        better = "lower" if metric in ("fid", "kid") else "higher"
        ax.set_ylabel(f"{metric.upper()} difference ({better}: method better)")
        ax.set_title(f"paired by seed, 95% t-interval, extractor {extractor}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save_figure(fig, path)
