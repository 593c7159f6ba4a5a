"""rcfd.report.stats: the paired tests against references computed here without scipy (the t
distribution in closed form, the exact Wilcoxon distribution by enumeration, a textbook
example), their symmetries, the verdict rule on known positive, null and negative
differences, and the conclusion lines generated from them."""

import itertools
import math

import numpy as np
import pytest

from rcfd.report import stats

SEEDS = list(range(10))

# Two-sided 95% quantiles t_{0.975, df} of Student's t (any statistics table).
T_975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456}
# Student's sleep data (Cushny & Peebles), extra sleep of drug 2 minus drug 1 in each of 10
# patients: the paired t-test every textbook works, t = 4.0621 on 9 df, p = 0.002833, 95%
# interval [0.7001142, 2.4598858] (R's ``t.test(extra ~ group, sleep, paired = TRUE)``).
SLEEP = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with integer ``df``, in closed form (Abramowitz and
    Stegun 26.7.3 and 26.7.4): with ``theta = atan(|t| / sqrt(df))``, ``P(|T| < |t|)`` is
    ``sin(theta) sum_{k < df/2} c_k cos(theta)^{2k}``, ``c_k = prod_{j<=k} (2j-1)/(2j)``, for
    even ``df``, and ``(2/pi) (theta + sin(theta) sum_{k < (df-1)/2} c_k cos(theta)^{2k+1})``,
    ``c_k = prod_{j<=k} 2j/(2j+1)``, for odd ``df``."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, series = math.cos(theta) ** 2, 0.0
    if df % 2 == 0:
        term = 1.0
        for k in range(df // 2):
            series += term
            term *= (2 * k + 1) / (2 * k + 2) * c2
        return 1 - math.sin(theta) * series
    term = math.cos(theta)
    for k in range((df - 1) // 2):
        series += term
        term *= (2 * k + 2) / (2 * k + 3) * c2
    return 1 - 2 / math.pi * (theta + math.sin(theta) * series)


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """``t_{(1+c)/2, df}``: the ``t`` with ``P(|T| >= t) = 1 - c``, by bisection."""
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1 - confidence else (lo, mid)
    return lo


def t_reference(d, confidence: float = 0.95) -> dict:
    """The one-sample t statistics of ``d`` from the formulas: ``sd = sqrt(sum (d - mean)^2 /
    (n - 1))``, ``t = mean / (sd / sqrt(n))``, ``p = P(|T_{n-1}| >= |t|)``, the interval
    ``mean +- t_{(1+c)/2, n-1} sd / sqrt(n)``."""
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    return {"mean": mean, "std": sd, "p_t": t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1),
            "ci_low": mean - half, "ci_high": mean + half}


def wilcoxon_exact_p(d) -> float:
    """The exact two-sided signed-rank p of ``d`` (non-zero, distinct ``|d|``) by enumeration:
    rank ``|d|`` 1..n, ``W+`` = the sum of the ranks of the positive ``d``; ``p`` = the share of
    the ``2^n`` sign patterns whose ``W+`` lies at least as far from ``n(n+1)/4``."""
    n = len(d)
    rank = {i: r + 1 for r, i in enumerate(sorted(range(n), key=lambda i: abs(d[i])))}
    centre = n * (n + 1) / 4
    observed = abs(sum(rank[i] for i in range(n) if d[i] > 0) - centre)
    extreme = sum(abs(sum(r for r, pos in zip(range(1, n + 1), signs) if pos) - centre) >= observed
                  for signs in itertools.product((False, True), repeat=n))
    return extreme / 2 ** n


def test_the_t_reference_gives_the_table_quantiles():
    for df, q in T_975.items():
        assert t_quantile(df) == pytest.approx(q, abs=2e-9)
        assert t_two_sided_p(q, df) == pytest.approx(0.05, rel=1e-8)
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| >= 1) = 1/2
    assert t_two_sided_p(0.0, 7) == 1.0


@pytest.mark.parametrize("df", sorted(T_975))
def test_interval_half_width_is_the_table_quantile(df):
    """Differences with mean 1 and sample std 1: the half-width is ``t_{0.975, df} /
    sqrt(n)``."""
    n = df + 1
    z = np.arange(n) - (n - 1) / 2
    d = 1 + z / math.sqrt((z ** 2).sum() / (n - 1))
    got = stats.paired_test(d)
    assert got["std"] == pytest.approx(1.0, rel=1e-12)
    assert (got["ci_high"] - got["ci_low"]) / 2 == pytest.approx(T_975[df] / math.sqrt(n), rel=1e-9)


def test_the_textbook_paired_example():
    got = stats.paired_test(SLEEP)
    assert got["n"] == 10 and got["mean"] == pytest.approx(1.58)
    assert got["mean"] / (got["std"] / math.sqrt(10)) == pytest.approx(4.0621, abs=5e-5)
    assert got["p_t"] == pytest.approx(0.002833, abs=5e-7)
    assert got["ci_low"] == pytest.approx(0.7001142, abs=5e-8)
    assert got["ci_high"] == pytest.approx(2.4598858, abs=5e-8)


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 3), (2, 5), (3, 10), (4, 31)])
def test_paired_test_matches_the_formulas(seed, n):
    d = list(np.random.RandomState(seed).randn(n) + 0.3)
    got, want = stats.paired_test(d), t_reference(d)
    assert got["n"] == n
    for key in ("mean", "std", "p_t", "ci_low", "ci_high"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("d", [
    [0.3, -0.1, 0.7, 0.45, -0.2],
    [-1.5, 0.25, 2.0, 0.75, -0.5, 1.25],
    [0.9, 0.8, -0.05, 0.6, 0.55, 0.4, -0.3, 0.2],
    [-0.11, -0.42, 0.33, -0.25, -0.61, 0.07, -0.94, -0.58, 0.19, -0.77],
], ids=len)
def test_wilcoxon_p_is_the_exact_enumeration(d):
    assert stats.paired_test(d)["p_wilcoxon"] == pytest.approx(wilcoxon_exact_p(d), rel=1e-9)


@pytest.mark.parametrize("seed,n", [(5, 2), (6, 4), (7, 6), (8, 10), (9, 25)])
def test_swapping_the_arms_mirrors_everything(seed, n):
    """``baseline - method`` instead of ``method - baseline``: the mean and interval flip
    sign, the spread and both p-values stay, the verdict turns around; p in [0, 1] and the
    interval holds the mean."""
    d = np.random.RandomState(seed).randn(n) * 0.2 + 0.5
    a, b = stats.paired_test(d), stats.paired_test(-d)
    assert b["mean"] == -a["mean"] and b["std"] == a["std"]
    assert (b["ci_low"], b["ci_high"]) == pytest.approx((-a["ci_high"], -a["ci_low"]), rel=1e-12)
    assert b["p_t"] == pytest.approx(a["p_t"], rel=1e-12)
    assert b["p_wilcoxon"] == pytest.approx(a["p_wilcoxon"], rel=1e-12)
    for t in (a, b):
        assert 0 <= t["p_t"] <= 1 and 0 <= t["p_wilcoxon"] <= 1
        assert t["ci_low"] < t["mean"] < t["ci_high"]
    flipped = {stats.BETTER: stats.WORSE, stats.WORSE: stats.BETTER,
               stats.NO_DIFFERENCE: stats.NO_DIFFERENCE}
    assert stats.verdict(b) == flipped[stats.verdict(a)]
    if n >= stats.MIN_SEEDS_WILCOXON:  # a clear shift of 0.5 over a spread of 0.2
        assert stats.verdict(a) == stats.WORSE and stats.verdict(b) == stats.BETTER


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


# --------------------------------------------------------------------------- Holm-Bonferroni


def test_holm_by_hand():
    """m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03,
    2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06; returned in the input's order."""
    got = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert stats.holm([0.3, None, 0.02]) == pytest.approx([0.3, None, 0.04])  # None: not counted in m
    assert stats.holm([0.7, 0.6]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([0.5, 1.5])


@pytest.mark.parametrize("m", [1, 2, 5, 18])
def test_holm_closed_forms(m):
    """Equal p-values all become ``min(1, m p)`` (Bonferroni); one p alone is unchanged; the
    adjusted values keep the raw order, are never below the raw p nor above Bonferroni's."""
    assert stats.holm([0.002] * m) == pytest.approx([min(1.0, m * 0.002)] * m, rel=1e-12)
    p = list(np.random.RandomState(m).uniform(0, 0.2, m))
    adj = stats.holm(p)
    for raw, a in zip(p, adj):
        assert raw <= a <= min(1.0, m * raw) + 1e-15
    order = np.argsort(p, kind="stable")
    assert all(adj[i] <= adj[j] for i, j in zip(order, order[1:]))


def _row(p_t, p_w, metric="fid", reference="test", mean=-1.0):
    return {"metric": metric, "reference": reference, "mean": mean, "ci_low": mean - 0.5, "ci_high": mean + 0.5,
            "p_t": p_t, "p_wilcoxon": p_w}


def test_holm_flips_a_verdict_and_keeps_the_raw_p():
    """Alone, p = 0.03 / 0.02 shows a difference; in a family of two the adjusted t p is 0.06
    and the verdict becomes no difference; another table is another family."""
    (alone,) = stats.adjust_rows([_row(0.03, 0.02)])
    assert alone["verdict"] == alone["verdict_unadjusted"] == stats.BETTER and alone["holm_family"] == 1
    two = stats.adjust_rows([_row(0.03, 0.02), _row(0.03, 0.02), _row(0.03, 0.02, reference="train")])
    for r in two[:2]:
        assert r["p_t"] == 0.03 and r["p_t_holm"] == pytest.approx(0.06) and r["p_wilcoxon_holm"] == pytest.approx(0.04)
        assert r["verdict_unadjusted"] == stats.BETTER and r["verdict"] == stats.NO_DIFFERENCE and r["holm_family"] == 2
    assert two[2]["verdict"] == stats.BETTER and two[2]["holm_family"] == 1


def test_study_rows_carry_holm_per_table():
    rows = stats.paired_comparisons(study(), COMPARISONS)
    fid = [r for r in rows if (r["metric"], r["reference"]) == ("fid", "test")]
    assert len(fid) == 12 and all(r["holm_family"] == 12 for r in fid)  # 3 comparisons x 2 extractors x 2 steps
    adj = stats.holm([r["p_wilcoxon"] for r in fid])
    assert [r["p_wilcoxon_holm"] for r in fid] == pytest.approx(adj)
    for r in rows:
        assert r["p_t_holm"] >= r["p_t"] and r["p_wilcoxon_holm"] >= r["p_wilcoxon"]
        assert r["verdict"] == stats.verdict(r, stats.LOWER_IS_BETTER[r["metric"]], p_keys=stats.HOLM_KEYS)


# --------------------------------------------------------------------------- extractor families


def renamed(per_seed, names):
    """``per_seed`` with its extractors renamed by ``names`` (old -> list of new names: an
    extractor may be copied under several names)."""
    out = []
    for r in per_seed:
        new = [n for old in r["extractors"] for n in names[old]]
        entries = [{**e, "metrics": {n: e["metrics"][old] for old in r["extractors"] for n in names[old]}}
                   for e in r["entries"]]
        out.append({**r, "extractors": new, "primary": {"extractor": new[0], "reference": "test"},
                    "extractor_details": {n: n for n in new}, "entries": entries})
    return out


def test_extractor_families():
    assert [stats.extractor_family(n) for n in ("classifier", "inception", "mlp-classifier")] == \
        [stats.CLASSIFIER_FEATURES] * 3
    assert [stats.extractor_family(n) for n in ("random-conv", "pixels", "pca")] == [stats.CLASSIFIER_FREE_FEATURES] * 3


def test_conclusions_per_family():
    """`classifier` favours RCFD, the classifier-free `pixels` and `random-conv` do not: the
    family line says so; a family whose members disagree is called mixed."""
    rows = stats.paired_comparisons(renamed(study(), {"a": ["classifier"], "b": ["pixels", "random-conv"]}),
                                    COMPARISONS)
    lines = stats.conclusions(rows, metric="fid", reference="test")
    assert ("RCFD vs PD by extractor family (FID against test, 10 seeds): under classifier features (`classifier`) "
            "better at 1 and 2 steps; under classifier-free features (`pixels`, `random-conv`) worse at 1 step, "
            "no difference shown at 2 steps.") in lines
    assert ("Slow vs PD by extractor family (FID against test, 10 seeds): under classifier features (`classifier`) "
            "worse at 1 and 2 steps; under classifier-free features (`pixels`, `random-conv`) worse at 1 and 2 "
            "steps.") in lines
    assert "All 3 extractors agree on Slow vs PD at every step count." in lines
    assert not any("All 3 extractors agree on RCFD" in line or "every extractor" in line for line in lines)
    mixed = stats.conclusions(stats.paired_comparisons(
        renamed(study(), {"a": ["classifier"], "b": ["inception", "pixels"]}), COMPARISONS))
    assert ("RCFD vs PD by extractor family (FID against test, 10 seeds): under classifier features (`classifier`, "
            "`inception`) mixed (better under `classifier`, worse under `inception`) at 1 step, mixed (better under "
            "`classifier`, no difference shown under `inception`) at 2 steps; under classifier-free features "
            "(`pixels`) worse at 1 step, no difference shown at 2 steps.") in mixed


@pytest.mark.parametrize("cells, need", [(1, 6), (8, 9), (12, 9), (24, 10), (32, 11), (33, 11)])
def test_min_seeds_is_where_a_table_first_can_give_a_verdict(cells, need):
    """Below min_seeds the Holm-adjusted exact Wilcoxon p of a table whose every cell is
    all of one sign stays >= 0.05; at it, it falls below."""
    assert stats.min_seeds(cells) == need
    for n, possible in ((need - 1, False), (need, True)):
        p = stats.paired_test(np.arange(1, n + 1) * 0.1)["p_wilcoxon"]
        assert (min(stats.holm([p] * cells)) < stats.ALPHA) is possible, (cells, n)
    assert stats.MIN_SEEDS_WILCOXON == stats.min_seeds(1) == 6


def test_a_table_with_too_few_seeds_says_so_first():
    """The study fixture's FID table against test has 12 cells (3 comparisons x 2 extractors x 2
    steps): 10 seeds can give verdicts; its first 8 cannot, and the conclusions say so first."""
    ten = stats.paired_comparisons(study(), COMPARISONS)
    assert not any("No verdict is possible" in line for line in stats.conclusions(ten))
    eight = stats.conclusions(stats.paired_comparisons(study()[:8], COMPARISONS))
    assert eight[0].startswith("**No verdict is possible in this table** (FID against test): it has 12 cells "
                               "and 8 seeds; the exact Wilcoxon p of 8 seeds is at least 0.00781, which Holm "
                               "multiplies by 12")
    assert "a verdict needs at least 9 seeds" in eight[0]
    assert not any(f" {stats.BETTER} at" in line or f" {stats.WORSE} at" in line for line in eight)
    with pytest.raises(ValueError):
        stats.min_seeds(0)
