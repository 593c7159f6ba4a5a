"""The report of a multi-seed study: ``study.json``, ``study.md``, ``per_seed.csv`` and the
figures, from the per-seed results dicts (:mod:`rcfd.report.results`) and the comparisons to make.

``study.md`` holds, in this order: the setting (commit, platform, seeds, measurement), the
conclusion lines generated from the numbers by the fixed rule :data:`rcfd.report.stats.RULE` (one
per extractor, and a line wherever the extractors disagree), the paired tables (mean
difference, 95% interval, paired t and Wilcoxon p, raw and Holm-adjusted, seeds in which the
method is better, verdict), the mean ± std of every cell per extractor with the teacher labelled as the upper
bound, the classifiers' test accuracies over seeds, the noise floors over seeds and the raw per-seed numbers of the primary extractor.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from rcfd.report import stats
from rcfd.io.files import write_text
from rcfd.report.plots import plot_metric_vs_steps, plot_paired_differences
from rcfd.report.results import check_results, fmt_accuracy, fmt_fixed, fmt_sig, steps_label

STUDY_JSON, STUDY_MD, PER_SEED_CSV = "study.json", "study.md", "per_seed.csv"
PAIRED_PLOT, FID_PLOT = "paired_differences.png", "fid_vs_steps.png"
CSV_FIELDS = ("seed", "key", "label", "sampler", "steps", "extractor", "reference", "fid", "kid",
              "precision", "recall", "is")


def per_seed_csv(per_seed: Sequence[Mapping]) -> str:
    """Every measured number of every seed, one line per (seed, row, steps, extractor, reference)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for i, r in enumerate(per_seed):
        for e in r["entries"]:
            for ext, m in e["metrics"].items():
                for ref in ("test", "train"):
                    if ref in m:
                        w.writerow([r.get("seed", i), e["key"], e["label"], e.get("sampler", ""), e["steps"], ext, ref,
                                    *(repr(m[ref].get(k)) for k in ("fid", "kid", "precision", "recall")),
                                    repr(m.get("is"))])
    return buf.getvalue()


def cell_summaries(per_seed: Sequence[Mapping], metric: str, extractor: str, reference: str) -> list[dict]:
    """Mean ± std over seeds of every cell (present in every seed) for one metric."""
    out = []
    for key, label, steps in stats.cells(per_seed):
        values = [v for v in stats.seed_values(per_seed, key, steps, metric, extractor, reference) if v is not None]
        out.append({"key": key, "label": label, "steps": steps, "metric": metric, "extractor": extractor,
                    "reference": reference, "values": values, **stats.summarize(values)})
    return out


def _teacher(per_seed) -> tuple | None:
    t = per_seed[0].get("teacher")
    return None if not t else (t["key"], t["steps"])


def aggregate_table(per_seed: Sequence[Mapping], extractor: str, reference: str, metric: str = "fid") -> str:
    """Table-1-shaped: rows x steps, ``mean ± std`` over seeds of ``metric``; the teacher's cell
    labelled as the upper bound."""
    summ = cell_summaries(per_seed, metric, extractor, reference)
    steps = sorted({c["steps"] for c in summ})
    rows = list(dict.fromkeys((c["key"], c["label"]) for c in summ))
    teacher = _teacher(per_seed)
    cells = {(c["key"], c["steps"]): f"{fmt_fixed(c['mean'], 3 if metric != 'kid' else 5)} ± "
             f"{fmt_fixed(c['std'], 3 if metric != 'kid' else 5)}" + (" (teacher: upper bound)" if (c["key"], c["steps"]) == teacher else "")
             for c in summ if c["n"]}
    lines = ["| row | " + " | ".join(steps_label(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    lines += [f"| {label} | " + " | ".join(cells.get((k, s), "") for s in steps) + " |" for k, label in rows]
    return "\n".join(lines)


def paired_table(rows: Sequence[Mapping], metric: str, reference: str) -> str:
    """The paired comparisons of one metric and reference, one line per (comparison,
    extractor, steps): raw and Holm-adjusted p of both tests, the verdict (on the adjusted p)."""
    rows = [r for r in rows if r["metric"] == metric and r["reference"] == reference]
    if not rows:
        return ""
    fmt = fmt_sig if metric == "kid" else (lambda v: fmt_fixed(v, 3))
    lines = [(f"| comparison | extractor | steps | mean Δ{metric.upper()} | 95% interval | p (t) | p (t, Holm) "
              "| p (Wilcoxon) | p (Wilcoxon, Holm) | method better in | verdict |"), "|---" * 11 + "|"]
    for r in rows:
        ci = "n/a" if r["ci_low"] is None else f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
        p = [_p(r.get(k)) for k in ("p_t", "p_t_holm", "p_wilcoxon", "p_wilcoxon_holm")]
        lines.append(f"| {r['method_label']} − {r['baseline_label']} | `{r['extractor']}` | {r['steps']} | "
                     f"{fmt(r['mean'])} | {ci} | {' | '.join(p)} | {r['method_better_in']} of {r['n']} | "
                     f"{r['verdict']}{_flip(r)} |")
    return "\n".join(lines)


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _flip(row: Mapping) -> str:
    """`` (unadjusted: worse)`` where the Holm correction changed the verdict."""
    raw = row.get("verdict_unadjusted")
    return "" if raw is None or raw == row["verdict"] else f" (unadjusted: {raw})"


def classifier_accuracies(per_seed: Sequence[Mapping]) -> list[dict]:
    """Per classifier (``classifiers`` of the seeds' results, in order of appearance): its role,
    architecture, and the test accuracy over the seeds that recorded it (``values``, mean, min,
    max, ``n`` of ``seeds``); ``[]`` when no seed recorded any classifier."""
    typed = [check_results(r) for r in per_seed]
    names = list(dict.fromkeys(n for r in typed for n in r.classifiers))
    out = []
    for name in names:
        mine = [r.classifiers[name] for r in typed if name in r.classifiers]
        values = [c.test_accuracy for c in mine if c.test_accuracy is not None]
        out.append({"name": name, "role": mine[0].role, "arch": mine[0].arch, "values": values, "n": len(values),
                    "seeds": len(per_seed), "mean": sum(values) / len(values) if values else None,
                    "min": min(values, default=None), "max": max(values, default=None)})
    return out


def classifiers_summary(accuracies: Sequence[Mapping]) -> str:
    """The test accuracy of every classifier over seeds: mean and range, and how many seeds
    recorded it; "not recorded" where none did."""
    if not accuracies:
        return "Classifier test accuracies: not recorded (these results predate them)."
    lines = ["| classifier | role | architecture | test accuracy, mean | range over seeds | seeds recorded |",
             "|---" * 6 + "|"]
    for c in accuracies:
        rng = "not recorded" if not c["n"] else f"{fmt_accuracy(c['min'])} – {fmt_accuracy(c['max'])}"
        lines.append(f"| {c['name']} | {c['role'] or '?'} | {c['arch'] or '?'} | {fmt_accuracy(c['mean'])} | {rng} | "
                     f"{c['n']} of {c['seeds']} |")
    return "\n".join(lines)


def floors_summary(per_seed: Sequence[Mapping]) -> str:
    """Mean ± std over seeds of the noise floors, per extractor."""
    names = per_seed[0]["extractors"]
    lines = ["| extractor | FID test vs train | FID two seeds | \\|ΔFID\\| vs test (two seeds) |", "|---|---|---|---|"]
    for name in names:
        data = [(r.get("floors") or {}).get("test_vs_train") for r in per_seed]
        d = [x["metrics"][name]["fid"] for x in data if x and name in x["metrics"]]
        two = [f["metrics"][name] for r in per_seed for f in (r.get("floors") or {}).get("two_seeds", [])
               if name in f["metrics"]]
        cols = [stats.summarize(d), stats.summarize([t["fid"] for t in two]),
                stats.summarize([abs(t["delta"]["test"]["fid"]) for t in two if "test" in t.get("delta", {})])]
        lines.append(f"| `{name}` | " + " | ".join("n/a" if not c["n"] else f"{fmt_fixed(c['mean'])} ± {fmt_fixed(c['std'])}"
                                                   for c in cols) + " |")
    return "\n".join(lines)


def raw_table(per_seed: Sequence[Mapping], extractor: str, reference: str, metric: str = "fid") -> str:
    """The per-seed values of every cell (rows) for each seed (columns)."""
    seeds = [r.get("seed", i) for i, r in enumerate(per_seed)]
    lines = ["| row | steps | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for key, label, steps in stats.cells(per_seed):
        vals = stats.seed_values(per_seed, key, steps, metric, extractor, reference)
        lines.append(f"| {label} | {steps} | " + " | ".join(fmt_fixed(v) for v in vals) + " |")
    return "\n".join(lines)


def _run_names(per_seed: Sequence[Mapping], out_dir: str | os.PathLike | None) -> list[str | None]:
    """Each seed's run directory, relative to the study directory when given (so that a study
    moved or committed elsewhere does not name the machine it ran on)."""
    runs = [r.get("run_dir") for r in per_seed]
    if out_dir is None:
        return runs
    return [os.path.relpath(r, out_dir) if r else r for r in runs]


def _references_text(num_reference) -> str:
    if isinstance(num_reference, Mapping):
        return " / ".join(f"{n} {split}" for split, n in num_reference.items()) + " images"
    return str(num_reference)


def study_summary(per_seed: Sequence[Mapping], comparisons: Sequence[tuple[str, str]], *, commit: str,
                  platform: Mapping, metrics: Sequence[str] = ("fid", "kid"),
                  out_dir: str | os.PathLike | None = None) -> dict:
    """Everything ``study.json`` holds: the setting, the paired rows, the cell summaries and
    the generated conclusions; the seeds' run directories relative to ``out_dir`` if given."""
    typed = [check_results(r) for r in per_seed]  # every seed's results, validated
    first = per_seed[0]
    names, ref = typed[0].extractors, typed[0].primary.reference
    paired = stats.paired_comparisons(per_seed, comparisons, metrics=metrics, extractors=names)
    conclusions = stats.conclusions(paired, metric="fid", reference=ref)
    conclusions += stats.metric_disagreements(paired, reference=ref)
    summaries = [c for n in names for s in ("test", "train") for m in (*metrics, "precision", "recall")
                 for c in cell_summaries(per_seed, m, n, s)]
    return {"preset": first.get("preset"), "dataset": first.get("dataset"), "commit": commit,
            "platform": dict(platform), "seeds": [r.get("seed", i) for i, r in enumerate(per_seed)],
            "num_samples": first.get("num_samples"), "num_reference": first.get("num_reference"),
            "extractors": names, "extractor_details": [r.get("extractor_details") for r in per_seed],
            "primary": first["primary"], "teacher": first.get("teacher"), "measurement": first.get("measurement"),
            "comparisons": [list(c) for c in comparisons], "rule": stats.RULE, "conclusions": conclusions,
            "paired": paired, "cells": summaries, "classifiers": classifier_accuracies(per_seed),
            "runs": _run_names(per_seed, out_dir)}


def study_markdown(summary: Mapping, per_seed: Sequence[Mapping], *, side_by_side: str | None = None,
                   title: str | None = None) -> str:
    """The text of ``study.md``."""
    names, ref = summary["extractors"], summary["primary"]["reference"]
    plat = ", ".join(f"{k} {v}" for k, v in summary["platform"].items())
    title = title or f"Study: {summary.get('preset') or 'run'}, {len(summary['seeds'])} seeds"
    parts = [f"# {title}", "",
             f"Commit `{summary['commit']}`; platform: {plat}. Seeds {', '.join(map(str, summary['seeds']))}, "
             f"each a full run with its own classifiers; {summary.get('num_samples')} samples per cell; "
             f"references {_references_text(summary.get('num_reference'))}. Extractors: "
             + ", ".join(f"`{n}`" for n in names) + " (the `classifier` extractor is each seed's own "
             "evaluation classifier, never the distillation one; differences are paired by seed).", "",
             "## Conclusions", "", stats.RULE, "", stats.FAMILIES_TEXT, ""]
    parts += [f"- {line}" for line in summary["conclusions"]] + [""]
    parts += [f"![paired differences]({PAIRED_PLOT})", ""]
    for reference in ("test", "train"):
        for metric in ("fid", "kid"):
            t = paired_table(summary["paired"], metric, reference)
            if t:
                parts += [f"## Paired differences: {metric.upper()} against {reference}", "",
                          "Method minus baseline, per seed; negative favours the method.", "", t, ""]
    parts += [f"## Mean ± std over seeds (FID against {ref})", "", f"![FID against steps]({FID_PLOT})", ""]
    for n in names:
        parts += [f"### `{n}`", "", aggregate_table(per_seed, n, ref), ""]
    parts += ["## Classifiers over seeds", "", classifiers_summary(summary.get("classifiers") or []), ""]
    parts += ["## Noise floors over seeds", "", floors_summary(per_seed), ""]
    if side_by_side:
        parts += ["## Samples (first seed)", "", f"![samples]({side_by_side})", ""]
    parts += [f"## Raw numbers (FID of `{summary['primary']['extractor']}` against {ref})", "",
              f"Every number of every seed is in [{PER_SEED_CSV}]({PER_SEED_CSV}).", "",
              raw_table(per_seed, summary["primary"]["extractor"], ref), ""]
    runs = [r for r in summary.get("runs") or [] if r]
    if runs:
        parts += ["## Runs", ""] + [f"- {r}" for r in runs] + [""]
    return "\n".join(parts)


def write_study(out_dir: str | os.PathLike, per_seed: Sequence[Mapping], comparisons: Sequence[tuple[str, str]], *,
                commit: str, platform: Mapping, title: str | None = None) -> dict[str, Path]:
    """Write ``study.json``, ``study.md``, ``per_seed.csv``, the paired-differences plot and
    the FID-against-steps plot (mean ± std over seeds, per extractor) into ``out_dir``."""
    if not per_seed:
        raise ValueError("a study needs the results of at least one seed")
    out = Path(out_dir)
    summary = study_summary(per_seed, comparisons, commit=commit, platform=platform, out_dir=out)
    ref = summary["primary"]["reference"]
    paths = {"json": write_text(out / STUDY_JSON, json.dumps(summary, indent=2) + "\n"),
             "csv": write_text(out / PER_SEED_CSV, per_seed_csv(per_seed))}
    paired = [r for r in summary["paired"] if r["reference"] == ref]
    paths["paired_plot"] = plot_paired_differences(paired, out / PAIRED_PLOT, metric="fid")
    series = {n: {} for n in summary["extractors"]}
    for c in summary["cells"]:
        if c["metric"] == "fid" and c["reference"] == ref and c["n"]:
            series[c["extractor"]].setdefault(c["label"], []).append((c["steps"], c["mean"], c["std"]))
    paths["fid_plot"] = plot_metric_vs_steps(series, out / FID_PLOT, metric=f"FID against {ref}",
                                             note="mean ± std over seeds")
    side = None
    first = per_seed[0]
    if first.get("side_by_side") and first.get("run_dir"):
        side = os.path.relpath(Path(first["run_dir"]) / first["side_by_side"], out)
    paths["md"] = write_text(out / STUDY_MD, study_markdown(summary, per_seed, side_by_side=side, title=title) + "\n")
    return paths
