"""Ranking metrics over the true item's rank among C candidates, with seeded bootstrap 95% intervals.

Ties are broken uniformly at random in expectation, so a constant scorer gets chance-level metrics, not perfect ones.
"""

from __future__ import annotations

import numpy as np

METRICS = ("hit@1", "hit@3", "ndcg@3", "ndcg@5", "mrr")


def per_user_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Expected Hit@k, NDCG@k and reciprocal rank per user, for `scores (N, C)` and `labels (N,)`.

    With g candidates scoring above the true item and t others tied with it, its rank is uniform on
    g+1 … g+t+1; each metric is averaged over those ranks.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    true = scores[np.arange(len(scores)), labels][:, None]
    greater = (scores > true).sum(1)
    ties = (scores == true).sum(1) - 1
    C = scores.shape[1]
    ranks = np.arange(1, C + 1)[None, :]  # every possible rank
    possible = (ranks >= greater[:, None] + 1) & (ranks <= (greater + ties)[:, None] + 1)
    weight = possible / possible.sum(1, keepdims=True)  # uniform over the tied ranks
    out = {}
    for k in (1, 3):
        out[f"hit@{k}"] = (weight * (ranks <= k)).sum(1)
    for k in (3, 5):
        out[f"ndcg@{k}"] = (weight * ((ranks <= k) / np.log2(ranks + 1))).sum(1)
    out["mrr"] = (weight / ranks).sum(1)
    return out


def summarise(per_user: dict[str, np.ndarray], bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Mean of every metric with a percentile bootstrap 95% interval over users (seeded)."""
    n = len(next(iter(per_user.values())))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(bootstrap, n)) if n else np.zeros((0, 0), dtype=int)
    out = {}
    for name, values in per_user.items():
        mean = float(values.mean()) if n else float("nan")
        if n and bootstrap:
            samples = values[idx].mean(1)
            low, high = np.percentile(samples, [2.5, 97.5])
        else:
            low = high = float("nan")
        out[name] = {"mean": mean, "low": float(low), "high": float(high)}
    return out


def rank_metrics(scores: np.ndarray, labels: np.ndarray, bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
    return summarise(per_user_metrics(scores, labels), bootstrap, seed)
