"""rcfd.report.stats: the paired tests against independent computations, the verdict rule on known
positive, null and negative differences, and the conclusion lines generated from them."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from rcfd.report import stats

SEEDS = list(range(10))


def _t_interval(d, conf=0.95):
    """Textbook t-interval in float64: mean +- t * s / sqrt(n), t from the inverse CDF by bisection."""
    d = np.asarray(d, np.float64)
    n, mean, s = d.size, d.mean(), math.sqrt(((d - d.mean()) ** 2).sum() / (d.size - 1))
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sps.t.cdf(mid, n - 1) < (1 + conf) / 2 else (lo, mid)
    return mean - lo * s / math.sqrt(n), mean + lo * s / math.sqrt(n), 2 * sps.t.sf(abs(mean / (s / math.sqrt(n))), n - 1)


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 3), (2, 10), (3, 31)])
def test_paired_test_matches_textbook_formulas(seed, n):
    d = np.random.RandomState(seed).randn(n) + 0.3
    got = stats.paired_test(d)
    lo, hi, p = _t_interval(d)
    assert got["ci_low"] == pytest.approx(lo, rel=1e-9) and got["ci_high"] == pytest.approx(hi, rel=1e-9)
    assert got["p_t"] == pytest.approx(p, rel=1e-9) and got["n"] == n
    assert got["mean"] == pytest.approx(d.mean()) and got["std"] == pytest.approx(d.std(ddof=1))


def test_wilcoxon_exact_p_for_all_one_sign():
    # all n differences of one sign: the exact two-sided p is 2 / 2^n
    for n in (5, 6, 10):
        d = np.arange(1, n + 1) * 0.1
        assert stats.paired_test(d)["p_wilcoxon"] == pytest.approx(2 / 2 ** n, rel=1e-9)
        assert stats.paired_test(-d)["p_wilcoxon"] == pytest.approx(2 / 2 ** n, rel=1e-9)


def test_paired_test_degenerate_cases():
    assert stats.paired_test([0.0] * 6)["p_t"] == 1.0 and stats.paired_test([0.0] * 6)["p_wilcoxon"] == 1.0
    const = stats.paired_test([0.5] * 6)
    assert const["ci_low"] == const["ci_high"] == 0.5 and const["p_t"] == 0.0
    one = stats.paired_test([1.0])
    assert one["ci_low"] is None and one["p_t"] is None and stats.verdict(one) == stats.NO_DIFFERENCE
    with pytest.raises(ValueError, match="finite"):
        stats.paired_test([1.0, float("nan")])


@pytest.mark.parametrize("shift,lower,expected", [(-1.0, True, stats.BETTER), (1.0, True, stats.WORSE),
                                                  (0.0, True, stats.NO_DIFFERENCE), (1.0, False, stats.BETTER)])
def test_verdicts(shift, lower, expected):
    noise = np.random.RandomState(0).randn(10) * 0.1
    assert stats.verdict(stats.paired_test(shift + noise), lower) == expected


def test_few_seeds_cannot_show_a_difference():
    d = -1.0 + 0.01 * np.arange(5)  # clearly negative, but 5 seeds: Wilcoxon p >= 1/16
    t = stats.paired_test(d)
    assert t["p_t"] < 1e-6 and t["p_wilcoxon"] > 0.05 and stats.verdict(t) == stats.NO_DIFFERENCE
    assert stats.verdict(stats.paired_test(np.append(d, -1.1))) == stats.BETTER  # 6 seeds can


# --------------------------------------------------------------------------- a hand-made study


def study(noise=0.1):
    """Per-seed results with known effects vs PD: under `a`, RCFD better (-1), CFD no
    difference (0), SLOW worse (+1) at 1 and 2 steps; under `b`, RCFD worse at 1 step and
    equal at 2. KID follows FID except for RCFD at 2 steps under `a` (no difference)."""
    rng = np.random.RandomState(1)
    effects = {"a": {"rcfd": (-1.0, -1.0), "cfd": (0.0, 0.0), "slow": (1.0, 1.0)},
               "b": {"rcfd": (1.0, 0.0), "cfd": (0.0, 0.0), "slow": (1.0, 1.0)}}
    per_seed = []
    for seed in SEEDS:
        scale = 1 + seed  # each seed's own extractor scale: cancels in the pairs
        entries = []
        for key, label in (("base", "DDIM (base model)"), ("pd", "PD"), ("rcfd", "RCFD"), ("cfd", "CFD"),
                           ("slow", "Slow")):
            for i, steps in enumerate((1, 2)):
                metrics = {}
                for ext in ("a", "b"):
                    e = 0.0 if key in ("pd", "base") else effects[ext][key][i]
                    f = 10 * scale + e + noise * rng.randn()
                    k = 0.0 if (ext, key, steps) == ("a", "rcfd", 2) else e
                    kid_v = 0.5 * scale + 0.1 * k + 0.01 * noise * rng.randn()
                    ref = {"fid": f, "kid": kid_v, "precision": 0.8, "recall": 0.7}
                    metrics[ext] = {"test": ref, "train": dict(ref, fid=f - 1), "is": 5.0, "is_std": 0.1}
                entries.append({"method": key, "label": label, "sampler": "ddim", "steps": steps, "key": key,
                                "metrics": metrics, "fid": metrics["a"]["test"]["fid"],
                                "kid": metrics["a"]["test"]["kid"], "is": 5.0})
        entries.append({"method": "base", "label": "DDIM (base model)", "sampler": "ddim", "steps": 32,
                        "key": "base", "metrics": {x: {"test": {"fid": 5.0 * scale, "kid": 0.1, "precision": 0.9,
                                                                 "recall": 0.9}, "is": 6.0} for x in "ab"},
                        "fid": 5.0 * scale, "kid": 0.1, "is": 6.0})
        per_seed.append({"preset": "digits", "dataset": "digits", "seed": seed, "extractors": ["a", "b"],
                         "extractor_details": {"a": f"classifier:x:{seed}", "b": "pixels"},
                         "primary": {"extractor": "a", "reference": "test"}, "num_samples": 2000,
                         "num_reference": {"test": 300, "train": 1497}, "teacher": {"key": "base", "steps": 32},
                         "floors": {"two_seeds": [], "test_vs_train": None}, "entries": entries})
    return per_seed


COMPARISONS = [("rcfd", "pd"), ("cfd", "pd"), ("slow", "pd")]


def test_paired_comparisons_pair_by_seed():
    rows = stats.paired_comparisons(study(), COMPARISONS)
    assert {(r["method"], r["extractor"], r["reference"], r["metric"]) for r in rows} == {
        (m, x, ref, metric) for m in ("rcfd", "cfd", "slow") for x in "ab" for ref in ("test", "train")
        for metric in ("fid", "kid")}
    by = {(r["method"], r["extractor"], r["reference"], r["metric"], r["steps"]): r for r in rows}
    r = by[("rcfd", "a", "test", "fid", 1)]
    assert r["seeds"] == SEEDS and r["n"] == 10 and r["mean"] == pytest.approx(-1.0, abs=0.1)
    assert r["verdict"] == stats.BETTER and r["method_better_in"] == 10 and r["ci_high"] < 0
    assert by[("cfd", "a", "test", "fid", 1)]["verdict"] == stats.NO_DIFFERENCE
    assert by[("slow", "b", "test", "fid", 2)]["verdict"] == stats.WORSE
    assert by[("rcfd", "b", "test", "fid", 1)]["verdict"] == stats.WORSE
    assert by[("rcfd", "a", "test", "kid", 2)]["verdict"] == stats.NO_DIFFERENCE
    assert ("rcfd", "a", "test", "fid", 32) not in by  # PD has no 32-step row
    with pytest.raises(ValueError, match="no row 'ddpm'"):
        stats.paired_comparisons(study(), [("ddpm", "pd")])


def test_generated_conclusions():
    rows = stats.paired_comparisons(study(), COMPARISONS)
    lines = stats.conclusions(rows, metric="fid", reference="test")
    assert "Under `a` (FID against test, 10 seeds), RCFD vs PD: better at 1 and 2 steps." in lines
    assert "Under `b` (FID against test, 10 seeds), RCFD vs PD: worse at 1 step; no difference shown at 2 steps." \
        in lines
    assert "Under `a` (FID against test, 10 seeds), CFD vs PD: no difference shown at 1 and 2 steps." in lines
    assert "Under `b` (FID against test, 10 seeds), Slow vs PD: worse at 1 and 2 steps." in lines
    assert ("**The extractors disagree** on RCFD vs PD at 1 step (in opposite directions): better under `a`; "
            "worse under `b`.") in lines
    assert "**The extractors disagree** on RCFD vs PD at 2 steps: better under `a`; no difference shown under `b`." \
        in lines
    assert "All 2 extractors agree on CFD vs PD at every step count." in lines
    kid_lines = stats.metric_disagreements(rows, reference="test")
    assert kid_lines == [("Under `a` at 2 steps, FID and KID disagree on RCFD vs PD: FID better, KID no difference "
                          "shown.")]


def test_cells_and_summaries():
    per_seed = study()
    cells = stats.cells(per_seed)
    assert cells[0] == ("base", "DDIM (base model)", 1) and ("base", "DDIM (base model)", 32) in cells
    v = stats.seed_values(per_seed, "base", 32, "fid", "a", "test")
    assert v == [5.0 * (1 + s) for s in SEEDS]
    s = stats.summarize(v)
    assert s["mean"] == pytest.approx(np.mean(v)) and s["std"] == pytest.approx(np.std(v, ddof=1)) and s["n"] == 10
    assert stats.value(per_seed[0]["entries"][0], "is", "a", "test") == 5.0
    assert stats.value(per_seed[0]["entries"][0], "fid", "missing", "test") is None
