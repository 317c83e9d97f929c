"""Statistics for comparing methods on the same prompts: bootstrap intervals, paired tests, and a
length-controlled win rate in the spirit of AlpacaEval 2.

Length control: preferences p_i in [0, 1] (1 = the method's answer beats the baseline) are regressed on the
length difference with a logistic model, logit P(win) = b0 + b1 * tanh(d_i / sd(d)), d_i = len(method) -
len(baseline), fitted on the soft labels by Newton's method (with a small ridge). The length-controlled win
rate is the model's prediction at d = 0, sigmoid(b0): what the win rate would be if the answers were equally
long. Pure Python + math (no numpy needed), deterministic given the seed.
"""
from __future__ import annotations

import math
import random
import statistics


def mean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def bootstrap_ci(values: list[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                 stat=mean) -> tuple[float, float, float]:
    """(estimate, low, high): percentile bootstrap interval of `stat` over resampled values."""
    values = list(values)
    if not values:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    boots = sorted(stat(rng.choices(values, k=len(values))) for _ in range(n_boot))
    lo = boots[int(math.floor(alpha / 2 * n_boot))]
    hi = boots[min(n_boot - 1, int(math.ceil((1 - alpha / 2) * n_boot)) - 1)]
    return stat(values), lo, hi


def paired_test(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two methods scored on the same prompts: mean difference a - b, its bootstrap
    interval, and a two-sided sign-flip permutation p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs equal lengths (got {len(a)} and {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    est, lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    rng = random.Random(seed + 1)
    obs = abs(sum(d))
    hits = sum(abs(sum(x if rng.random() < 0.5 else -x for x in d)) >= obs - 1e-12 for _ in range(n_boot))
    return {"mean_diff": est, "ci_low": lo, "ci_high": hi, "p_value": (hits + 1) / (n_boot + 1), "n": len(d),
            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d), "ties": sum(x == 0 for x in d)}


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def fit_logistic(xs: list[list[float]], ys: list[float], ridge: float = 1e-3, iters: int = 50) -> list[float]:
    """Logistic regression on soft labels ys in [0, 1] (Newton-Raphson, ridge on all but the intercept)."""
    k = len(xs[0])
    w = [0.0] * k
    for _ in range(iters):
        grad = [0.0] * k
        hess = [[0.0] * k for _ in range(k)]
        for x, y in zip(xs, ys):
            p = _sigmoid(sum(wi * xi for wi, xi in zip(w, x)))
            for i in range(k):
                grad[i] += (p - y) * x[i]
                for j in range(k):
                    hess[i][j] += p * (1 - p) * x[i] * x[j]
        for i in range(1, k):
            grad[i] += ridge * w[i]
            hess[i][i] += ridge
        for i in range(k):
            hess[i][i] += 1e-9
        step = _solve(hess, grad)
        w = [wi - si for wi, si in zip(w, step)]
        if max(abs(s) for s in step) < 1e-9:
            break
    return w


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (k is tiny)."""
    n = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for j in range(c, n + 1):
                m[r][j] -= f * m[c][j]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][j] * x[j] for j in range(r + 1, n))) / m[r][r]
    return x


def length_controlled_win_rate(prefs: list[float], len_diff: list[float]) -> dict:
    """Raw and length-controlled win rate of a method against a baseline (see the module docstring)."""
    if len(prefs) != len(len_diff) or not prefs:
        raise ValueError("prefs and len_diff must be non-empty and of equal length")
    sd = statistics.pstdev(len_diff) or 1.0
    xs = [[1.0, math.tanh(d / sd)] for d in len_diff]
    b0, b1 = fit_logistic(xs, [min(1.0, max(0.0, p)) for p in prefs])
    return {"win_rate": mean(prefs), "lc_win_rate": _sigmoid(b0), "length_coef": b1, "len_sd": sd}


def lc_win_rate_ci(prefs: list[float], len_diff: list[float], n_boot: int = 300, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the length-controlled win rate (resampling prompts)."""
    rng = random.Random(seed)
    idx = list(range(len(prefs)))
    vals = []
    for _ in range(n_boot):
        s = rng.choices(idx, k=len(idx))
        vals.append(length_controlled_win_rate([prefs[i] for i in s], [len_diff[i] for i in s])["lc_win_rate"])
    vals.sort()
    return vals[int(0.025 * n_boot)], vals[int(0.975 * n_boot) - 1]


def pairwise_agreement(groups: list[list[tuple[float, float]]], n_boot: int = 1000, seed: int = 0) -> dict:
    """How often a judge orders two answers to the same prompt like a trusted reference judge does.

    `groups`: per prompt, (reference score, judge score) for each answer. Every pair with different
    reference scores counts; the judge agrees when it orders the pair the same way (a judge tie counts 1/2).
    The interval resamples prompts.
    """
    per_prompt = []
    for g in groups:
        agree = total = 0.0
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                dt, dj = g[i][0] - g[j][0], g[i][1] - g[j][1]
                if dt == 0:
                    continue
                total += 1
                agree += 0.5 if dj == 0 else float((dt > 0) == (dj > 0))
        if total:
            per_prompt.append((agree, total))
    if not per_prompt:
        return {"agreement": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "pairs": 0, "prompts": 0}
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        s = rng.choices(per_prompt, k=len(per_prompt))
        boots.append(sum(a for a, _ in s) / sum(t for _, t in s))
    boots.sort()
    return {"agreement": sum(a for a, _ in per_prompt) / sum(t for _, t in per_prompt),
            "ci_low": boots[int(0.025 * n_boot)], "ci_high": boots[int(0.975 * n_boot) - 1],
            "pairs": int(sum(t for _, t in per_prompt)), "prompts": len(per_prompt)}
