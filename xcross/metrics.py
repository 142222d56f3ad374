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


def paired_difference(a: np.ndarray, b: np.ndarray, bootstrap: int = 2000, permutations: int = 10000,
                      seed: int = 0) -> dict:
    """Method A against method B on the same users (`a`, `b`: one metric per user, in the same user order).

    Returns the mean difference a − b, its paired percentile-bootstrap 95% interval (users resampled, the same
    resample for both methods) and the two-sided p-value of a sign-flip permutation test on the per-user
    differences (exact over all 2^n sign patterns when 2^n ≤ `permutations`, else Monte Carlo, seeded)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("no users to compare")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(bootstrap, n))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    observed = abs(d.mean())
    if 2 ** n <= permutations:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1)  # every sign pattern
        p = float((np.abs((signs * d).mean(1)) >= observed - 1e-12).mean())
    else:
        signs = rng.choice([-1.0, 1.0], size=(permutations, n))
        p = float((1 + (np.abs((signs * d).mean(1)) >= observed - 1e-12).sum()) / (1 + permutations))
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "p": p, "users": n}


def verdict(difference: dict, margin: float = 0.0) -> str:
    """"A > B" style reading of a paired difference: "holds" when the whole 95% interval lies above `margin`,
    "does not hold" when it lies below it, else "undecided at this size"."""
    if difference["low"] > margin:
        return "holds"
    if difference["high"] < margin:
        return "does not hold"
    return "undecided at this size"
