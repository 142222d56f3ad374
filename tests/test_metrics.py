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
