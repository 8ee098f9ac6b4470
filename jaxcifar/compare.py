"""Comparing recipes over seeds, as reviewers of ML papers expect (Bouthillier et al. 2021; Agarwal et al. 2021;
Jordan 2024): each variant's mean with a t and a bootstrap interval, paired differences between variants over
shared seeds (a seed fixes initialization, data order and augmentation, so runs with one seed pair up) with
their interval, p-value and probability of improvement, Holm's correction across a study's comparisons, the
test set's Wilson interval for one model, and the seed-to-seed spread kept apart from the test set's sampling
noise. Host-side NumPy/SciPy on per-run figures; :func:`compare` reads them from a ``fit(runs=...)`` result."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from jaxcifar.errors import ConfigError

CONFIDENCE = 0.95
POWER = 0.8  # the power at which seeds_needed tells two variants apart
Scores = Mapping[Any, Mapping[int, float]]  # variant -> {seed: figure}
SCORE_METRICS = ("best_val_accuracy", "test_accuracy", "final_test_accuracy", "test_loss")  # exported per run


def _nan_pair() -> tuple[float, float]:
    return float("nan"), float("nan")


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval of the mean, with the exact t quantile for every n (NaN for n < 2)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return _nan_pair()
    sem = x.std(ddof=1) / math.sqrt(len(x))
    if sem == 0:
        return float(x.mean()), float(x.mean())
    low, high = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=sem)
    return float(low), float(high)


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``scipy.stats.bootstrap``; NaN for n < 3, where resampling
    has too few distinct values to mean anything). Seeded: the same figures give the same interval."""
    x = np.asarray(values, np.float64)
    if len(x) < 3:
        return _nan_pair()
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    ci = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                         method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """``n``, ``mean``, ``std`` (ddof=1), ``min``, ``max``, the t interval (``ci_low``/``ci_high``) and the
    bootstrap interval (``boot_low``/``boot_high``) of the mean."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        raise ConfigError("no figures to summarize: give at least one run")
    (lo, hi), (blo, bhi) = t_interval(x, confidence), bootstrap_interval(x, confidence)
    return {"n": len(x), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
            "min": float(x.min()), "max": float(x.max()), "ci_low": lo, "ci_high": hi,
            "boot_low": blo, "boot_high": bhi, "confidence": confidence}


def probability_of_improvement(a: Sequence[float], b: Sequence[float]) -> float:
    """P(A > B): the chance that a run of A beats a run of B, ties counted half (the Mann-Whitney U statistic
    over all pairs of runs divided by their number, as rliable defines it)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(stats.mannwhitneyu(a, b).statistic / (len(a) * len(b)))


def difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """A minus B. Over the seeds both have (at least 2): paired, ``scipy.stats.ttest_rel`` (its interval and
    two-sided p-value). Otherwise unpaired: Welch's ``ttest_ind``. ``p_value`` is NaN when there is no spread
    to test against (n < 2, or every difference equal)."""
    shared = sorted(set(a) & set(b))
    paired = len(shared) >= 2
    x = np.asarray([a[s] for s in shared] if paired else list(a.values()), np.float64)
    y = np.asarray([b[s] for s in shared] if paired else list(b.values()), np.float64)
    testable = len(x) > 1 and len(y) > 1
    out = {"paired": paired, "test": "paired t" if paired else "Welch t" if testable else "none (one run)",
           "seeds": shared if paired else None, "mean": float(x.mean() - y.mean()),
           "prob_improvement": probability_of_improvement(x, y), "confidence": confidence}
    diffs = x - y if paired else None
    if (paired and np.ptp(diffs) > 0) or (not paired and testable and np.ptp(np.r_[x, y]) > 0):
        test = stats.ttest_rel(x, y) if paired else stats.ttest_ind(x, y, equal_var=False)
        ci = test.confidence_interval(confidence)
        out.update(ci_low=float(ci.low), ci_high=float(ci.high), p_value=float(test.pvalue))
    else:
        low, high = (out["mean"], out["mean"]) if paired else _nan_pair()
        out.update(ci_low=low, ci_high=high, p_value=float("nan"))
    out["std"] = float(diffs.std(ddof=1)) if paired else float("nan")
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for several comparisons in one study (NaN stays NaN): the
    family-wise error rate stays at the chosen level. SciPy has Benjamini-Hochberg but not Holm."""
    p = np.asarray(p_values, np.float64)
    order = [i for i in np.argsort(p) if not np.isnan(p[i])]
    adjusted, running = p.copy(), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def seeds_needed(mean: float, std: float, confidence: float = CONFIDENCE, power: float = POWER,
                 limit: int = 10_000) -> int | None:
    """How many paired seeds a two-sided paired t-test needs to detect a true difference ``mean`` with
    seed-to-seed spread of the differences ``std`` at ``power`` (noncentral t); None when ``mean`` is 0 or
    more than ``limit`` would be needed."""
    if not mean or not np.isfinite(std) or std <= 0:
        return None
    effect = abs(mean) / std
    z = stats.norm.ppf(1 - (1 - confidence) / 2) + stats.norm.ppf(power)
    # The normal approximation needs fewer pairs than the t-test ever does: search upward from it.
    for n in range(max(2, math.floor((z / effect) ** 2)), limit + 1):
        crit, shift = stats.t.ppf(1 - (1 - confidence) / 2, n - 1), effect * math.sqrt(n)
        if stats.nct.sf(crit, n - 1, shift) + stats.nct.cdf(-crit, n - 1, shift) >= power:
            return n
    return None


def wilson_interval(accuracy: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The test set's own sampling interval for one model's accuracy on ``n`` images (Wilson score)."""
    ci = stats.binomtest(round(accuracy * n), n).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def variance_decomposition(accuracies: Sequence[float], n_test: int,
                           correct: np.ndarray | None = None) -> dict[str, float]:
    """The seed-to-seed spread of test accuracy on one fixed test set (``seed_std``) beside the test set's
    sampling noise for one model (``test_set_std`` = sqrt(p(1-p)/n), binomial): the first is what another set
    of seeds changes, the second what another test set of the same size would change, and it does not average
    away over seeds. With ``correct`` (runs x images, 0/1) the seed variance is split as in Jordan 2024 into
    the part explained by independent per-image flips (``finite_sample_std``) and the rest, which reflects real
    differences between the trained models (``distribution_std``)."""
    acc = np.asarray(accuracies, np.float64)
    p = float(acc.mean())
    out = {"seed_std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
           "test_set_std": math.sqrt(p * (1 - p) / n_test)}
    if correct is not None and len(acc) > 1:
        c = np.asarray(correct, np.float64)
        per_image = c.mean(0) * (1 - c.mean(0)) * len(c) / (len(c) - 1)  # unbiased Bernoulli variance per image
        finite = float(per_image.sum()) / c.shape[1] ** 2
        out.update(finite_sample_std=math.sqrt(finite),
                   distribution_std=math.sqrt(max(0.0, out["seed_std"] ** 2 - finite)))
    return out


def mean_at_least(values: Sequence[float], target: float, confidence: float = CONFIDENCE) -> dict[str, float]:
    """The record repositories' test of a claim "mean accuracy >= target": a one-sided t-test of H0 mean <= target
    (``scipy.stats.ttest_1samp``, ``alternative="greater"``), with the one-sided lower confidence bound of the
    mean. A small ``p_value`` supports the claim; NaN for n < 2 or no spread."""
    x = np.asarray(values, np.float64)
    out = {"target": target, "n": len(x), "mean": float(x.mean()), "p_value": float("nan"), "lower_bound": float("nan")}
    if len(x) > 1 and np.ptp(x) > 0:
        test = stats.ttest_1samp(x, target, alternative="greater")
        out.update(p_value=float(test.pvalue), lower_bound=float(test.confidence_interval(confidence).low))
    return out


def compare_scores(scores: Scores, confidence: float = CONFIDENCE, higher_is_better: bool = True,
                   n_test: int | None = None, reference: Any = None) -> dict[str, Any]:
    """Compare variants (``{variant: {seed: figure}}``). The ``reference`` variant (default: the best by mean)
    is compared with each other one (:func:`difference`, reference minus other, Holm-adjusted over the study).
    The best is the ``winner`` only when it beats every other variant at ``confidence``; otherwise ``tied``
    lists the variants the reference cannot be told apart from, each with ``seeds_needed`` at the measured
    spread. ``n_test`` adds every run's ``(figure, Wilson low, high)``."""
    if not scores or any(not runs for runs in scores.values()):
        raise ConfigError("compare needs at least one run per variant")
    if reference is not None and reference not in scores:
        raise ConfigError(f"compare: reference {reference!r} is not among the variants {list(scores)}")
    sign = 1.0 if higher_is_better else -1.0
    variants = {v: summarize(list(runs.values()), confidence) for v, runs in scores.items()}
    best = max(variants, key=lambda v: sign * variants[v]["mean"])
    base = best if reference is None else reference
    others = [v for v in scores if v != base]
    diffs = {v: difference(scores[base], scores[v], confidence) for v in others}
    for v, adj in zip(others, holm([d["p_value"] for d in diffs.values()]), strict=True):
        d = diffs[v]
        d["p_holm"] = adj
        d["significant"] = bool(adj < 1 - confidence)
        d["seeds_needed"] = None if d["significant"] else seeds_needed(d["mean"], d["std"], confidence)
    tied = [v for v in others if not diffs[v]["significant"]]
    clear = base == best and others and not tied and variants[best]["n"] > 1
    out = {"confidence": confidence, "variants": variants, "best": best, "reference": base, "differences": diffs,
           "tied": tied, "winner": best if clear else None}
    if n_test:
        out["wilson"] = {v: {s: (x, *wilson_interval(x, n_test, confidence)) for s, x in runs.items()}
                         for v, runs in scores.items()}
    return out


def verdict(comparison: Mapping[str, Any], name: str = "variant") -> str:
    """One sentence that says what the comparison supports: a winner, or which variants cannot be told apart
    from the reference (the best, unless one was named) and how many seeds would tell them apart."""
    ref, level = comparison["reference"], f"{comparison['confidence']:.0%}"
    if comparison["variants"][ref]["n"] < 2:
        return (f"No winner can be named from one seed per {name}: seed-to-seed spread is unmeasured. "
                f"Train 3 or more seeds per {name}; each run's Wilson interval shows the test set's own noise.")
    if comparison["winner"] is not None:
        return f"Winner: {name} {ref}, better than every other {name} (paired, Holm-adjusted, {level})."
    tied = ", ".join(f"{v} (~{need} seeds to tell apart)" if (need := comparison["differences"][v]["seeds_needed"])
                     else str(v) for v in comparison["tied"])
    if ref == comparison["best"]:
        return f"No winner at {level}: {name} {ref} has the best mean but cannot be told apart from {tied}."
    differ = ", ".join(str(v) for v in comparison["differences"] if v not in comparison["tied"]) or "none"
    return (f"Against {name} {ref} at {level} (Holm-adjusted): different from {differ}; "
            f"not told apart from {tied or 'none'}.")


def compare(result: Any, by: str | Sequence[str], metric: str = "test_accuracy", **options: Any) -> dict[str, Any]:
    """:func:`compare_scores` on a ``fit(runs=...)`` result: runs grouped by the value(s) of ``by`` (a run key
    such as ``"dropout_rate"``), paired by seed, scored by ``metric`` from each run's summary."""
    return compare_scores(scores_by(result.runs, result.summaries, by, metric, result.config.seed), **options)


def scores_by(runs: Sequence[Mapping[str, Any]], summaries: Sequence[Mapping[str, Any]], by: str | Sequence[str],
              metric: str, default_seed: int = 0) -> dict[Any, dict[int, float]]:
    """``{variant: {seed: summary[metric]}}``; a variant is the value of ``by`` (a tuple for several keys)."""
    keys = (by,) if isinstance(by, str) else tuple(by)
    out: dict[Any, dict[int, float]] = {}
    for run, summary in zip(runs, summaries, strict=True):
        missing = [k for k in keys if k not in run]
        if missing or metric not in summary:
            raise ConfigError(f"compare(by={by!r}, metric={metric!r}): the runs have keys {sorted(run)} and "
                              f"summaries {sorted(summary)}: name ones they have")
        variant = run[keys[0]] if len(keys) == 1 else tuple(run[k] for k in keys)
        seed = int(run.get("seed", default_seed))
        if seed in out.setdefault(variant, {}):
            raise ConfigError(f"compare: two runs of {variant!r} with seed {seed}: group by every swept key")
        out[variant][seed] = float(summary[metric])
    return out


def score_matrix(runs: Sequence[Mapping[str, Any]], summaries: Sequence[Mapping[str, Any]],
                 variant_of: Any, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """The per-run scores as records (``variant``, ``seed``, one column per metric) that ``pandas.DataFrame``
    reads directly (and rliable after a pivot to runs x metrics per variant)."""
    return [{"variant": variant_of(run), "seed": run.get("seed"), **{m: summary.get(m) for m in metrics}}
            for run, summary in zip(runs, summaries, strict=True)]
