"""Query strategies: plain functions over arrays, no Prefect, no DuckDB.

A strategy has the modAL shape ``strategy(proba, k, rng) -> (indices, scores)``:

* ``proba``: array (n_items, n_classes) of class probabilities, rows summing to 1;
* ``k``: how many items to pick (clipped to n_items);
* ``rng``: a ``numpy.random.Generator`` (only random picks use it);
* returns ``indices`` (k,) into the rows of ``proba``, most informative first, and
  ``scores`` (k,) their informativeness (higher = more uncertain; NaN for random picks).

Strategies compose: :func:`with_exploration` turns any strategy into one that spends a share
of the batch on random picks, so the model's blind spots get sampled too.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Strategy = Callable[[np.ndarray, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _check_proba(proba: np.ndarray) -> np.ndarray:
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or proba.shape[1] < 2:
        raise ValueError(f"proba must be (n_items, n_classes>=2), got shape {proba.shape}")
    return proba


# -- uncertainty measures: (n, c) -> (n,), higher = more uncertain --------------------------
def least_confidence(proba: np.ndarray) -> np.ndarray:
    """1 - p(top class). In [0, 1 - 1/c]."""
    return 1.0 - _check_proba(proba).max(axis=1)


def margin(proba: np.ndarray) -> np.ndarray:
    """p(top1) - p(top2), the classic margin: SMALL is uncertain. In [0, 1]."""
    proba = _check_proba(proba)
    top2 = -np.partition(-proba, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def entropy(proba: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats. In [0, log c]."""
    proba = _check_proba(proba)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(proba > 0, proba * np.log(proba), 0.0)
    return -terms.sum(axis=1)


MEASURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "least_confidence": least_confidence,
    "margin": lambda proba: 1.0 - margin(proba),  # flipped so that higher = more uncertain
    "entropy": entropy,
}


# -- selection ------------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first; ties go to the lower index.

    O(n + k log k): ``argpartition`` finds the k, only those k are sorted.
    """
    scores = np.asarray(scores, dtype=float)
    n = scores.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        # Widen the cut to every item tied with the k-th score, so ties resolve by index
        # instead of by argpartition's arbitrary order.
        kth = -np.partition(-scores, k - 1)[k - 1]
        candidates = np.flatnonzero(scores >= kth)
    else:
        candidates = np.arange(n)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]].astype(np.int64)


def uncertainty_sampling(measure: str) -> Strategy:
    """The strategy that picks the k items scoring highest on ``measure``."""
    if measure not in MEASURES:
        raise ValueError(f"unknown uncertainty measure {measure!r}; choose from {sorted(MEASURES)}")
    score = MEASURES[measure]

    def strategy(proba: np.ndarray, k: int, rng: np.random.Generator | None = None):
        scores = score(proba)
        picks = top_k(scores, k)
        return picks, scores[picks]

    strategy.__name__ = measure
    return strategy


def random_sampling(proba: np.ndarray, k: int, rng: np.random.Generator):
    """The baseline: k items uniformly at random, without replacement."""
    n = np.asarray(proba).shape[0]
    k = max(0, min(int(k), n))
    picks = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    return picks, np.full(k, np.nan)


def with_exploration(strategy: Strategy, share: float) -> Strategy:
    """``strategy`` for round(k * (1 - share)) picks, then random picks among the rest.

    The random picks come last and carry a NaN score; :func:`n_exploration` says how many.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"exploration share must be in [0, 1], got {share}")

    def composed(proba: np.ndarray, k: int, rng: np.random.Generator):
        n = np.asarray(proba).shape[0]
        k = max(0, min(int(k), n))
        n_random = n_exploration(k, share)
        picks, scores = strategy(proba, k - n_random, rng)
        rest = np.setdiff1d(np.arange(n), picks, assume_unique=True)
        extra = np.sort(rng.choice(rest, size=min(n_random, rest.size), replace=False))
        return (
            np.concatenate([picks, extra]).astype(np.int64),
            np.concatenate([scores, np.full(extra.size, np.nan)]),
        )

    composed.__name__ = f"{getattr(strategy, '__name__', 'strategy')}+exploration"
    return composed


def n_exploration(k: int, share: float) -> int:
    """How many of a batch of k :func:`with_exploration` draws at random (halves round up)."""
    return int(math.floor(k * share + 0.5))


def get_strategy(name: str, exploration: float = 0.0) -> Strategy:
    """The configured strategy by name (``random`` or an uncertainty measure), composed."""
    base = random_sampling if name == "random" else uncertainty_sampling(name)
    if name == "random" or exploration == 0:
        return base
    return with_exploration(base, exploration)


# -- cold start -----------------------------------------------------------------------------
def coverage(features, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cold start without a model: one representative per cluster, largest clusters first.

    ``features``: (n_items, n_features) array or sparse matrix (e.g. TF-IDF rows).
    Clusters the rows into k groups (k-means, seeded from ``rng``) and returns, per
    cluster, the row nearest its centre; ``scores`` are the clusters' shares of the pool.
    """
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import pairwise_distances_argmin_min

    n = features.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    if k == n:
        return np.arange(n, dtype=np.int64), np.full(n, 1.0 / n)
    seed = int(rng.integers(2**31 - 1))
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=2048)
    assignment = kmeans.fit_predict(features)
    sizes = np.bincount(assignment, minlength=k)
    nearest, _ = pairwise_distances_argmin_min(kmeans.cluster_centers_, features)
    order = np.lexsort((np.arange(k), -sizes))  # biggest cluster first
    picks, seen = [], set()
    for cluster in order:
        if sizes[cluster] and nearest[cluster] not in seen:
            picks.append(int(nearest[cluster]))
            seen.add(int(nearest[cluster]))
    shares = {int(nearest[c]): sizes[c] / n for c in order if sizes[c]}
    # Empty or merged clusters leave the batch short: fill it at random.
    if len(picks) < k:
        rest = np.setdiff1d(np.arange(n), picks)
        extra = rng.choice(rest, size=k - len(picks), replace=False)
        picks.extend(int(i) for i in np.sort(extra))
    picks_arr = np.asarray(picks, dtype=np.int64)
    return picks_arr, np.asarray([shares.get(i, np.nan) for i in picks], dtype=float)
