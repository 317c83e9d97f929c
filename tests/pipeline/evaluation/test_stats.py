"""Statistics on simulations where the true answer is known."""
import math
import random

import pytest

from pipeline.evaluation.stats import bootstrap_ci, length_controlled_win_rate, paired_test


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    rng = random.Random(1)
    covered = 0
    for trial in range(120):
        xs = [rng.gauss(0.3, 1.0) for _ in range(60)]
        _, lo, hi = bootstrap_ci(xs, n_boot=400, seed=trial)
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / 120 <= 0.99, covered


def test_paired_test_finds_a_real_difference_and_not_a_fake_one():
    rng = random.Random(2)
    base = [rng.random() for _ in range(80)]
    better = [x + 0.1 + rng.gauss(0, 0.05) for x in base]
    same = [x + rng.gauss(0, 0.05) for x in base]
    r = paired_test(better, base, n_boot=500)
    assert r["p_value"] < 0.01 and r["ci_low"] > 0.05 and r["wins"] > 70
    r0 = paired_test(same, base, n_boot=500)
    assert r0["p_value"] > 0.01 and r0["ci_low"] < 0 < r0["ci_high"]


def test_length_control_removes_a_pure_length_bias():
    """A judge that only rewards length: raw win rate is high, the length-controlled one is about 0.5."""
    rng = random.Random(3)
    diffs = [rng.gauss(150, 100) for _ in range(600)]  # the method is usually longer
    prefs = [1 / (1 + math.exp(-2.0 * math.tanh(d / 100))) for d in diffs]  # truth: b0 = 0, length only
    r = length_controlled_win_rate(prefs, diffs)
    assert r["win_rate"] > 0.75
    assert abs(r["lc_win_rate"] - 0.5) < 0.05 and r["length_coef"] > 1


def test_length_control_keeps_a_real_quality_edge():
    rng = random.Random(4)
    diffs = [rng.gauss(0, 100) for _ in range(600)]
    b0 = 1.0  # true quality edge at equal length: sigmoid(1) = 0.731
    prefs = [float(rng.random() < 1 / (1 + math.exp(-(b0 + 0.8 * math.tanh(d / 100))))) for d in diffs]
    r = length_controlled_win_rate(prefs, diffs)
    assert abs(r["lc_win_rate"] - 1 / (1 + math.exp(-b0))) < 0.06


def test_pairwise_agreement_counts_pairs_and_ties():
    from pipeline.evaluation.stats import pairwise_agreement

    perfect = [[(0.1, 1.0), (0.5, 2.0), (0.9, 3.0)]] * 5
    assert pairwise_agreement(perfect)["agreement"] == 1.0
    reversed_ = [[(0.1, 3.0), (0.5, 2.0), (0.9, 1.0)]] * 5
    assert pairwise_agreement(reversed_)["agreement"] == 0.0
    ties = [[(0.1, 1.0), (0.9, 1.0), (0.9, 5.0)]]  # one judge tie (1/2), one pair with equal truth (skipped)
    r = pairwise_agreement(ties)
    assert r["pairs"] == 2 and r["agreement"] == (0.5 + 1.0) / 2



def test_same_seed_same_figures_and_a_new_seed_new_draws():
    from pipeline.evaluation.stats import lc_win_rate_ci, pairwise_agreement

    rng = random.Random(5)
    xs = [rng.gauss(0, 1) for _ in range(40)]
    assert bootstrap_ci(xs, n_boot=200, seed=7) == bootstrap_ci(xs, n_boot=200, seed=7)
    assert bootstrap_ci(xs, n_boot=200, seed=7) != bootstrap_ci(xs, n_boot=200, seed=8)
    ys = [x + rng.gauss(0, 1) for x in xs]
    assert paired_test(xs, ys, n_boot=200, seed=3) == paired_test(xs, ys, n_boot=200, seed=3)
    prefs, diffs = [float(x > 0) for x in xs], [100 * y for y in ys]
    assert lc_win_rate_ci(prefs, diffs, n_boot=50, seed=1) == lc_win_rate_ci(prefs, diffs, n_boot=50, seed=1)
    groups = [[(rng.random(), rng.random()) for _ in range(3)] for _ in range(20)]
    assert pairwise_agreement(groups, n_boot=100, seed=2) == pairwise_agreement(groups, n_boot=100, seed=2)


def test_degenerate_inputs():
    from pipeline.evaluation.stats import lc_win_rate_ci, mean

    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert math.isnan(mean([]))
    assert bootstrap_ci([2.0] * 10, n_boot=100) == (2.0, 2.0, 2.0)
    assert bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, float("nan"), 2.0], n_boot=100))
    ties = paired_test([1.0] * 5, [1.0] * 5, n_boot=100)
    assert ties["p_value"] == 1.0 and ties["ties"] == 5 and ties["mean_diff"] == 0.0
    assert paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], n_boot=100)["p_value"] == 0.25  # exact: 2 of 8 flips
    # perfectly separable (short answers always win, long ones always lose): finite, thanks to the ridge
    sep = length_controlled_win_rate([1.0] * 5 + [0.0] * 5, [float(i) for i in range(10)])
    assert sep["win_rate"] == 0.5 and 0.99 < sep["lc_win_rate"] <= 1.0 and -100 < sep["length_coef"] < -5
    lo, hi = lc_win_rate_ci([1.0] * 5 + [0.0] * 5, [float(i) for i in range(10)], n_boot=30)
    assert 0.0 <= lo <= hi <= 1.0
    assert length_controlled_win_rate([1.0] * 10, [float(i) for i in range(10)])["lc_win_rate"] > 0.999
    same_len = length_controlled_win_rate([1.0, 0.0, 1.0, 0.5, 1.0], [3.0] * 5)  # no length information
    assert abs(same_len["lc_win_rate"] - 0.7) < 1e-3 and abs(same_len["length_coef"]) < 1e-2
    assert math.isnan(length_controlled_win_rate([1.0, float("nan")], [1.0, 2.0])["lc_win_rate"])
    for bad in (([], []), ([1.0], [1.0, 2.0])):
        with pytest.raises(ValueError):
            length_controlled_win_rate(*bad)
    with pytest.raises(ValueError):
        paired_test([1.0], [1.0, 2.0])
