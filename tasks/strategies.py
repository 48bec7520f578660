"""Query strategies: plain functions over arrays, no Prefect, no DuckDB.

Every strategy has one shape, modAL-like: ``strategy(pool, k, rng) -> (indices, scores)``:

* ``pool``: a :class:`Pool`, or a bare (n_items, n_classes) probability array (shorthand
  for ``Pool(proba)``). A :class:`Pool` carries what the smarter strategies need beyond the
  probabilities, each optional and computed only for the rows a strategy asks about, so
  memory stays linear in the candidates:

  - ``proba`` (n, c): class probabilities of the current model, rows summing to 1;
  - ``features(rows) -> (len(rows), d)``: the model's own feature rows (TF-IDF, sparse or
    dense) of those pool items, for diversity and near-duplicate checks;
  - ``labeled_features`` (L, d): the same features of the items already labeled;
  - ``labeled_counts`` (c,): labels per class so far, for class balancing;
  - ``committee(rows) -> (m, len(rows), c)``: the probabilities of m committee members;
  - ``embedding(rows) -> (len(rows), e)``: dense, low-dimensional rows of those items (the
    model's LSA dimensions when it has them), where clustering is cheap and semantic;
  - ``explore`` (e,): the rows exploration may draw from, a uniform sample of a larger
    pool of which these rows are the most uncertain candidates plus that sample (None:
    every row);
  - ``second_opinion`` (n, c): another model's probabilities for the same rows (an LLM's,
    :mod:`alflow.tasks.llm`), NaN rows where it gave none; a row may be one-hot where it
    named a class without probabilities;
* ``k``: how many items to pick (clipped to n_items);
* ``rng``: a ``numpy.random.Generator`` (random picks and k-means++ seeding use it);
* returns ``indices`` (<= k,) into the pool rows, in pick order (most informative first)
  and ``scores`` of the same length (higher = more informative; NaN for random picks).

Strategies compose: :func:`with_second_opinion` ranks first the items another model (the
LLM) labels differently, :func:`with_exploration` spends a share of the batch on random
picks, :func:`without_near_duplicates` drops any pick too similar to another pick or to a
labeled item, and :func:`get_strategy` builds the configured composition by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import sparse


@dataclass
class Pool:
    """What a strategy may look at; see the module docstring for shapes."""

    proba: np.ndarray
    features: Callable[[np.ndarray], object] | None = None
    labeled_features: object | None = None
    labeled_counts: np.ndarray | None = None
    committee: Callable[[np.ndarray], np.ndarray] | None = None
    embedding: Callable[[np.ndarray], np.ndarray] | None = None
    explore: np.ndarray | None = None
    second_opinion: np.ndarray | None = None

    def __post_init__(self):
        self.proba = _check_proba(self.proba)
        if self.second_opinion is not None:
            self.second_opinion = np.asarray(self.second_opinion, dtype=float)
            if self.second_opinion.shape != self.proba.shape:
                raise ValueError(f"second_opinion must have the shape of proba {self.proba.shape}, "
                                 f"got {self.second_opinion.shape}")

    @property
    def n(self) -> int:
        return self.proba.shape[0]


def as_pool(pool) -> Pool:
    return pool if isinstance(pool, Pool) else Pool(pool)


Strategy = Callable[[Pool, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


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

    def strategy(pool, k: int, rng: np.random.Generator | None = None):
        scores = score(as_pool(pool).proba)
        picks = top_k(scores, k)
        return picks, scores[picks]

    strategy.__name__ = measure
    return strategy


def random_sampling(pool, k: int, rng: np.random.Generator):
    """The baseline: k items uniformly at random, without replacement (in index order)."""
    n = pool.n if isinstance(pool, Pool) else np.asarray(pool).shape[0]
    k = max(0, min(int(k), n))
    picks = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    return picks, np.full(k, np.nan)


def _candidates(pool: Pool, k: int, factor: int) -> np.ndarray:
    """The ``k * factor`` items with the smallest margin: where the smarter strategies look."""
    return top_k(MEASURES["margin"](pool.proba), k * factor)


def _unit_rows(x):
    from sklearn.preprocessing import normalize

    return normalize(x, norm="l2", copy=True)


def _dot_with_row(x, j: int) -> np.ndarray:
    """x @ x[j] as a dense (n,) vector, for sparse or dense ``x``."""
    if sparse.issparse(x):
        return np.asarray((x @ x[j].T).todense()).ravel()
    return x @ x[j]


def badge(candidates: int = 10) -> Strategy:
    """Diversity among the uncertain (BADGE, Ash et al. 2020, for a linear model).

    Among the ``k * candidates`` smallest-margin items, picks k by k-means++ seeding on
    gradient embeddings ``g_i = (p_i - onehot(argmax p_i)) ⊗ x_i``: the gradient of the
    log-loss of a linear softmax model if the predicted class were the label. Its norm is
    large where the model is unsure, and k-means++ spreads the picks over different
    directions, so a batch is both uncertain and varied. ``x`` are the pool's feature rows
    (``pool.features``), L2-normalised. ``g`` is never built: squared distances use
    ``|g_i - g_j|² = |a_i|²|x_i|² + |a_j|²|x_j|² - 2 (a_i·a_j)(x_i·x_j)``, one pass over the
    candidates per pick, so memory is O(candidates) and there is no N×N matrix.
    Scores are each pick's squared distance to the nearer earlier pick (the first: its
    gradient norm²). Without features it falls back to margin sampling.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")

    def strategy(pool, k: int, rng: np.random.Generator):
        pool = as_pool(pool)
        if pool.features is None:
            return uncertainty_sampling("margin")(pool, k, rng)
        rows = _candidates(pool, k, candidates)
        k = min(int(k), rows.size)
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        x = _unit_rows(pool.features(rows))
        p = pool.proba[rows]
        a = p.copy()
        a[np.arange(rows.size), p.argmax(axis=1)] -= 1.0
        a_sq = np.einsum("ij,ij->i", a, a)  # |x_i| = 1, so |g_i|² = |a_i|²
        picks = [int(np.argmax(a_sq))]
        scores = [float(a_sq[picks[0]])]
        nearest = np.full(rows.size, np.inf)
        for _ in range(1, k):
            j = picks[-1]
            d = a_sq + a_sq[j] - 2.0 * (a @ a[j]) * _dot_with_row(x, j)
            nearest = np.minimum(nearest, np.maximum(d, 0.0))
            total = nearest.sum()
            if not np.isfinite(total) or total <= 1e-12:
                break  # every remaining candidate coincides with a pick
            nxt = int(rng.choice(rows.size, p=nearest / total))
            picks.append(nxt)
            scores.append(float(nearest[nxt]))
        return rows[np.asarray(picks, dtype=np.int64)], np.asarray(scores)

    strategy.__name__ = "badge"
    return strategy


def class_balanced(pool, k: int, rng: np.random.Generator | None = None):
    """Margin sampling that evens out the classes labeled so far.

    Each of the k picks goes to the class with the fewest labels (``pool.labeled_counts``,
    plus the picks already made for it): the most uncertain item (smallest margin) still
    unpicked among those *predicted* as that class. On imbalanced data most of a batch
    then comes from the rare classes' side of the boundary; on balanced data it is margin
    sampling spread over the predicted classes. Without counts, all classes count as equal.
    Scores are 1 - margin. No knobs; O(n log n).
    """
    pool = as_pool(pool)
    n, c = pool.proba.shape
    k = max(0, min(int(k), n))
    counts = np.zeros(c) if pool.labeled_counts is None else np.asarray(pool.labeled_counts, dtype=float).copy()
    if counts.shape != (c,):
        raise ValueError(f"labeled_counts must have shape ({c},), got {counts.shape}")
    uncertainty = MEASURES["margin"](pool.proba)
    predicted = pool.proba.argmax(axis=1)
    queues = []
    for cls in range(c):
        members = np.flatnonzero(predicted == cls)
        queues.append(members[np.lexsort((members, -uncertainty[members]))])
    heads = np.zeros(c, dtype=np.int64)
    picks = []
    while len(picks) < k:
        open_ = [cls for cls in range(c) if heads[cls] < queues[cls].size]
        if not open_:
            break
        cls = min(open_, key=lambda j: (counts[j], j))
        picks.append(int(queues[cls][heads[cls]]))
        heads[cls] += 1
        counts[cls] += 1
    picks_arr = np.asarray(picks, dtype=np.int64)
    return picks_arr, uncertainty[picks_arr]


def vote_entropy(committee_proba: np.ndarray) -> np.ndarray:
    """(m, n, c) member probabilities -> (n,) entropy of the members' votes, in nats."""
    committee_proba = np.asarray(committee_proba, dtype=float)
    if committee_proba.ndim != 3:
        raise ValueError(f"committee probabilities must be (members, n_items, n_classes), got {committee_proba.shape}")
    m, n, c = committee_proba.shape
    votes = committee_proba.argmax(axis=2)  # (m, n)
    shares = np.zeros((n, c))
    for member in votes:
        shares[np.arange(n), member] += 1.0 / m
    return entropy(shares) if c >= 2 else np.zeros(n)


def committee(candidates: int = 10) -> Strategy:
    """Query by committee: among the ``k * candidates`` smallest-margin items, the k on which
    the members of ``pool.committee`` disagree most (vote entropy), ties broken by the
    members' mean margin. Without a committee it falls back to margin sampling.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")

    def strategy(pool, k: int, rng: np.random.Generator | None = None):
        pool = as_pool(pool)
        if pool.committee is None:
            return uncertainty_sampling("margin")(pool, k, rng)
        rows = _candidates(pool, k, candidates)
        member_proba = np.asarray(pool.committee(rows))
        disagreement = vote_entropy(member_proba)
        consensus = 1.0 - margin(member_proba.mean(axis=0))
        # Vote entropy takes few values with few members: the consensus margin orders ties.
        scores = disagreement + 1e-3 * consensus
        order = top_k(scores, k)
        return rows[order], scores[order]

    strategy.__name__ = "committee"
    return strategy


def cluster_margin(candidates: int = 10) -> Strategy:
    """Uncertainty among clusters: the ``k * candidates`` smallest-margin items are split
    into k clusters (k-means on ``pool.embedding`` rows, else on ``pool.features``; rows
    L2-normalised, seeded from ``rng``) and each cluster gives its smallest-margin item.
    A batch is then as uncertain as margin sampling allows while covering k different
    topics of the uncertain region, instead of k near-copies of one confusion.
    Picks are ordered by uncertainty; clusters that come out empty leave their places to
    the next most uncertain candidates. Scores are 1 - margin. Memory O(candidates · d);
    without embedding or features it is margin sampling.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")

    def strategy(pool, k: int, rng: np.random.Generator):
        from sklearn.cluster import KMeans

        pool = as_pool(pool)
        rows_of = pool.embedding or pool.features
        if rows_of is None:
            return uncertainty_sampling("margin")(pool, k, rng)
        rows = _candidates(pool, k, candidates)
        k = min(int(k), rows.size)
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        uncertainty = MEASURES["margin"](pool.proba[rows])
        if k == rows.size:
            chosen = np.arange(k)
        else:
            x = _unit_rows(rows_of(rows))
            clusters = KMeans(n_clusters=k, n_init=1, random_state=int(rng.integers(2**31 - 1))).fit_predict(x)
            chosen = []
            for cluster in np.unique(clusters):
                members = np.flatnonzero(clusters == cluster)
                chosen.append(members[top_k(uncertainty[members], 1)[0]])
            chosen = np.asarray(chosen, dtype=np.int64)
            if chosen.size < k:  # duplicate rows collapse clusters: fill by uncertainty
                rest = np.setdiff1d(np.arange(rows.size), chosen)
                chosen = np.concatenate([chosen, rest[top_k(uncertainty[rest], k - chosen.size)]])
        order = chosen[top_k(uncertainty[chosen], chosen.size)]
        return rows[order], uncertainty[order]

    strategy.__name__ = "cluster_margin"
    return strategy


def with_exploration(strategy: Strategy, share: float) -> Strategy:
    """``strategy`` for round(k * (1 - share)) picks, then random picks among the rest.

    The random picks come last and carry a NaN score; :func:`n_exploration` says how many.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"exploration share must be in [0, 1], got {share}")

    def composed(pool, k: int, rng: np.random.Generator):
        pool = as_pool(pool)
        n = pool.n
        k = max(0, min(int(k), n))
        n_random = n_exploration(k, share)
        picks, scores = strategy(pool, k - n_random, rng)
        rest = np.setdiff1d(np.arange(n) if pool.explore is None else pool.explore, picks)
        extra = np.sort(rng.choice(rest, size=min(n_random + (k - n_random - len(picks)), rest.size),
                                   replace=False))
        return (
            np.concatenate([picks, extra]).astype(np.int64),
            np.concatenate([scores, np.full(extra.size, np.nan)]),
        )

    composed.__name__ = f"{getattr(strategy, '__name__', 'strategy')}+exploration"
    return composed


def disagreement(proba: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(n,) 1.0 where ``other`` (n, c) names another top class than ``proba`` (n, c), 0.0
    where both name the same, NaN where ``other``'s row has no opinion (any NaN in it)."""
    proba, other = _check_proba(proba), np.asarray(other, dtype=float)
    if other.shape != proba.shape:
        raise ValueError(f"the second opinion must have the shape of proba {proba.shape}, got {other.shape}")
    missing = np.isnan(other).any(axis=1)
    differ = (proba.argmax(axis=1) != np.nan_to_num(other, nan=-1.0).argmax(axis=1)).astype(float)
    differ[missing] = np.nan
    return differ


def with_second_opinion(strategy: Strategy, distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                        uncertainty: Callable[[np.ndarray], np.ndarray] | None = None) -> Strategy:
    """``strategy``, after the items on which the second opinion (``pool.second_opinion``,
    e.g. an LLM's) names another top class than the model (:func:`disagreement`).

    ``distance(proba, second_opinion) -> (n,)`` and ``uncertainty(proba) -> (n,)`` replace
    :func:`disagreement` and the margin for another kind of answer (a multi-label pool:
    the Jaccard distance between tag sets, the mean-margin uncertainty,
    :func:`alflow.tasks.llm.tag_second_opinion`): the items at a distance above 0 come
    first, the farthest first, then the one the model is least sure of.

    The disagreeing items come first, the one the model is least sure of first (smallest
    margin of ``pool.proba``, ties by index), at most k of them; ``strategy``'s own picks
    fill the rest in its order. Their scores are 1 + (1 - margin), above any margin score.

    Disagreement is binary, not a divergence: an LLM's token probabilities are poorly
    calibrated (zero-shot answers are often near-certain either way), and a server without
    log-probabilities gives only a class, so a KL or JS divergence would mostly rank by how
    sure the LLM happens to sound. Where the two name different classes one of them is
    wrong, and the model's own margin says where a label teaches it the most. A no-op
    without ``pool.second_opinion``.
    """

    distance = distance or disagreement
    uncertainty = uncertainty or MEASURES["margin"]

    def composed(pool, k: int, rng: np.random.Generator):
        pool = as_pool(pool)
        k = max(0, min(int(k), pool.n))
        if pool.second_opinion is None or k == 0:
            return strategy(pool, k, rng)
        far = distance(pool.proba, pool.second_opinion)
        differ = np.flatnonzero(far > 0)  # NaN (no opinion) is not above 0
        unsure = uncertainty(pool.proba[differ])
        order = np.lexsort((differ, -unsure, -far[differ]))[:k]  # ties by index
        first = differ[order]
        picks, scores = strategy(pool, k, rng)
        rest = ~np.isin(picks, first)
        take = k - first.size
        return (np.concatenate([first, picks[rest][:take]]).astype(np.int64),
                np.concatenate([1.0 + unsure[order], np.asarray(scores, dtype=float)[rest][:take]]))

    composed.__name__ = f"{getattr(strategy, '__name__', 'strategy')}+second_opinion"
    return composed


def n_exploration(k: int, share: float) -> int:
    """How many of a batch of k :func:`with_exploration` draws at random (halves round up)."""
    return int(math.floor(k * share + 0.5))


def near_duplicates(x, threshold: float, labeled=None) -> np.ndarray:
    """Which rows of ``x`` (n, d) to drop, walking them in order: a row is dropped when its
    cosine similarity to an earlier kept row, or to any row of ``labeled`` (L, d), is at
    least ``threshold``. Returns a boolean mask (n,). Cost O(n·(n + L)) similarity
    entries, computed a block of rows at a time (never more than about 4M at once).
    """
    x = _unit_rows(x)
    n = x.shape[0]
    drop = np.zeros(n, dtype=bool)
    if labeled is not None and labeled.shape[0]:
        labeled = _unit_rows(labeled)
        for start in range(0, n, 1024):  # bounded blocks of (block, L) similarities
            sims = x[start:start + 1024] @ labeled.T
            sims = sims.toarray() if sparse.issparse(sims) else np.asarray(sims)
            drop[start:start + 1024] = sims.max(axis=1) >= threshold - 1e-9
    kept: list[int] = []
    # A block of rows against every row up to it in one product (the same sums, term by
    # term, as one row against the kept ones), at most 4M similarities at a time.
    block = max(1, min(n, (1 << 22) // max(n, 1)))
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = x[start:stop] @ x[:stop].T
        sims = sims.toarray() if sparse.issparse(sims) else np.asarray(sims)
        for i in range(start, stop):
            if drop[i]:
                continue
            if kept and sims[i - start, kept].max() >= threshold - 1e-9:
                drop[i] = True
                continue
            kept.append(i)
    return drop


def without_near_duplicates(strategy: Strategy, threshold: float) -> Strategy:
    """``strategy``, minus every pick whose features have cosine similarity >= ``threshold``
    with an earlier pick of the batch or with a labeled item (``pool.labeled_features``):
    a reviewer never sees the same message twice. Asks ``strategy`` for more picks
    (doubling) until k survive or the pool is spent. A no-op without ``pool.features``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")

    def composed(pool, k: int, rng: np.random.Generator):
        pool = as_pool(pool)
        k = max(0, min(int(k), pool.n))
        if pool.features is None or k == 0:
            return strategy(pool, k, rng)
        ask = k
        while True:
            seed_state = rng.bit_generator.state
            picks, scores = strategy(pool, ask, rng)
            keep = ~near_duplicates(pool.features(picks), threshold, pool.labeled_features)
            if keep.sum() >= k or ask >= pool.n or len(picks) < ask:
                # The first k survivors in pick order; random (NaN-score) picks keep the
                # share of the batch they had in what the strategy returned, and come last.
                kept = np.flatnonzero(keep)
                is_random = np.isnan(scores)
                want_random = n_exploration(k, is_random.sum() / max(1, len(picks)))
                ranked, randoms = kept[~is_random[kept]], kept[is_random[kept]]
                take_ranked = min(ranked.size, k - min(want_random, randoms.size))
                take_random = min(randoms.size, k - take_ranked)
                chosen = np.concatenate([ranked[:take_ranked], randoms[:take_random]])
                return picks[chosen], scores[chosen]
            rng.bit_generator.state = seed_state  # the larger ask replays the same draws
            ask = min(pool.n, ask * 2)

    composed.__name__ = getattr(strategy, "__name__", "strategy")
    return composed


# The strategy names of ``query.strategy``; `config.settings.STRATEGIES` lists the same.
NAMES = ("least_confidence", "margin", "entropy", "random", "badge", "class_balanced", "committee",
         "cluster_margin")


def get_strategy(name: str, exploration: float = 0.0, near_duplicate: float | None = None,
                 candidates: int = 10, second_opinion: bool = False) -> Strategy:
    """The configured strategy by name, composed: the second opinion, the exploration
    share, then near-duplicates.

    ``name``: one of :data:`NAMES`; ``near_duplicate``: cosine threshold (None: off);
    ``candidates``: how many times k smallest-margin items badge, committee and
    cluster_margin look at; ``second_opinion``: disagreements with ``pool.second_opinion``
    first (:func:`with_second_opinion`; not for random, whose batch is the baseline).
    """
    if name == "random":
        base = random_sampling
    elif name == "badge":
        base = badge(candidates)
    elif name == "class_balanced":
        base = class_balanced
    elif name == "committee":
        base = committee(candidates)
    elif name == "cluster_margin":
        base = cluster_margin(candidates)
    else:
        base = uncertainty_sampling(name)
    if name != "random" and second_opinion:
        base = with_second_opinion(base)
    if name != "random" and exploration > 0:
        base = with_exploration(base, exploration)
    if near_duplicate is not None:
        base = without_near_duplicates(base, near_duplicate)
    return base


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


def coverage_groups(features, k: int, per_group: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cold-start candidates for a second look: the rows of ``features`` (n, d) clustered
    into k groups as :func:`coverage` does (k-means seeded from ``rng``), and from each
    group its ``per_group`` members nearest the centre, nearest first.

    Returns (rows (m,), group (m,)), m <= k * per_group: group 0 is the largest cluster;
    within a group, rows are nearest the centre first. An empty cluster gives nothing.
    """
    from sklearn.cluster import MiniBatchKMeans

    n = features.shape[0]
    k = max(0, min(int(k), n))
    if k == 0 or per_group < 1:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    seed = int(rng.integers(2**31 - 1))
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=2048)
    assignment = kmeans.fit_predict(features)
    distance = kmeans.transform(features)[np.arange(n), assignment]  # to the row's own centre
    sizes = np.bincount(assignment, minlength=k)
    rows, groups = [], []
    for group, cluster in enumerate(np.lexsort((np.arange(k), -sizes))):  # biggest cluster first
        members = np.flatnonzero(assignment == cluster)
        nearest = members[np.lexsort((members, distance[members]))][:per_group]
        rows.append(nearest)
        groups.append(np.full(nearest.size, group))
    return np.concatenate(rows).astype(np.int64), np.concatenate(groups).astype(np.int64)


def least_confident_per_group(group: np.ndarray, uncertainty: np.ndarray, k: int) -> np.ndarray:
    """k positions: each group's most uncertain member, groups in order (0 first), then
    each group's next one, and so on while k are wanted.

    ``group`` (m,) ints; ``uncertainty`` (m,), higher = less sure, NaN for a member without
    one (it comes after the group's members that have one, in position order). One group
    gives the k most uncertain; k groups give one member each. Returns positions (<= k,)
    in pick order.
    """
    group = np.asarray(group, dtype=np.int64)
    uncertainty = np.asarray(uncertainty, dtype=float)
    if group.shape != uncertainty.shape or group.ndim != 1:
        raise ValueError(f"group and uncertainty must be (m,) alike, got {group.shape} and {uncertainty.shape}")
    m = group.size
    k = max(0, min(int(k), m))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    positions = np.arange(m)
    unknown = np.isnan(uncertainty)
    within = np.lexsort((positions, np.where(unknown, 0.0, -uncertainty), unknown, group))
    turn = np.empty(m, dtype=np.int64)  # the member's place in its group: 0 = its first pick
    starts = np.r_[0, np.flatnonzero(np.diff(group[within])) + 1]
    for start, stop in zip(starts, np.r_[starts[1:], m]):
        turn[within[start:stop]] = np.arange(stop - start)
    return np.lexsort((positions, group, turn))[:k].astype(np.int64)
