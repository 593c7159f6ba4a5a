"""What a run leaves behind for people to read: ``results.json`` and ``results.md`` (a table
in the shape of the paper's Table 1, one table per extractor, the noise floors, the samples
of every row side by side, loss curves, FID against steps). Figures are :mod:`rcfd.report.plots`;
a multi-seed study is :mod:`rcfd.report.study`.

A *results* dict (what :func:`rcfd.evaluation.evaluate_rows` returns and ``results.json``
holds)::

    {"preset": str, "dataset": str, "seed": int, "extractors": [name, ...],
     "extractor_details": {name: str}, "primary": {"extractor": name, "reference": "test"},
     "num_samples": int, "num_reference": {"train": int, "test": int}, "measurement": {...},
     "teacher": {"key": str, "steps": int} | None,
     "floors": {"two_seeds": [{"key", "label", "steps", "num_samples", "seeds",
                               "metrics": {name: {"fid", "kid", "precision", "recall",
                                                  "delta": {split: {"fid", "kid"}}}}}],
                "test_vs_train": {"num": {...}, "metrics": {name: {"fid", "kid", ...}}} | None},
     "entries": [{"method", "label", "sampler", "steps", "key",
                  "metrics": {name: {"test": {"fid", "kid", "kid_std", "precision", "recall"},
                                     "train": {...}, "is": float | None, "is_std": ...}},
                  "fid", "kid", "is", "precision", "recall",   # the primary ones, flattened
                  "grid", "checkpoint", "seconds", "sample_seconds"}, ...],
     "side_by_side": str, "timings": {stage: seconds}, "loss_curves": str, ...}

Rows are whatever the methods produce, in the order given; a row is identified by its
``key`` and shown by its ``label``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from rcfd.io.files import write_text
from rcfd.report.plots import plot_metric_vs_steps

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
FID_PLOT, LOSS_PLOT = "fid_vs_steps.png", "loss_curves.png"
SPLIT_NAMES = {"test": "the held-out test split", "train": "the training split"}


# --------------------------------------------------------------------------- reading results


def check_results(results: Mapping) -> list[dict]:
    """The entries of a results dict, after checking the fields the report reads."""
    entries = results.get("entries")
    if not isinstance(entries, list):
        raise ValueError("results must hold an 'entries' list of {key, label, steps, metrics, ...} dicts")
    for field in ("extractors", "primary"):
        if field not in results:
            raise ValueError(f"results lack {field!r} (made by rcfd.evaluation.evaluate_rows)")
    for e in entries:
        if not (isinstance(e.get("key"), str) and isinstance(e.get("label"), str)
                and isinstance(e.get("steps"), int) and isinstance(e.get("metrics"), dict)):
            raise ValueError(f"every entry needs a str key and label, an int steps and a metrics dict, got {e}")
    return entries


def row_order(entries) -> list[tuple[str, str]]:
    """``(key, label)`` of the rows, in the order their entries first appear."""
    return list(dict.fromkeys((e["key"], e["label"]) for e in entries))


def steps_label(s: int) -> str:
    return f"{s} step{'s' if s != 1 else ''}"


def fmt_fixed(v, digits: int = 3) -> str:
    """Fixed-point (FID, precision, recall, IS)."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_sig(v) -> str:
    """Four significant digits (KID, whose scale depends on the extractor)."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _mean_std(v, std, digits: int = 2) -> str:
    return fmt_fixed(v, digits) if std is None else f"{fmt_fixed(v, digits)} ± {fmt_fixed(std, digits)}"


def is_teacher(results: Mapping, entry: Mapping) -> bool:
    t = results.get("teacher") or {}
    return entry["key"] == t.get("key") and entry["steps"] == t.get("steps")


# --------------------------------------------------------------------------- tables


def format_cell(entry: Mapping) -> str:
    """``FID 12.03 / IS 8.87`` from an entry's flattened primary numbers (``± spread`` when
    it carries ``fid_std`` / ``is_std_seeds``, as aggregated study cells do)."""
    return (f"FID {_mean_std(entry.get('fid'), entry.get('fid_std'))} / "
            f"IS {_mean_std(entry.get('is'), entry.get('is_std_seeds'))}")


def results_table(results: Mapping) -> str:
    """The Table-1-shaped table: one row per row key (in order), one column per number of
    steps, ``FID / IS`` cells of the primary extractor against the primary reference; the
    teacher's cell is marked (the upper bound the students distil from)."""
    entries = check_results(results)
    steps = sorted({e["steps"] for e in entries})
    cells = {}
    for e in entries:
        cells[(e["key"], e["steps"])] = format_cell(e) + (" (teacher)" if is_teacher(results, e) else "")
    lines = ["| method | " + " | ".join(steps_label(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for key, label in row_order(entries):
        lines.append(f"| {label} | " + " | ".join(cells.get((key, s), "") for s in steps) + " |")
    return "\n".join(lines)


def extractor_table(results: Mapping, extractor: str) -> str:
    """Every entry under one extractor: FID, KID, precision and recall against each reference
    split, and IS where the extractor has logits."""
    entries = check_results(results)
    splits = [s for s in ("test", "train") if any(s in e["metrics"].get(extractor, {}) for e in entries)]
    has_is = any(e["metrics"].get(extractor, {}).get("is") is not None for e in entries)
    head = ["row", "steps"] + [f"{m} ({s})" for s in splits for m in ("FID", "KID", "P", "R")] + (["IS"] if has_is else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for e in entries:
        m = e["metrics"].get(extractor)
        if m is None:
            continue
        cols = [e["label"] + (" (teacher)" if is_teacher(results, e) else ""), str(e["steps"])]
        for s in splits:
            r = m.get(s) or {}
            cols += [fmt_fixed(r.get("fid")), fmt_sig(r.get("kid")), fmt_fixed(r.get("precision")), fmt_fixed(r.get("recall"))]
        if has_is:
            cols.append(_mean_std(m.get("is"), m.get("is_std")))
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def floors_table(results: Mapping) -> str:
    """The noise floors per extractor: the test split against the train split, and two
    independent sample sets of one model (FID/KID between them, and how far the second
    set's FID against each split lies from the first's). "" without floors."""
    floors = results.get("floors") or {}
    data, two = floors.get("test_vs_train"), floors.get("two_seeds") or []
    if not data and not two:
        return ""
    head = ["extractor"]
    if data:
        head += ["FID test vs train", "KID test vs train", "P", "R"]
    for f in two:
        head += [f"FID two seeds ({f['label']}, {steps_label(f['steps'])})", "KID two seeds",
                 "ΔFID vs test", "ΔFID vs train"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in results["extractors"]:
        cols = [f"`{name}`"]
        if data:
            d = data["metrics"].get(name, {})
            cols += [fmt_fixed(d.get("fid")), fmt_sig(d.get("kid")), fmt_fixed(d.get("precision")), fmt_fixed(d.get("recall"))]
        for f in two:
            m = f["metrics"].get(name, {})
            delta = m.get("delta", {})
            cols += [fmt_fixed(m.get("fid")), fmt_sig(m.get("kid")), fmt_fixed((delta.get("test") or {}).get("fid")),
                     fmt_fixed((delta.get("train") or {}).get("fid"))]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def measurement_note(results: Mapping) -> str:
    """The measurement in words: extractors (with what exactly each is), the references,
    the sample counts and the fixed settings."""
    p = results["primary"]
    num_ref = results.get("num_reference") or {}
    refs = ", ".join(f"{s} ({n} images)" for s, n in num_ref.items()) or "?"
    details = results.get("extractor_details") or {}
    ext = "; ".join(f"`{n}` = {details.get(n, '?')}" for n in results["extractors"])
    m = results.get("measurement") or {}
    text = (f"Every number names its extractor: {ext}. References: {refs}. {results.get('num_samples', '?')} "
            f"samples per cell, all rows from the same noise. FID and KID lower is better; precision (P), "
            f"recall (R) and IS higher is better. KID: {m.get('kid_subsets', '?')} subsets of up to "
            f"{m.get('kid_subset_size', '?')}; P/R: k = {m.get('pr_k', '?')} on equal counts; IS: "
            f"{m.get('is_splits', '?')} splits. The main table shows `{p['extractor']}` against "
            f"{SPLIT_NAMES.get(p['reference'], p['reference'])}.")
    if "inception" not in results["extractors"]:
        text += " None of these numbers compares with published Inception FIDs."
    return text


# --------------------------------------------------------------------------- the report


def fid_series(results: Mapping, reference: str | None = None) -> dict:
    """``{extractor: {row label: [(steps, FID, 0)]}}`` for :func:`rcfd.report.plots.plot_metric_vs_steps`."""
    reference = reference or results["primary"]["reference"]
    out = {}
    for name in results["extractors"]:
        rows = {}
        for e in check_results(results):
            v = ((e["metrics"].get(name) or {}).get(reference) or {}).get("fid")
            rows.setdefault(e["label"], []).append((e["steps"], v, 0.0))
        out[name] = rows
    return out


def results_markdown(results: Mapping, *, title: str | None = None) -> str:
    """The text of ``results.md``."""
    entries = check_results(results)
    title = title or f"Results: {results.get('preset', 'run')}, seed {results.get('seed', '?')}"
    parts = [f"# {title}", "", measurement_note(results), "", results_table(results), ""]
    for name in results["extractors"]:
        parts += [f"## Extractor `{name}`", "", extractor_table(results, name), ""]
    floors = floors_table(results)
    if floors:
        parts += ["## Noise floors", "",
                  ("What real held-out images score against the training images, and how far two "
                   "independent sample sets of one model (same count as a cell) lie from each other. "
                   "A difference between two cells smaller than the two-seed ΔFID is sampling noise."),
                  "", floors, ""]
    parts += [f"![FID against steps]({FID_PLOT})", ""]
    if results.get("side_by_side"):
        parts += ["## Samples", "", "Every row from the same noise, side by side:", "",
                  f"![samples]({results['side_by_side']})", ""]
    grids = [(e["label"], e["steps"], e["grid"]) for e in entries if e.get("grid")]
    parts += [f"- {label}, {steps_label(s)}: [{g}]({g})" for label, s, g in grids] + ([""] if grids else [])
    if results.get("loss_curves"):
        parts += ["## Training", "", f"![Loss curves]({results['loss_curves']})", ""]
    timings = results.get("timings") or {}
    if timings:
        parts += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        parts += [f"| total | {sum(timings.values()):.1f} |", ""]
    return "\n".join(parts)


def write_results(run_dir: str | os.PathLike, results: Mapping, *, title: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the FID-against-steps plot into ``run_dir``."""
    run_dir = Path(run_dir)
    check_results(results)
    paths = {"json": write_text(run_dir / RESULTS_JSON, json.dumps(results, indent=2) + "\n")}
    ref = results["primary"]["reference"]
    paths["fid_plot"] = plot_metric_vs_steps(fid_series(results), run_dir / FID_PLOT,
                                             metric=f"FID against {ref}")
    paths["md"] = write_text(run_dir / RESULTS_MD, results_markdown(results, title=title) + "\n")
    return paths
