"""The comparison module: intervals that cover at their stated rate, no winner from a zero effect, agreement
with the textbook formulas on fixed inputs, and compare() on a fit result."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import binomial_margin
from scipy import stats

from jaxcifar.compare import (
    bootstrap_interval,
    compare,
    compare_scores,
    difference,
    holm,
    mean_at_least,
    probability_of_improvement,
    seeds_needed,
    t_interval,
    variance_decomposition,
    verdict,
    wilson_interval,
)
from jaxcifar.errors import ConfigError

STUDIES = 1000


def simulated_study(rng, effects, seeds: int, seed_sd: float = 0.01, shared_sd: float = 0.01):
    """``{variant: {seed: figure}}``: a per-seed component shared by every variant (the same seed's init and
    data order help or hurt them all) plus independent noise, around each variant's true ``effects``."""
    shared = rng.normal(0, shared_sd, seeds)
    return {v: {s: 0.7 + e + shared[s] + rng.normal(0, seed_sd) for s in range(seeds)} for v, e in enumerate(effects)}


def test_paired_interval_covers_the_true_difference_at_its_rate():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(STUDIES):
        scores = simulated_study(rng, [0.01, 0.0], seeds=5)
        d = difference(scores[0], scores[1])
        assert d["paired"] and d["test"] == "paired t"
        covered += d["ci_low"] <= 0.01 <= d["ci_high"]
    assert abs(covered / STUDIES - 0.95) < binomial_margin(0.95, STUDIES)


@pytest.mark.parametrize("interval, n", [(t_interval, 5), (bootstrap_interval, 50)])
def test_mean_intervals_cover_at_their_rate(interval, n):
    """The t interval is exact for normal figures at any n; the percentile bootstrap only asymptotically (it
    under-covers by about (1 - 0.95) / n at small n), so it is checked at n = 50, where that bias (0.001) is
    far inside the 3-standard-error margin (0.021 over 1000 studies)."""
    rng = np.random.default_rng(1)
    covered = sum(lo <= 0.7 <= hi for lo, hi in (interval(rng.normal(0.7, 0.02, n)) for _ in range(STUDIES)))
    assert abs(covered / STUDIES - 0.95) < binomial_margin(0.95, STUDIES)


def test_zero_effect_names_no_winner_beyond_the_error_rate():
    """Four variants with equal true means: a winner needs all three Holm-adjusted comparisons significant, so
    one is named in at most 5 % of studies (the family-wise rate), checked with a 3-standard-error margin."""
    rng = np.random.default_rng(2)
    winners = sum(compare_scores(simulated_study(rng, [0.0] * 4, seeds=3))["winner"] is not None
                  for _ in range(STUDIES // 2))
    assert winners / (STUDIES // 2) < 0.05 + binomial_margin(0.05, STUDIES // 2)


def test_a_clear_effect_is_named_and_a_small_one_asks_for_seeds():
    rng = np.random.default_rng(3)
    clear = compare_scores(simulated_study(rng, [0.0, 0.05, 0.10], seeds=5, seed_sd=0.002))
    assert clear["winner"] == 2 and clear["tied"] == [] and "Winner: p 2" in verdict(clear, "p")
    close = compare_scores(simulated_study(rng, [0.0, 0.002], seeds=3, seed_sd=0.01))
    assert close["winner"] is None and len(close["tied"]) == 1
    need = close["differences"][close["tied"][0]]["seeds_needed"]
    assert need is None or need > 3
    assert "cannot be told apart" in verdict(close, "p")


def test_one_seed_names_no_winner():
    one = compare_scores({"a": {0: 0.71}, "b": {0: 0.69}}, n_test=10_000)
    assert one["winner"] is None and one["differences"]["b"]["test"] == "none (one run)"
    assert "No winner can be named from one seed" in verdict(one)
    acc, low, high = one["wilson"]["a"][0]
    assert acc == 0.71 and low < 0.71 < high


@pytest.mark.parametrize("n", range(2, 201))
def test_t_interval_uses_the_exact_quantile(n):
    """Against the textbook formula with SciPy's t quantile; both are float64 sums of n terms, so they agree to
    a few ulps of the mean (1e-12 relative leaves room for 200-term rounding, about 200 * 1.1e-16)."""
    x = np.random.default_rng(n).normal(0.7, 0.02, n)
    half = stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)
    np.testing.assert_allclose(t_interval(x), (x.mean() - half, x.mean() + half), rtol=1e-12)


def test_intervals_and_tests_match_their_definitions_on_fixed_inputs():
    a, b = {0: 0.70, 1: 0.72, 2: 0.75}, {0: 0.69, 1: 0.70, 2: 0.74}
    d = difference(a, b)
    diffs = np.array([0.01, 0.02, 0.01])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    # float64 throughout: agreement to 1e-12 relative (a handful of roundings of values near 0.01)
    np.testing.assert_allclose([d["ci_low"], d["ci_high"]], [diffs.mean() - half, diffs.mean() + half], rtol=1e-12)
    t = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(3))
    assert d["p_value"] == pytest.approx(2 * stats.t.sf(t, 2), rel=1e-9)
    # P(A > B) over all 9 pairs of runs, ties half: 0.70 beats 0.69 and ties 0.70 (1.5), 0.72 beats 2, 0.75 all 3
    assert probability_of_improvement(list(a.values()), list(b.values())) == pytest.approx(6.5 / 9, abs=1e-12)
    # Wilson: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), here 740 right of 1000
    z, p, n = stats.norm.ppf(0.975), 0.74, 1000
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    np.testing.assert_allclose(wilson_interval(0.74, 1000), ((centre - spread) / (1 + z * z / n),
                                                             (centre + spread) / (1 + z * z / n)), rtol=1e-9)


def test_holm_adjustment():
    # sorted 0.01, 0.03, 0.04 over m = 3: 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04); NaN passes through
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06], rtol=1e-12)
    assert math.isnan(adjusted[3])
    assert holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1


def test_seeds_needed_matches_the_power_table():
    """A paired t-test at 5 % two-sided needs 10 pairs for 80 % power when the effect is one standard deviation
    of the differences, and 34 at half of one (Cohen's tables for the one-sample t-test)."""
    assert seeds_needed(0.01, 0.01) == 10
    assert seeds_needed(0.005, 0.01) == 34
    assert seeds_needed(0.0, 0.01) is None


def test_variance_decomposition_separates_seed_and_test_set_noise():
    """500 runs of equally good models whose per-image errors are independent: the whole seed-to-seed spread is
    finite-sample noise. Shifting each run's accuracy adds a distribution-wise part of the size added."""
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0.3, 1.0, 2000)  # each image's chance of being right
    correct = rng.random((500, 2000)) < difficulty
    same = variance_decomposition(correct.mean(1), 2000, correct)
    # The estimated standard deviations have relative error about 1/sqrt(2 * 500) = 3 %: 3 SE is 0.1 relative.
    assert same["finite_sample_std"] == pytest.approx(same["seed_std"], rel=0.1)
    assert same["test_set_std"] >= same["finite_sample_std"]  # the binomial bound: equal difficulty is the worst
    shift = rng.normal(0, 0.03, (500, 1))  # a model-level shift of 3 points std
    shifted = rng.random((500, 2000)) < np.clip(difficulty + shift, 0, 1)
    parts = variance_decomposition(shifted.mean(1), 2000, shifted)
    assert parts["distribution_std"] > 2 * parts["finite_sample_std"]


def test_compare_on_a_fit_result_groups_and_pairs_by_seed():
    runs = [{"dropout_rate": p, "seed": s} for p in (0.0, 0.5) for s in range(3)]
    accs = [0.60, 0.62, 0.61, 0.65, 0.66, 0.66]
    result = SimpleNamespace(runs=runs, summaries=[{"test_accuracy": a} for a in accs],
                             config=SimpleNamespace(seed=0))
    c = compare(result, by="dropout_rate")
    assert c["best"] == 0.5 and c["variants"][0.0]["n"] == 3 and c["differences"][0.0]["seeds"] == [0, 1, 2]
    assert c["differences"][0.0]["mean"] == pytest.approx(np.mean(accs[3:]) - np.mean(accs[:3]))
    with pytest.raises(ConfigError, match="name ones they have"):
        compare(result, by="learning_rate")
    doubled = SimpleNamespace(runs=runs + runs[:1], summaries=result.summaries * 2, config=result.config)
    doubled.summaries = doubled.summaries[:7]
    with pytest.raises(ConfigError, match="group by every swept key"):
        compare(doubled, by="dropout_rate")


def test_mean_at_least_is_the_one_sided_t_test():
    accuracies = [0.943, 0.945, 0.941, 0.946, 0.944]
    claim = mean_at_least(accuracies, 0.94)
    expected = stats.ttest_1samp(accuracies, 0.94, alternative="greater")
    assert claim["p_value"] == pytest.approx(expected.pvalue, rel=1e-12) and claim["p_value"] < 0.05
    half = stats.t.ppf(0.95, 4) * np.std(accuracies, ddof=1) / math.sqrt(5)  # one-sided 95 % lower bound
    assert claim["lower_bound"] == pytest.approx(np.mean(accuracies) - half, rel=1e-12)
    assert mean_at_least([0.93, 0.935, 0.94], 0.94)["p_value"] > 0.5  # below the target: no support
    assert math.isnan(mean_at_least([0.95], 0.94)["p_value"])  # one run tests nothing


def test_a_named_reference_is_compared_with_every_other_variant():
    rng = np.random.default_rng(5)
    scores = simulated_study(rng, [0.0, -0.05, 0.02], seeds=5, seed_sd=0.002)  # 0 is the reference ("full")
    c = compare_scores(scores, reference=0)
    assert c["reference"] == 0 and sorted(c["differences"]) == [1, 2] and c["winner"] is None
    assert c["differences"][1]["significant"] and c["differences"][1]["mean"] > 0  # removing 1 costs 5 points
    assert c["best"] == 2 and "Against variant 0" in verdict(c) and "different from 1, 2" in verdict(c)
    with pytest.raises(ConfigError, match="not among the variants"):
        compare_scores(scores, reference="nope")
