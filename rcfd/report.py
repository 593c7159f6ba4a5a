"""What a run leaves behind for people to read: sample grids, loss curves, the results table
(the shape of the paper's Table 1), FID against steps, and the mean ± std of a multi-seed study.

Everything here is a pure function of plain data (image tensors, metric-log records, results
dicts) plus the file it writes, so it is tested against hand-made inputs.

A *results* dict (what ``results.json`` holds) is::

    {"preset": str, "dataset": str, "extractor": str, "num_samples": int, "seeds": [int],
     "entries": [{"method": "base" | "pd" | "rcfd", "steps": int, "fid": float,
                  "isc_mean": float, "isc_std": float, "kid_mean": float, ...,
                  "extractor": str, "num_samples": int, ...}, ...],
     "timings": {stage: seconds}, ...}

An aggregated (multi-seed) entry has the mean in ``fid`` etc., the spread over seeds in
``fid_seed_std`` etc., and the per-seed values in ``per_seed``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

METHODS = ("base", "pd", "rcfd")
METHOD_LABELS = {"base": "DDIM (base model)", "pd": "PD", "rcfd": "RCFD"}
METRICS = ("fid", "isc_mean", "kid_mean")  # the numbers aggregated over seeds
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
FID_PLOT, LOSS_PLOT = "fid_vs_steps.png", "loss_curves.png"


# --------------------------------------------------------------------------- sample grids


def grid_shape(n: int, image_size: int, nrow: int | None = None, pad: int = 2,
               scale: int = 1) -> tuple[int, int]:
    """``(width, height)`` in pixels of the grid :func:`image_grid` makes of ``n`` images:
    ``nrow`` per row (default ``ceil(sqrt(n))``), ``pad`` pixels around every image, each
    image ``scale`` times its size."""
    if n < 1 or image_size < 1 or pad < 0 or scale < 1:
        raise ValueError(f"need n, image_size, scale >= 1 and pad >= 0; got {n}, {image_size}, {scale}, {pad}")
    cols = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cell = image_size * scale + pad
    return cols * cell + pad, rows * cell + pad


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2,
               scale: int = 1) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` (float in [-1, 1] or uint8, ``C`` 1 or 3) into one
    ``uint8 [height, width]`` (grey) or ``[height, width, 3]`` array on a white background,
    row-major, each image enlarged ``scale`` times (nearest neighbour)."""
    from rcfd.data import to_uint8

    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be [N, 1 or 3, H, H], got {tuple(images.shape)}")
    u8 = images if images.dtype == torch.uint8 else to_uint8(images.detach().float().cpu())
    u8 = u8.cpu()
    if scale > 1:
        u8 = u8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, size = u8.shape[0], u8.shape[1], u8.shape[-1]
    width, height = grid_shape(n, images.shape[-1], nrow, pad, scale)
    cols = (width - pad) // (size + pad)
    canvas = np.full((c, height, width), 255, dtype=np.uint8)
    for i, img in enumerate(u8.numpy()):
        r, k = divmod(i, cols)
        y, x = pad + r * (size + pad), pad + k * (size + pad)
        canvas[:, y:y + size, x:x + size] = img
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
              pad: int = 2, scale: int = 1) -> Path:
    """Write :func:`image_grid` as a PNG (written to a temporary name, then renamed)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image_grid(images, nrow, pad, scale)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def display_scale(image_size: int, target: int = 32) -> int:
    """How much to enlarge small images in a grid so each is at least ``target`` pixels."""
    return max(1, target // image_size)


# --------------------------------------------------------------------------- loss curves


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines metric log. A torn last line (a run killed while
    writing) is skipped; any other bad line is an error naming the line."""
    records, lines = [], Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


_NOT_A_LOSS = ("step", "epoch", "position", "time", "elapsed", "lr", "grad_norm", "seconds",
               "images_per_s", "steps_per_s", "rank", "round", "T", "time_scale")


def loss_series(records: Iterable[Mapping]) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` of every finite numeric loss-like field of a metric log's
    records (``loss`` and ``loss/...`` or ``*_loss`` terms; bookkeeping such as the step,
    learning rate, timings is left out). Records without a ``step`` are numbered."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, rec in enumerate(records):
        step = rec.get("step", i)
        for key, v in rec.items():
            if key in _NOT_A_LOSS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if "loss" not in key and key not in ("cfd", "ent", "div", "reg", "pd", "total"):
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


def plot_loss_curves(logs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """One panel per stage (``logs``: stage name -> metric-log records), each positive
    loss-like series against the step on a log axis (terms that go negative, such as the
    diversity term, are left out), smoothed when long. Stages without a loss are skipped;
    with none at all the figure says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, recs in logs.items():
        series = {k: v for k, v in loss_series(recs).items() if v[1] and min(v[1]) > 0}
        if series:
            panels.append((name, series))
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no loss records", ha="center", va="center")
    for ax, (name, series) in zip(axes.flat, panels):
        for i, (key, (steps, values)) in enumerate(sorted(series.items(), key=lambda kv: kv[0] != "loss")):
            color = f"C{i}"
            if len(values) > 50:
                ax.plot(steps, values, color=color, linewidth=0.5, alpha=0.3)
                ax.plot(steps, smooth(values, max(5, len(values) // 25)), color=color, linewidth=1.2, label=key)
            else:
                ax.plot(steps, values, color=color, linewidth=1.2, label=key)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- results


def _entries(results: Mapping) -> list[dict]:
    entries = results.get("entries")
    if not isinstance(entries, list):
        raise ValueError("results must hold an 'entries' list of {method, steps, fid, ...} dicts")
    for e in entries:
        if e.get("method") not in METHODS or not isinstance(e.get("steps"), int):
            raise ValueError(f"every entry needs a method in {METHODS} and an int steps, got {e}")
    return entries


def _fmt(value: float | None, spread: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text if spread is None else f"{text} ± {spread:.{digits}f}"


def format_cell(entry: Mapping) -> str:
    """``FID 12.03 / IS 8.87`` (``± std over seeds`` when aggregated)."""
    fid = _fmt(entry.get("fid"), entry.get("fid_seed_std"), 2)
    isc = _fmt(entry.get("isc_mean"), entry.get("isc_mean_seed_std"), 2)
    return f"FID {fid} / IS {isc}"


def method_label(method: str, results: Mapping) -> str:
    label = METHOD_LABELS[method]
    if method == "rcfd" and results.get("distillation_classifier"):
        label += f"-{results['distillation_classifier']}"
    return label


def results_table(results: Mapping) -> str:
    """Markdown table in the shape of the paper's Table 1: one row per method (DDIM on the
    base model, PD, RCFD), one column per number of steps (ascending), ``FID / IS`` cells;
    the caption names the extractor and the sample counts."""
    entries = _entries(results)
    steps = sorted({e["steps"] for e in entries})
    cells = {(e["method"], e["steps"]): format_cell(e) for e in entries}
    head = "| method | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps) + " |"
    lines = [head, "|---|" + "---|" * len(steps)]
    for m in METHODS:
        if any(e["method"] == m for e in entries):
            row = [cells.get((m, s), "") for s in steps]
            lines.append(f"| {method_label(m, results)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def extractor_note(results: Mapping) -> str:
    """One sentence naming the feature extractor, the samples and the reference set."""
    extractors = sorted({e.get("extractor", "?") for e in _entries(results)})
    name = results.get("extractor") or ", ".join(extractors)
    counts = sorted({e.get("num_samples") for e in _entries(results) if e.get("num_samples")})
    text = (f"FID (lower is better) and IS (higher is better) with the feature extractor "
            f"`{name}`, {'/'.join(map(str, counts)) or '?'} samples per cell against the "
            f"training set ({results.get('num_reference', '?')} images).")
    if name.startswith("per-seed"):
        text += (" Each seed is measured with its own evaluation classifier (not the one used for "
                 "distillation), so the spread over seeds mixes the extractors' scales: compare "
                 "the methods within a seed (the paired table); none of it compares with published "
                 "Inception FIDs.")
    elif "inception" not in name:
        text += (" The extractor is the evaluation classifier (not the one used for distillation), "
                 "so the numbers are comparable with each other, not with published Inception FIDs.")
    return text


def plot_fid_vs_steps(results: Mapping, path: str | os.PathLike) -> Path:
    """FID against the number of steps (log2 axis), one line per distillation method
    (PD, RCFD) with error bars over seeds when aggregated; DDIM on the base model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = _entries(results)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, style in (("pd", "o-"), ("rcfd", "s-"), ("base", "^--")):
        pts = sorted((e["steps"], e.get("fid"), e.get("fid_seed_std") or 0.0) for e in entries
                     if e["method"] == m and e.get("fid") is not None and math.isfinite(e["fid"]))
        if pts:
            xs, ys, err = zip(*pts)
            ax.errorbar(xs, ys, yerr=err if any(err) else None, fmt=style, capsize=3,
                        label=method_label(m, results), linewidth=1.2, markersize=4)
    ax.set_xscale("log", base=2)
    ticks = sorted({e["steps"] for e in entries})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID")
    name = str(results.get("extractor", "extractor ?"))
    if name.startswith("per-seed"):
        name = "each seed's evaluation classifier; bars: spread over seeds"
    ax.set_title(f"FID against steps ({name})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def aggregate(per_seed: Sequence[Mapping]) -> dict:
    """Mean and spread over seeds of several runs' results: one entry per (method, steps)
    present in every run, each metric the mean over seeds with its standard deviation
    (``ddof=1``; 0 for a single seed) in ``<metric>_seed_std`` and the values in ``per_seed``."""
    if not per_seed:
        raise ValueError("aggregate needs the results of at least one seed")
    keyed = [{(e["method"], e["steps"]): e for e in _entries(r)} for r in per_seed]
    common = sorted(set.intersection(*(set(k) for k in keyed)), key=lambda k: (METHODS.index(k[0]), k[1]))
    entries = []
    for key in common:
        runs = [k[key] for k in keyed]
        e = {"method": key[0], "steps": key[1], "n_seeds": len(runs),
             "extractor": runs[0].get("extractor"), "num_samples": runs[0].get("num_samples"),
             "per_seed": {m: [r.get(m) for r in runs] for m in METRICS if all(m in r for r in runs)}}
        for m, values in e["per_seed"].items():
            v = np.asarray(values, dtype=np.float64)
            e[m] = float(v.mean())
            e[f"{m}_seed_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        entries.append(e)
    first = per_seed[0]
    out = {k: first[k] for k in ("preset", "dataset", "extractor", "num_reference",
                                 "distillation_classifier", "evaluation_classifier") if k in first}
    extractors = [r.get("extractor") for r in per_seed]
    if len(set(extractors)) > 1:  # each seed trained its own evaluation classifier
        out["extractor"] = "per-seed extractors: " + ", ".join(map(str, extractors))
        for e in entries:
            e["extractor"] = out["extractor"]
    out.update(seeds=[s for r in per_seed for s in r.get("seeds", [])], entries=entries,
               runs=[r.get("run_dir") for r in per_seed], paired=paired_fid(keyed))
    return out


def paired_fid(keyed: Sequence[Mapping]) -> list[dict]:
    """RCFD minus PD FID at each number of steps, paired by seed (both measured with that
    seed's extractor, so the extractor's scale cancels): mean, std and how many seeds RCFD
    is better in."""
    rows = []
    steps = sorted({s for k in keyed for m, s in k if m == "rcfd"})
    for s in steps:
        diffs = [k[("rcfd", s)]["fid"] - k[("pd", s)]["fid"] for k in keyed
                 if ("rcfd", s) in k and ("pd", s) in k]
        if diffs:
            v = np.asarray(diffs, dtype=np.float64)
            rows.append({"steps": s, "fid_diff_mean": float(v.mean()),
                         "fid_diff_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                         "rcfd_better": int((v < 0).sum()), "n_seeds": len(diffs),
                         "per_seed": [float(d) for d in diffs]})
    return rows


def paired_table(results: Mapping) -> str:
    """The paired comparison of :func:`paired_fid` as a Markdown table ("" when absent)."""
    rows = results.get("paired") or []
    if not rows:
        return ""
    lines = ["| steps | FID(RCFD) - FID(PD), mean ± std | RCFD better in | per seed |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['fid_diff_mean']:+.3f} ± {r['fid_diff_std']:.3f} | "
                     f"{r['rcfd_better']} of {r['n_seeds']} seeds | "
                     + ", ".join(f"{d:+.3f}" for d in r["per_seed"]) + " |")
    return "\n".join(lines)


def results_markdown(results: Mapping, *, title: str | None = None) -> str:
    """The text of ``results.md``: caption, table, plots, sample grids and stage timings."""
    seeds = results.get("seeds") or []
    title = title or f"Results: {results.get('preset', 'run')}" + (
        f", {len(seeds)} seeds (mean ± std)" if len(seeds) > 1 else f", seed {seeds[0]}" if seeds else "")
    parts = [f"# {title}", "", extractor_note(results), "", results_table(results), ""]
    if paired_table(results):
        parts += ["Paired by seed (each seed's RCFD and PD students are measured with the same "
                  "extractor, so its scale cancels; negative favours RCFD):", "",
                  paired_table(results), ""]
    parts += [f"![FID against steps]({FID_PLOT})", ""]
    grids = [(e["method"], e["steps"], e["grid"]) for e in _entries(results) if e.get("grid")]
    if results.get("loss_curves"):
        parts += [f"![Loss curves]({results['loss_curves']})", ""]
    if grids:
        parts += ["## Samples", ""] + [f"- {method_label(m, results)}, {s} step{'s' if s > 1 else ''}: "
                                       f"[{g}]({g})" for m, s, g in grids] + [""]
    if results.get("runs"):
        parts += ["## Runs", ""] + [f"- [{r}]({r}/{RESULTS_MD})" for r in results["runs"] if r] + [""]
    timings = results.get("timings") or {}
    if timings:
        parts += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()] + [
            f"| total | {sum(timings.values()):.1f} |", ""]
    return "\n".join(parts)


def write_results(run_dir: str | os.PathLike, results: Mapping, *, title: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the FID plot into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _entries(results)
    paths = {"json": run_dir / RESULTS_JSON, "md": run_dir / RESULTS_MD}
    tmp = run_dir / f".{RESULTS_JSON}.tmp"
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, paths["json"])
    paths["fid_plot"] = plot_fid_vs_steps(results, run_dir / FID_PLOT)
    paths["md"].write_text(results_markdown(results, title=title) + "\n", encoding="utf-8")
    return paths
