"""Statistics for comparing methods on the same prompts: bootstrap intervals, paired tests, and a
length-controlled win rate in the spirit of AlpacaEval 2.

Intervals are percentile bootstrap intervals from `scipy.stats.bootstrap` (prompts resampled with
replacement); the paired test's p-value is a sign-flip permutation test from `scipy.stats.permutation_test`.
Every random draw comes from a `numpy.random.Generator` seeded with the caller's seed, so a result is the
same for the same seed.

Length control: preferences p_i in [0, 1] (1 = the method's answer beats the baseline) are regressed on the
length difference with a logistic model, logit P(win) = b0 + b1 * tanh(d_i / sd(d)), d_i = len(method) -
len(baseline), fitted on the soft labels as a statsmodels binomial GLM with a small ridge on b1 (which keeps
perfectly separable data and length differences that are all equal finite). The length-controlled win rate
is the model's prediction at d = 0, sigmoid(b0): what the win rate would be if the answers were equally long.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats
from scipy.special import expit
from statsmodels.genmod.families import Binomial
from statsmodels.genmod.generalized_linear_model import GLM

LC_RIDGE = 1e-3  # L2 penalty on the length coefficient, on the summed log-likelihood


def mean(xs) -> float:
    """Arithmetic mean of an iterable of numbers; NaN when it is empty."""
    a = np.fromiter(xs, dtype=float)
    return float(a.mean()) if a.size else float("nan")


def _vectorized_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _percentile_interval(data: tuple[np.ndarray, ...], statistic: Callable, estimate: float, n_boot: int,
                         alpha: float, seed: int, vectorized: bool) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the observations (the rows of every array in `data`,
    resampled together). Data too small to resample (one observation) gives the estimate at both ends, and a
    NaN estimate gives a NaN interval."""
    if math.isnan(estimate):
        return float("nan"), float("nan")
    if len(data[0]) < 2:
        return estimate, estimate
    res = stats.bootstrap(data, statistic, n_resamples=n_boot, vectorized=vectorized, paired=len(data) > 1,
                          confidence_level=1 - alpha, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_ci(values: list[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                 stat=mean) -> tuple[float, float, float]:
    """(estimate, low, high): percentile bootstrap interval of `stat` over resampled values.

    `stat` maps a 1-D numpy array of values to a number. Empty values give NaN throughout; values with a NaN
    give a NaN interval (and the mean is NaN)."""
    x = np.asarray(values, dtype=float)
    if not x.size:
        return float("nan"), float("nan"), float("nan")
    est = float(stat(x))
    if np.isnan(x).any():
        return est, float("nan"), float("nan")
    vectorized = stat is mean
    lo, hi = _percentile_interval((x,), _vectorized_mean if vectorized else stat, est, n_boot, alpha, seed,
                                  vectorized)
    return est, lo, hi


def _abs_mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.abs(np.mean(a - b, axis=axis))


def paired_test(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two methods scored on the same prompts: mean difference a - b, its bootstrap
    interval, and a two-sided sign-flip permutation p-value (exact when 2**n <= n_boot; NaN when a score is
    NaN)."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs equal lengths (got {len(a)} and {len(b)})")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = x - y
    est, lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    if np.isnan(d).any():
        p_value = float("nan")
    elif len(d) < 2:  # a sign flip cannot change |sum(d)| of one difference: no evidence either way
        p_value = 1.0
    else:
        # swapping a pair's two scores flips the sign of its difference; two-sided through |mean difference|
        p_value = float(stats.permutation_test((x, y), _abs_mean_difference, permutation_type="samples",
                                               vectorized=True, n_resamples=n_boot, alternative="greater",
                                               rng=np.random.default_rng(seed + 1)).pvalue)
    return {"mean_diff": est, "ci_low": lo, "ci_high": hi, "p_value": p_value, "n": len(d),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}


def _lc_fit(prefs: np.ndarray, len_diff: np.ndarray) -> tuple[float, float, float]:
    """(sigmoid(b0), b1, sd) of the length-control model (see the module docstring)."""
    sd = float(np.std(len_diff)) or 1.0
    if np.isnan(prefs).any() or np.isnan(sd):
        return float("nan"), float("nan"), sd
    exog = np.column_stack([np.ones(len(len_diff)), np.tanh(len_diff / sd)])
    model = GLM(np.clip(prefs, 0.0, 1.0), exog, family=Binomial())
    # L1_wt=0: a pure ridge, per observation as statsmodels scales it; the intercept is not penalised
    fit = model.fit_regularized(method="elastic_net", alpha=np.array([0.0, LC_RIDGE / len(prefs)]), L1_wt=0.0)
    b0, b1 = fit.params
    return float(expit(b0)), float(b1), sd


def length_controlled_win_rate(prefs: list[float], len_diff: list[float]) -> dict:
    """Raw and length-controlled win rate of a method against a baseline (see the module docstring).

    A NaN preference or length difference makes the win rates and the length coefficient NaN."""
    if len(prefs) != len(len_diff) or not len(prefs):
        raise ValueError("prefs and len_diff must be non-empty and of equal length")
    p, d = np.asarray(prefs, dtype=float), np.asarray(len_diff, dtype=float)
    lc, coef, sd = _lc_fit(p, d)
    return {"win_rate": mean(p), "lc_win_rate": lc, "length_coef": coef, "len_sd": sd}


def _lc_statistic(prefs: np.ndarray, len_diff: np.ndarray) -> float:
    return _lc_fit(prefs, len_diff)[0]


def lc_win_rate_ci(prefs: list[float], len_diff: list[float], n_boot: int = 300, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the length-controlled win rate (resampling prompts; the model, including
    sd(d), is refitted on every resample)."""
    p, d = np.asarray(prefs, dtype=float), np.asarray(len_diff, dtype=float)
    if len(p) != len(d) or not len(p):
        raise ValueError("prefs and len_diff must be non-empty and of equal length")
    return _percentile_interval((p, d), _lc_statistic, _lc_statistic(p, d), n_boot, 0.05, seed,
                                vectorized=False)


def _ratio_of_sums(agree: np.ndarray, total: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(agree, axis=axis) / np.sum(total, axis=axis)


def pairwise_agreement(groups: list[list[tuple[float, float]]], n_boot: int = 1000, seed: int = 0) -> dict:
    """How often a judge orders two answers to the same prompt like a trusted reference judge does.

    `groups`: per prompt, (reference score, judge score) for each answer. Every pair with different
    reference scores counts; the judge agrees when it orders the pair the same way (a judge tie counts 1/2).
    The 95% interval resamples prompts.
    """
    agree, total = [], []
    for g in groups:
        scores = np.asarray(g, dtype=float).reshape(-1, 2)
        i, j = np.triu_indices(len(scores), k=1)
        dt, dj = scores[i, 0] - scores[j, 0], scores[i, 1] - scores[j, 1]
        keep = dt != 0  # pairs the reference can order
        if keep.any():
            agree.append(float(np.where(dj[keep] == 0, 0.5, (dt[keep] > 0) == (dj[keep] > 0)).sum()))
            total.append(float(keep.sum()))
    if not total:
        return {"agreement": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "pairs": 0, "prompts": 0}
    a, t = np.asarray(agree), np.asarray(total)
    est = float(_ratio_of_sums(a, t))
    lo, hi = _percentile_interval((a, t), _ratio_of_sums, est, n_boot, 0.05, seed, vectorized=True)
    return {"agreement": est, "ci_low": lo, "ci_high": hi, "pairs": int(t.sum()), "prompts": len(t)}
