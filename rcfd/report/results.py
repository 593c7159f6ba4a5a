"""What a run leaves behind for people to read: ``results.json`` and ``results.md`` (a table
in the shape of the paper's Table 1, one table per extractor, the classifiers and their
accuracies, the noise floors, the samples
of every row side by side, loss curves, FID against steps). Figures are :mod:`rcfd.report.plots`;
a multi-seed study is :mod:`rcfd.report.study`.

A *results* dict is what :func:`rcfd.evaluation.evaluate_rows` returns and ``results.json``
holds; its schema is :mod:`rcfd.report.schema` (:class:`~rcfd.report.schema.Results`), through
which every function here reads it (:func:`check_results`), so a malformed file is refused
with the key that is wrong. ``results.json`` is the dict itself, written as it was made.

Rows are whatever the methods produce, in the order given; a row is identified by its
``key`` and shown by its ``label``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from rcfd.config import describe
from rcfd.io.files import write_text
from rcfd.report.plots import plot_metric_vs_steps
from rcfd.report.schema import Diagnostics, Entry, FloorMetrics, Results, SplitMetrics

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
FID_PLOT, LOSS_PLOT = "fid_vs_steps.png", "loss_curves.png"
SPLIT_NAMES = {"test": "the held-out test split", "train": "the training split"}


# --------------------------------------------------------------------------- reading results


def check_results(results: Mapping | Results) -> Results:
    """``results`` validated into its :class:`~rcfd.report.schema.Results` (a ``ValueError``
    naming every bad key otherwise)."""
    if isinstance(results, Results):
        return results
    try:
        return Results.model_validate(results)
    except ValidationError as e:
        raise ValueError(f"invalid results (made by rcfd.evaluation.evaluate_rows): "
                         f"{describe(e, whole='results')}") from None


def row_order(entries: Sequence[Entry]) -> list[tuple[str, str]]:
    """``(key, label)`` of the rows, in the order their entries first appear."""
    return list(dict.fromkeys((e.key, e.label) for e in entries))


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


# --------------------------------------------------------------------------- tables


def format_cell(entry: Entry) -> str:
    """``FID 12.03 / IS 8.87`` from an entry's flattened primary numbers (``± spread`` when
    it carries ``fid_std`` / ``is_std_seeds``, as aggregated study cells do)."""
    extra = entry.model_extra or {}
    return (f"FID {_mean_std(entry.fid, extra.get('fid_std'))} / "
            f"IS {_mean_std(entry.is_, extra.get('is_std_seeds'))}")


def _teacher_mark(r: Results, e: Entry) -> str:
    return " (teacher)" if r.is_teacher(e) else ""


def results_table(results: Mapping | Results) -> str:
    """The Table-1-shaped table: one row per row key (in order), one column per number of
    steps, ``FID / IS`` cells of the primary extractor against the primary reference; the
    teacher's cell is marked (the upper bound the students distil from)."""
    r = check_results(results)
    steps = sorted({e.steps for e in r.entries})
    cells = {(e.key, e.steps): format_cell(e) + _teacher_mark(r, e) for e in r.entries}
    lines = ["| method | " + " | ".join(steps_label(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for key, label in row_order(r.entries):
        lines.append(f"| {label} | " + " | ".join(cells.get((key, s), "") for s in steps) + " |")
    return "\n".join(lines)


def _split_cols(m: SplitMetrics | None) -> list[str]:
    m = m or SplitMetrics()
    return [fmt_fixed(m.fid), fmt_sig(m.kid), fmt_fixed(m.precision), fmt_fixed(m.recall)]


def extractor_table(results: Mapping | Results, extractor: str) -> str:
    """Every entry under one extractor: FID, KID, precision and recall against each reference
    split, and IS where the extractor has logits."""
    r = check_results(results)
    mine = [(e, e.metrics[extractor]) for e in r.entries if extractor in e.metrics]
    splits = [s for s in ("test", "train") if any(m.split(s) is not None for _, m in mine)]
    has_is = any(m.is_ is not None for _, m in mine)
    head = ["row", "steps"] + [f"{m} ({s})" for s in splits for m in ("FID", "KID", "P", "R")] + (["IS"] if has_is else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for e, m in mine:
        cols = [e.label + _teacher_mark(r, e), str(e.steps)]
        for s in splits:
            cols += _split_cols(m.split(s))
        if has_is:
            cols.append(_mean_std(m.is_, m.is_std))
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def floors_table(results: Mapping | Results) -> str:
    """The noise floors per extractor: the test split against the train split, and two
    independent sample sets of one model (FID/KID between them, and how far the second
    set's FID against each split lies from the first's). "" without floors."""
    r = check_results(results)
    data, two = r.floors.test_vs_train, r.floors.two_seeds
    if not data and not two:
        return ""
    head = ["extractor"]
    if data:
        head += ["FID test vs train", "KID test vs train", "P", "R"]
    for f in two:
        head += [f"FID two seeds ({f.label}, {steps_label(f.steps)})", "KID two seeds",
                 "ΔFID vs test", "ΔFID vs train"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in r.extractors:
        cols = [f"`{name}`"]
        if data:
            cols += _split_cols(data.metrics.get(name))
        for f in two:
            m = f.metrics.get(name) or FloorMetrics()
            delta = {k: v.fid for k, v in m.delta.items()}
            cols += [fmt_fixed(m.fid), fmt_sig(m.kid), fmt_fixed(delta.get("test")),
                     fmt_fixed(delta.get("train"))]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def fmt_accuracy(v) -> str:
    """A top-1 accuracy in percent, ``not recorded`` where missing."""
    return "not recorded" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"


def classifiers_table(results: Mapping | Results) -> str:
    """Every classifier of the run: role, the extractor it serves as, architecture, training
    steps, validation and held-out test accuracy. "" when none is recorded (older results)."""
    r = check_results(results)
    if not r.classifiers:
        return ""
    lines = ["| classifier | role | extractor | architecture | steps | validation accuracy | test accuracy |",
             "|---" * 7 + "|"]
    for name, c in r.classifiers.items():
        arch = _or(c.arch) + ("" if c.width is None else f" (width {c.width})")
        lines.append(f"| {name} | {_or(c.role)} | {'`' + c.extractor + '`' if c.extractor else '-'} | {arch} | "
                     f"{_or(c.steps)} | {fmt_accuracy(c.val_accuracy)} | {fmt_accuracy(c.test_accuracy)} |")
    return "\n".join(lines)


def diagnostics_table(diagnostics: Diagnostics | None) -> str:
    """The objective diagnostics: per distilled student, its PD and CFD losses next to its
    teacher's (the student at initialisation) on the same draws. "" without them."""
    if diagnostics is None or not diagnostics.rows:
        return ""
    d = diagnostics
    loss = d.loss
    lines = [f"Every distilled student's objectives on one fixed set of {d.num_samples} held-out draws "
             f"(x0 from {SPLIT_NAMES.get(d.split, d.split)}, seed {_or(d.seed)}, t drawn as in training, "
             f"draws `{d.draws}`), next to its teacher's in its place (the student at initialisation): "
             f"the PD loss (`{loss.get('pd_kind', '?')}`) and the CFD loss (feature KL through "
             f"`{_or(d.classifier)}`, tau {_or(loss.get('tau'))}, on {_or(loss.get('kl_on'))}). "
             "Lower is better; a student below its teacher lowered that objective.", "",
             "| student | T | teacher | PD loss | PD loss (teacher) | CFD loss | CFD loss (teacher) |",
             "|---" * 7 + "|"]
    for row in d.rows:
        s, t = row.student, row.teacher
        lines.append(f"| {row.label} | {row.T} | {row.teacher_checkpoint} | {fmt_sig(s.pd)} | {fmt_sig(t.pd)} | "
                     f"{fmt_sig(s.cfd)} | {fmt_sig(t.cfd)} |")
    return "\n".join(lines)


def _or(value, missing: str = "?"):
    return missing if value is None else value


def measurement_note(results: Mapping | Results) -> str:
    """The measurement in words: extractors (with what exactly each is), the references,
    the sample counts and the fixed settings."""
    r = check_results(results)
    p, m = r.primary, r.measurement
    refs = ", ".join(f"{s} ({n} images)" for s, n in (r.num_reference or {}).items()) or "?"
    ext = "; ".join(f"`{n}` = {r.extractor_details.get(n, '?')}" for n in r.extractors)
    text = (f"Every number names its extractor: {ext}. References: {refs}. {_or(r.num_samples)} "
            f"samples per cell, all rows from the same noise. FID and KID lower is better; precision (P), "
            f"recall (R) and IS higher is better. KID: {m.get('kid_subsets', '?')} subsets of up to "
            f"{m.get('kid_subset_size', '?')}; P/R: k = {m.get('pr_k', '?')} on equal counts; IS: "
            f"{m.get('is_splits', '?')} splits. The main table shows `{p.extractor}` against "
            f"{SPLIT_NAMES.get(p.reference, p.reference)}.")
    if "inception" not in r.extractors:
        text += " None of these numbers compares with published Inception FIDs."
    return text


# --------------------------------------------------------------------------- the report


def fid_series(results: Mapping | Results, reference: str | None = None) -> dict:
    """``{extractor: {row label: [(steps, FID, 0)]}}`` for :func:`rcfd.report.plots.plot_metric_vs_steps`."""
    r = check_results(results)
    reference = reference or r.primary.reference
    out = {}
    for name in r.extractors:
        rows = {}
        for e in r.entries:
            split = e.metrics[name].split(reference) if name in e.metrics else None
            rows.setdefault(e.label, []).append((e.steps, split.fid if split else None, 0.0))
        out[name] = rows
    return out


def results_markdown(results: Mapping | Results, *, title: str | None = None) -> str:
    """The text of ``results.md``."""
    r = check_results(results)
    title = title or f"Results: {_or(r.preset, 'run')}, seed {_or(r.seed)}"
    parts = [f"# {title}", "", measurement_note(r), "", results_table(r), ""]
    for name in r.extractors:
        parts += [f"## Extractor `{name}`", "", extractor_table(r, name), ""]
    classifiers = classifiers_table(r)
    parts += ["## Classifiers", "", classifiers or "Classifier accuracies: not recorded in these results.", ""]
    diagnostics = diagnostics_table(r.diagnostics)
    if diagnostics:
        parts += ["## Objective diagnostics", "", diagnostics, ""]
    floors = floors_table(r)
    if floors:
        parts += ["## Noise floors", "",
                  ("What real held-out images score against the training images, and how far two "
                   "independent sample sets of one model (same count as a cell) lie from each other. "
                   "A difference between two cells smaller than the two-seed ΔFID is sampling noise."),
                  "", floors, ""]
    parts += [f"![FID against steps]({FID_PLOT})", ""]
    if r.side_by_side:
        parts += ["## Samples", "", "Every row from the same noise, side by side:", "",
                  f"![samples]({r.side_by_side})", ""]
    grids = [(e.label, e.steps, e.grid) for e in r.entries if e.grid]
    parts += [f"- {label}, {steps_label(s)}: [{g}]({g})" for label, s, g in grids] + ([""] if grids else [])
    if r.loss_curves:
        parts += ["## Training", "", f"![Loss curves]({r.loss_curves})", ""]
    if r.timings:
        parts += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in r.timings.items()]
        parts += [f"| total | {sum(r.timings.values()):.1f} |", ""]
    return "\n".join(parts)


def write_results(run_dir: str | os.PathLike, results: Mapping, *, title: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the FID-against-steps plot into ``run_dir``."""
    run_dir = Path(run_dir)
    typed = check_results(results)  # the dict is written as it is: the schema only reads it
    paths = {"json": write_text(run_dir / RESULTS_JSON, json.dumps(results, indent=2) + "\n")}
    ref = typed.primary.reference
    paths["fid_plot"] = plot_metric_vs_steps(fid_series(typed), run_dir / FID_PLOT,
                                             metric=f"FID against {ref}")
    paths["md"] = write_text(run_dir / RESULTS_MD, results_markdown(typed, title=title) + "\n")
    return paths
