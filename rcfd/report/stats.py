"""Study statistics over seeds: per-cell mean and spread, the paired differences of a method
against its baseline with a 95% t-interval, a paired t-test and a Wilcoxon signed-rank test,
the Holm-Bonferroni adjustment of those p-values across each table's comparisons, and the
verdict each comparison gets by the fixed rule :data:`RULE`.

Inputs are the per-seed results dicts of a study (:mod:`rcfd.report.results` describes them), one
per seed, each a full run with its own classifiers; a cell is ``(row key, steps)``, and a
value is read with :func:`value` for a metric, an extractor and a reference split. Two
results are paired when they come from the same seed, so a seed's own extractor scale (its
evaluation classifier) cancels in the difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE, ALPHA = 0.95, 0.05
LOWER_IS_BETTER = {"fid": True, "kid": True, "precision": False, "recall": False, "is": False}
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference shown"


def min_seeds(cells: int = 1, alpha: float = ALPHA) -> int:
    """The fewest seeds at which a table of ``cells`` cells can give any verdict: the exact
    two-sided Wilcoxon p of ``n`` paired differences is at least ``2 / 2**n`` (all of one sign),
    and Holm multiplies a table's smallest p by its number of cells, so the smallest ``n`` with
    ``cells * 2 / 2**n < alpha`` (6 for one cell, 9 for 8 cells, 11 for 32)."""
    if cells < 1:
        raise ValueError(f"a table has at least one cell, got {cells}")
    n = 1
    while cells * 2.0 / 2 ** n >= alpha:
        n += 1
    return n


MIN_SEEDS_WILCOXON = min_seeds(1)  # 6: the smallest n at which the exact two-sided Wilcoxon p can be < 0.05
RULE = ("A method is called **better** (or **worse**) than its baseline at a number of steps, "
        "under one extractor and reference, only when the 95% t-interval of its per-seed paired "
        "difference lies entirely on the better (worse) side of 0 *and* both the paired t-test and "
        "the Wilcoxon signed-rank test give p < 0.05 (two-sided) after the Holm-Bonferroni "
        "correction; otherwise the verdict is **no difference shown**. Holm is applied across every "
        "(comparison, extractor, steps) cell of one table (one metric against one reference; the "
        "conclusions read the FID table against the primary reference), to the t-test p-values and "
        "to the Wilcoxon p-values separately; the tables print both the raw and the Holm-adjusted p. "
        "The exact Wilcoxon p of n seeds is at least 2/2^n and Holm multiplies a table's smallest p "
        "by its number of cells, so a table of m cells can give a verdict only with 2m/2^n < 0.05: "
        "6 seeds for one cell, 9 for 8 cells, 11 for 32; a table that cannot says so first.")


# --------------------------------------------------------------------------- reading values


def value(entry: Mapping, metric: str, extractor: str, reference: str) -> float | None:
    """``metric`` (fid, kid, precision, recall; ``is`` has no reference) of a results entry
    under ``extractor`` against ``reference``; ``None`` where it was not measured."""
    m = (entry.get("metrics") or {}).get(extractor)
    if m is None:
        return None
    v = m.get("is") if metric == "is" else (m.get(reference) or {}).get(metric)
    return None if v is None or not math.isfinite(v) else float(v)


def cells(per_seed: Sequence[Mapping]) -> list[tuple[str, str, int]]:
    """``(key, label, steps)`` of every cell present in every seed, in the first seed's order."""
    if not per_seed:
        raise ValueError("a study needs the results of at least one seed")
    present = [{(e["key"], e["steps"]) for e in r["entries"]} for r in per_seed]
    common = set.intersection(*present)
    return [(e["key"], e["label"], e["steps"]) for e in per_seed[0]["entries"] if (e["key"], e["steps"]) in common]


def _entry(results: Mapping, key: str, steps: int) -> Mapping | None:
    return next((e for e in results["entries"] if e["key"] == key and e["steps"] == steps), None)


def seed_values(per_seed: Sequence[Mapping], key: str, steps: int, metric: str, extractor: str,
                reference: str) -> list[float | None]:
    """The cell's value in each seed (``None`` where missing)."""
    return [None if (e := _entry(r, key, steps)) is None else value(e, metric, extractor, reference)
            for r in per_seed]


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample std (``ddof=1``; 0 for one value) and count of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


# --------------------------------------------------------------------------- paired tests


def paired_test(diffs: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Statistics of paired differences ``d_i`` (one per seed): mean, sample std, the
    ``confidence`` t-interval ``mean +- t_{(1+c)/2, n-1} std / sqrt(n)``, the paired
    (one-sample) t-test p-value and the Wilcoxon signed-rank p-value (exact for small n),
    both two-sided against 0. Degenerate cases: all ``d_i = 0`` gives ``p = 1``; a constant
    non-zero difference gives the interval ``[d, d]`` and ``p_t = 0``; fewer than 2 seeds give
    ``None`` for the interval and the tests."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or not np.isfinite(d).all():
        raise ValueError(f"differences must be a 1-D list of finite numbers, got {diffs!r}")
    n = d.size
    out = {"n": n, "mean": float(d.mean()) if n else None, "std": float(d.std(ddof=1)) if n > 1 else None,
           "ci_low": None, "ci_high": None, "p_t": None, "p_wilcoxon": None}
    if n < 2:
        return out
    mean, std = out["mean"], out["std"]
    half = sps.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    out["ci_low"], out["ci_high"] = mean - half, mean + half
    if std == 0:
        out["p_t"] = 1.0 if mean == 0 else 0.0
    else:
        out["p_t"] = float(sps.ttest_1samp(d, 0.0).pvalue)
    if not d.any():
        out["p_wilcoxon"] = 1.0
    else:
        out["p_wilcoxon"] = float(sps.wilcoxon(d).pvalue)
    return out


def verdict(test: Mapping, lower_is_better: bool = True, alpha: float = ALPHA,
            p_keys: tuple[str, str] = ("p_t", "p_wilcoxon")) -> str:
    """:data:`BETTER`, :data:`WORSE` or :data:`NO_DIFFERENCE` for a :func:`paired_test` of
    ``method - baseline`` by :data:`RULE`, reading the two p-values under ``p_keys`` (the raw
    ones by default; :data:`HOLM_KEYS` for the adjusted ones)."""
    p = [test.get(k) for k in p_keys]
    if test.get("ci_low") is None or None in p:
        return NO_DIFFERENCE
    if p[0] >= alpha or p[1] >= alpha:
        return NO_DIFFERENCE
    below, above = test["ci_high"] < 0, test["ci_low"] > 0
    if below or above:
        return BETTER if below == lower_is_better else WORSE
    return NO_DIFFERENCE


# --------------------------------------------------------------------------- multiple comparisons

HOLM_KEYS = ("p_t_holm", "p_wilcoxon_holm")


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (Holm, 1979), in the input's order: with the ``m``
    given p sorted ``p_(1) <= ... <= p_(m)``, ``p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``.
    A hypothesis is rejected at level ``alpha`` exactly when ``p~ < alpha``, the step-down test
    that controls the family-wise error rate. ``None`` (no test) stays ``None`` and is not counted
    in ``m``."""
    given = [(i, float(p)) for i, p in enumerate(pvalues) if p is not None]
    if any(not 0 <= p <= 1 for _, p in given):
        raise ValueError(f"p-values must lie in [0, 1], got {list(pvalues)!r}")
    m, out, running = len(given), [None] * len(pvalues), 0.0
    for rank, (i, p) in enumerate(sorted(given, key=lambda ip: ip[1])):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def family_key(row: Mapping) -> tuple[str, str]:
    """The Holm family a comparison row belongs to: its table, ``(metric, reference)``; the
    family holds every (comparison, extractor, steps) row of that table."""
    return row["metric"], row["reference"]


def adjust_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` of :func:`paired_comparisons` with Holm-adjusted p-values per family
    (:func:`family_key`): ``p_t_holm`` and ``p_wilcoxon_holm`` (the raw ``p_t`` and ``p_wilcoxon``
    kept), ``holm_family`` (how many rows the family has), ``verdict`` on the adjusted p and
    ``verdict_unadjusted`` on the raw p (new dicts, in the same order)."""
    out = [dict(r) for r in rows]
    for family in dict.fromkeys(family_key(r) for r in out):
        mine = [r for r in out if family_key(r) == family]
        for raw, adjusted in zip(("p_t", "p_wilcoxon"), HOLM_KEYS):
            for r, p in zip(mine, holm([r[raw] for r in mine])):
                r[adjusted] = p
        for r in mine:
            lower = LOWER_IS_BETTER[r["metric"]]
            r["holm_family"] = len(mine)
            r["verdict_unadjusted"] = verdict(r, lower)
            r["verdict"] = verdict(r, lower, p_keys=HOLM_KEYS)
    return out


def paired_comparisons(per_seed: Sequence[Mapping], comparisons: Sequence[tuple[str, str]], *,
                       metrics: Sequence[str] = ("fid", "kid"), extractors: Sequence[str] | None = None,
                       references: Sequence[str] = ("test", "train")) -> list[dict]:
    """One row per (comparison, extractor, reference, metric, steps both rows have): the
    per-seed differences ``method - baseline`` (seeds where either is missing are dropped),
    :func:`paired_test`, how many seeds the method is better in, the Holm-adjusted p-values
    and the :func:`verdict` on them (:func:`adjust_rows`).
    ``comparisons``: ``(method key, baseline key)`` pairs of row keys."""
    if not per_seed:
        raise ValueError("a study needs the results of at least one seed")
    extractors = list(extractors or per_seed[0]["extractors"])
    labels = {e["key"]: e["label"] for r in per_seed for e in r["entries"]}
    steps_of: dict[str, set[int]] = {}
    for r in per_seed:
        for e in r["entries"]:
            steps_of.setdefault(e["key"], set()).add(e["steps"])
    seeds = [r.get("seed", i) for i, r in enumerate(per_seed)]
    rows = []
    for method, baseline in comparisons:
        for key in (method, baseline):
            if key not in labels:
                raise ValueError(f"comparison ({method!r}, {baseline!r}): no row {key!r} in the results "
                                 f"(rows: {sorted(labels)})")
        for extractor in extractors:
            for reference in references:
                for metric in metrics:
                    for s in sorted(steps_of[method] & steps_of[baseline]):
                        rows.append(_comparison_row(per_seed, seeds, method, baseline, s, metric, extractor,
                                                    reference, labels))
    return adjust_rows([r for r in rows if r is not None])


def _comparison_row(per_seed, seeds, method, baseline, steps, metric, extractor, reference, labels):
    a = seed_values(per_seed, method, steps, metric, extractor, reference)
    b = seed_values(per_seed, baseline, steps, metric, extractor, reference)
    pairs = [(s, x - y) for s, x, y in zip(seeds, a, b) if x is not None and y is not None]
    if not pairs:
        return None
    lower = LOWER_IS_BETTER[metric]
    diffs = [d for _, d in pairs]
    test = paired_test(diffs)
    better = sum(d < 0 if lower else d > 0 for d in diffs)
    return {"method": method, "baseline": baseline, "method_label": labels[method],
            "baseline_label": labels[baseline], "steps": steps, "metric": metric, "extractor": extractor,
            "reference": reference, "seeds": [s for s, _ in pairs], "diffs": diffs, **test,
            "method_better_in": int(better)}


# --------------------------------------------------------------------------- conclusions


def _steps_text(steps: Sequence[int]) -> str:
    s = [str(x) for x in sorted(steps)]
    text = s[0] if len(s) == 1 else ", ".join(s[:-1]) + " and " + s[-1]
    return f"{text} step{'s' if len(s) > 1 or s[0] != '1' else ''}"


# --------------------------------------------------------------------------- extractor families

CLASSIFIER_FREE = ("random-conv", "pixels", "pca")
CLASSIFIER_FEATURES, CLASSIFIER_FREE_FEATURES = "classifier features", "classifier-free features"
MIXED = "mixed"
FAMILIES_TEXT = ("Extractor families: *classifier-free features* are `random-conv`, `pixels` and `pca` (no "
                 "trained classifier in them); every other extractor (`classifier`, `mlp-classifier`, any other "
                 "trained classifier, `inception`) gives *classifier features*. A family is **mixed** at a number "
                 "of steps where its extractors' verdicts differ.")


def extractor_family(name: str) -> str:
    """:data:`CLASSIFIER_FREE_FEATURES` for the extractors no trained classifier is in
    (:data:`CLASSIFIER_FREE`: a random conv net, raw pixels, PCA of pixels);
    :data:`CLASSIFIER_FEATURES` for every other (the evaluation classifier, any other trained
    classifier, Inception). The two families can rank methods differently: a classifier is
    taught which pixel changes not to see."""
    return CLASSIFIER_FREE_FEATURES if name in CLASSIFIER_FREE else CLASSIFIER_FEATURES


def _family_verdict(verdicts: Mapping[str, str]) -> str:
    """The family's verdict at one step count: the one its extractors share, else ``mixed
    (... under `a`, ... under `b`)``."""
    if len(set(verdicts.values())) == 1:
        return next(iter(verdicts.values()))
    return f"{MIXED} (" + ", ".join(f"{v} under `{e}`" for e, v in verdicts.items()) + ")"


def family_line(rows: Sequence[Mapping]) -> str:
    """One conclusion line for the rows of one comparison (one metric and reference): the
    verdict per extractor family, ``under classifier features (...) worse at 1 step, ...; under
    classifier-free features (...) ...``; a family whose extractors disagree is ``mixed``."""
    r0 = rows[0]
    n = max(r["n"] for r in rows)
    parts = []
    for family in (CLASSIFIER_FEATURES, CLASSIFIER_FREE_FEATURES):
        mine = [r for r in rows if extractor_family(r["extractor"]) == family]
        if not mine:
            continue
        names = list(dict.fromkeys(r["extractor"] for r in mine))
        at = {s: _family_verdict({r["extractor"]: r["verdict"] for r in mine if r["steps"] == s})
              for s in sorted({r["steps"] for r in mine})}
        said = ", ".join(f"{v} at {_steps_text([s for s in at if at[s] == v])}" for v in dict.fromkeys(at.values()))
        parts.append(f"under {family} (" + ", ".join(f"`{e}`" for e in names) + f") {said}")
    return (f"{r0['method_label']} vs {r0['baseline_label']} by extractor family ({r0['metric'].upper()} "
            f"against {r0['reference']}, {n} seeds): " + "; ".join(parts) + ".")


def conclusions(rows: Sequence[Mapping], *, metric: str = "fid", reference: str = "test") -> list[str]:
    """The conclusion lines, generated from the verdicts of :func:`paired_comparisons` by
    :data:`RULE`, for ``metric`` against ``reference``: per comparison, its verdict per
    extractor family (:func:`family_line`), one line per extractor, then one per steps where
    the extractors disagree, or one saying they all agree."""
    rows = [r for r in rows if r["metric"] == metric and r["reference"] == reference]
    lines = []
    if rows:
        lines += floor_lines(rows, metric, reference)
    comparisons = list(dict.fromkeys((r["method"], r["baseline"]) for r in rows))
    extractors = list(dict.fromkeys(r["extractor"] for r in rows))
    for m, b in comparisons:
        mine = [r for r in rows if (r["method"], r["baseline"]) == (m, b)]
        ml, bl = mine[0]["method_label"], mine[0]["baseline_label"]
        lines.append(family_line(mine))
        for ext in extractors:
            by = {r["steps"]: r["verdict"] for r in mine if r["extractor"] == ext}
            parts = [f"{v} at {_steps_text([s for s in by if by[s] == v])}"
                     for v in (BETTER, WORSE, NO_DIFFERENCE) if v in by.values()]
            n = max((r["n"] for r in mine if r["extractor"] == ext), default=0)
            lines.append(f"Under `{ext}` ({metric.upper()} against {reference}, {n} seeds), {ml} vs {bl}: "
                         + "; ".join(parts) + ".")
        steps = sorted({r["steps"] for r in mine})
        disagree = False
        for s in steps:
            verdicts = {r["extractor"]: r["verdict"] for r in mine if r["steps"] == s}
            if len(set(verdicts.values())) > 1:
                disagree = True
                opposite = {BETTER, WORSE} <= set(verdicts.values())
                lines.append(f"**The extractors disagree** on {ml} vs {bl} at {_steps_text([s])}"
                             f"{' (in opposite directions)' if opposite else ''}: "
                             + "; ".join(f"{v} under `{e}`" for e, v in verdicts.items()) + ".")
        if not disagree and len(extractors) > 1:
            lines.append(f"All {len(extractors)} extractors agree on {ml} vs {bl} at every step count.")
    return lines


def floor_lines(rows: Sequence[Mapping], metric: str, reference: str) -> list[str]:
    """One line when the table of ``rows`` (one Holm family) has too few seeds for any verdict
    (:func:`min_seeds`); none otherwise."""
    cells, n = len(rows), max(r["n"] for r in rows)
    need = min_seeds(cells)
    if n >= need:
        return []
    return [f"**No verdict is possible in this table** ({metric.upper()} against {reference}): it has "
            f"{cells} cells and {n} seeds; the exact Wilcoxon p of {n} seeds is at least {2 / 2 ** n:.3g}, "
            f"which Holm multiplies by {cells}, so every verdict reads no difference shown whatever the "
            f"data. Read the intervals, the raw p and the seed counts; a verdict needs at least {need} seeds."]


def metric_disagreements(rows: Sequence[Mapping], *, reference: str = "test",
                         metrics: tuple[str, str] = ("fid", "kid")) -> list[str]:
    """Lines for every (comparison, extractor, steps) where the verdicts of two metrics differ."""
    a, b = metrics
    index = {(r["method"], r["baseline"], r["extractor"], r["steps"], r["metric"]): r for r in rows
             if r["reference"] == reference}
    lines = []
    for (m, bl, ext, s, metric), r in index.items():
        other = index.get((m, bl, ext, s, b))
        if metric == a and other is not None and other["verdict"] != r["verdict"]:
            lines.append(f"Under `{ext}` at {_steps_text([s])}, {a.upper()} and {b.upper()} disagree on "
                         f"{r['method_label']} vs {r['baseline_label']}: {a.upper()} {r['verdict']}, "
                         f"{b.upper()} {other['verdict']}.")
    return lines
