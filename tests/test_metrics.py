"""Metric functions against values computed by hand."""

import math

import numpy as np
import pytest

from xcross.metrics import per_user_metrics, rank_metrics


def test_hand_computed_ranks():
    scores = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.0],  # true item (0) ranked 1st
        [0.5, 0.9, 0.1, 0.7, 0.0],  # true item (0) ranked 3rd
        [0.1, 0.2, 0.3, 0.4, 0.5],  # true item (0) ranked 5th
    ])
    m = per_user_metrics(scores, np.array([0, 0, 0]))
    assert m["hit@1"].tolist() == [1, 0, 0]
    assert m["hit@3"].tolist() == [1, 1, 0]
    assert m["ndcg@3"] == pytest.approx([1.0, 1 / math.log2(4), 0.0])
    assert m["ndcg@5"] == pytest.approx([1.0, 0.5, 1 / math.log2(6)])
    assert m["mrr"] == pytest.approx([1.0, 1 / 3, 1 / 5])


def test_ties_are_broken_uniformly_in_expectation():
    # all five tied: rank uniform on 1..5
    m = per_user_metrics(np.zeros((1, 5)), np.array([2]))
    assert m["hit@1"][0] == pytest.approx(1 / 5)
    assert m["hit@3"][0] == pytest.approx(3 / 5)
    assert m["mrr"][0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5)
    assert m["ndcg@3"][0] == pytest.approx((1 + 1 / math.log2(3) + 1 / 2) / 5)
    # one above, true tied with one other: rank 2 or 3
    m = per_user_metrics(np.array([[0.5, 0.5, 0.9, 0.1]]), np.array([0]))
    assert m["hit@1"][0] == 0
    assert m["hit@3"][0] == 1
    assert m["mrr"][0] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 20))
    labels = rng.integers(0, 20, 200)
    a = rank_metrics(scores, labels, seed=7)
    b = rank_metrics(scores, labels, seed=7)
    c = rank_metrics(scores, labels, seed=8)
    assert a == b
    assert a != c
    for name, s in a.items():
        assert s["low"] <= s["mean"] <= s["high"], name
    # the mean itself is the plain average of the per-user values
    assert a["hit@1"]["mean"] == pytest.approx(per_user_metrics(scores, labels)["hit@1"].mean())


def _brute_force_paired(a, b, bootstrap, seed):
    """The paired bootstrap written as loops over the same seeded resamples, and the exact sign-flip test by
    enumerating every sign pattern with itertools."""
    import itertools
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(bootstrap, n))
    means = sorted(sum(d[i] for i in row) / n for row in idx)
    low, high = np.percentile(means, [2.5, 97.5])
    observed = abs(sum(d) / n)
    extreme = sum(abs(sum(s * x for s, x in zip(signs, d)) / n) >= observed - 1e-12
                  for signs in itertools.product([1, -1], repeat=n))
    return sum(d) / n, low, high, extreme / 2 ** n


@pytest.mark.parametrize("seed", range(3))
def test_paired_difference_against_brute_force(seed):
    from xcross.metrics import paired_difference
    rnd = np.random.default_rng(100 + seed)
    scores_a, scores_b = rnd.normal(size=(9, 5)), rnd.normal(size=(9, 5))
    labels = rnd.integers(0, 5, size=9)
    a = per_user_metrics(scores_a, labels)["mrr"]
    b = per_user_metrics(scores_b, labels)["mrr"]
    got = paired_difference(a, b, bootstrap=300, permutations=1024, seed=seed)  # 2^9 = 512 ≤ 1024: exact
    diff, low, high, p = _brute_force_paired(a.tolist(), b.tolist(), 300, seed)
    assert got["diff"] == pytest.approx(diff, abs=1e-12)
    assert (got["low"], got["high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert got["p"] == pytest.approx(p, abs=1e-12)


def test_paired_difference_by_hand_and_verdicts():
    from xcross.metrics import paired_difference, verdict
    # A wins on every one of 6 users by 1: only the two all-equal sign patterns are as extreme -> p = 2/64
    got = paired_difference(np.ones(6), np.zeros(6), bootstrap=100)
    assert got["diff"] == 1 and got["low"] == got["high"] == 1 and got["p"] == pytest.approx(2 / 64)
    assert verdict(got) == "holds" and verdict(paired_difference(np.zeros(6), np.ones(6))) == "does not hold"
    # identical methods: difference 0, every pattern as extreme, undecided
    same = paired_difference(np.arange(6.0), np.arange(6.0))
    assert same["p"] == 1.0 and verdict(same) == "undecided at this size"
    # the Monte Carlo branch (2^40 patterns) agrees with the sign of a large effect and stays in (0, 1]
    big = paired_difference(np.ones(40) + np.linspace(0, 0.1, 40), np.zeros(40), permutations=2000)
    assert 0 < big["p"] <= 1 / 2001 + 1e-12
