"""Multi-label query strategies: plain functions over the per-tag probability matrix.

The shape is :mod:`alflow.tasks.strategies`' own, ``strategy(pool, k, rng) -> (indices,
scores)``, so its wrappers (:func:`~alflow.tasks.strategies.with_exploration`,
:func:`~alflow.tasks.strategies.without_near_duplicates`) compose with these unchanged:

* ``pool``: a :class:`TagPool`, or a bare (n_items, n_tags) array of per-tag probabilities
  (shorthand for ``TagPool(proba)``). ``proba[i, j]`` is the model's probability that item
  i carries tag j; rows need not sum to 1. Beyond the fields of
  :class:`~alflow.tasks.strategies.Pool` it carries, each optional:

  - ``thresholds`` (n_tags,): the model's per-tag decision thresholds (None: 0.5 each);
  - ``labeled_proba`` (L, n_tags): the model's per-tag probabilities of the labeled items;
  - ``labeled_tags`` (L, n_tags): their tag matrix (0/1), the answers;
  - ``committee(rows) -> (m, len(rows), n_tags)`` (Pool's field, here per-tag): the
    per-tag probabilities of m committee members (bagged one-vs-rest models,
    :func:`alflow.tasks.multilabel.model.fit_committee`, built lazily by
    :func:`alflow.tasks.query.tag_committee`) for those pool rows;
* ``k``: how many items to pick (clipped to n_items); ``rng``: a ``numpy.random.Generator``;
* returns ``indices`` (<= k,) in pick order and ``scores`` of the same length (higher =
  more informative; NaN for random picks).

Each tag's uncertainty is read from its **signed margin** (:func:`signed_margin`), the
probability's distance from that tag's threshold scaled to [-1, 1]: ``2p - 1`` at the
default threshold 0.5, and 0 exactly where the model's decision flips.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from alflow.tasks import strategies as single
from alflow.tasks.multilabel.tags import check_tag_matrix, check_tag_proba
from alflow.tasks.strategies import Pool, Strategy, random_sampling, top_k

DEFAULT_THRESHOLD = 0.5
# Ties of a coarse score (cardinality inconsistency takes few values) are ordered by the
# mean-margin uncertainty, scaled below the coarse score's smallest step.
TIE_BREAK = 1e-3


@dataclass
class TagPool(Pool):
    """A :class:`~alflow.tasks.strategies.Pool` whose ``proba`` is (n_items, n_tags) per-tag
    probabilities, with what the multi-label strategies need; see the module docstring."""

    thresholds: np.ndarray | None = None
    labeled_proba: np.ndarray | None = None
    labeled_tags: np.ndarray | None = None

    def __post_init__(self):
        # Not Pool's check: rows are independent per-tag probabilities, not a distribution.
        self.proba = check_tag_proba(self.proba, "proba")
        n_tags = self.proba.shape[1]
        if self.thresholds is not None:
            self.thresholds = check_thresholds(self.thresholds, n_tags)
        if (self.labeled_proba is None) != (self.labeled_tags is None):
            raise ValueError("labeled_proba and labeled_tags go together: give both or neither")
        if self.labeled_tags is not None:
            self.labeled_tags = check_tag_matrix(self.labeled_tags, "labeled_tags", n_tags=n_tags)
            self.labeled_proba = check_tag_proba(self.labeled_proba, "labeled_proba", n_tags=n_tags,
                                                 n_items=self.labeled_tags.shape[0])


def as_tag_pool(pool) -> TagPool:
    """``pool`` as a :class:`TagPool`: a TagPool as is, a Pool's fields carried over, an
    array as its ``proba``."""
    if isinstance(pool, TagPool):
        return pool
    if isinstance(pool, Pool):
        return TagPool(**{f.name: getattr(pool, f.name) for f in fields(Pool)})
    return TagPool(pool)


def check_thresholds(thresholds, n_tags: int) -> np.ndarray:
    """(n_tags,) float thresholds, each strictly between 0 and 1."""
    values = np.asarray(thresholds, dtype=float)
    if values.shape != (n_tags,):
        raise ValueError(f"thresholds must have shape ({n_tags},), one per tag, got {values.shape}")
    if not np.isfinite(values).all() or values.min() <= 0.0 or values.max() >= 1.0:
        raise ValueError("thresholds must be strictly between 0 and 1")
    return values


# -- per-tag and per-item measures -------------------------------------------------------------
def signed_margin(proba, thresholds=None) -> np.ndarray:
    """(n, t) per-tag probabilities -> (n, t) signed margins in [-1, 1].

    ``(p - th) / (1 - th)`` above the tag's threshold ``th``, ``(p - th) / th`` below it:
    +1 is a sure yes, -1 a sure no, 0 the decision boundary. At ``th = 0.5`` it is ``2p - 1``.
    ``thresholds``: (t,), None for 0.5 each.
    """
    proba = check_tag_proba(proba)
    th = (np.full(proba.shape[1], DEFAULT_THRESHOLD) if thresholds is None
          else check_thresholds(thresholds, proba.shape[1]))
    above = proba >= th
    return np.where(above, (proba - th) / (1.0 - th), (proba - th) / th)


def mean_margin_uncertainty(proba, thresholds=None) -> np.ndarray:
    """(n, t) -> (n,): 1 - the mean over tags of |signed margin|, in [0, 1]; higher = more
    uncertain on average across tags (Brinker 2006's mean max-margin, over probabilities)."""
    return 1.0 - np.abs(signed_margin(proba, thresholds)).mean(axis=1)


def min_margin_uncertainty(proba, thresholds=None) -> np.ndarray:
    """(n, t) -> (n,): 1 - the smallest |signed margin| over tags, in [0, 1]; higher = the
    item's least certain tag is closer to its boundary."""
    return 1.0 - np.abs(signed_margin(proba, thresholds)).min(axis=1)


def predicted_cardinality(proba, thresholds=None) -> np.ndarray:
    """(n, t) -> (n,) int: how many tags each item gets (probability >= its threshold)."""
    return (signed_margin(proba, thresholds) >= 0).sum(axis=1)


def cardinality_inconsistency_score(proba, mean_cardinality: float, thresholds=None) -> np.ndarray:
    """(n, t) -> (n,): |tags predicted for the item - ``mean_cardinality``| (the labeled
    items' mean tag count), plus :data:`TIE_BREAK` x the mean-margin uncertainty, which
    orders the many ties among items with the same predicted count (Li & Guo 2013's label
    cardinality inconsistency)."""
    if not np.isfinite(mean_cardinality) or mean_cardinality < 0:
        raise ValueError(f"mean_cardinality must be a finite number >= 0, got {mean_cardinality}")
    distance = np.abs(predicted_cardinality(proba, thresholds) - mean_cardinality)
    return distance + TIE_BREAK * mean_margin_uncertainty(proba, thresholds)


def cardinality_features(proba) -> np.ndarray:
    """(n, t) -> (n, t): each row scaled to sum to 1 (an all-zero row: uniform), then sorted
    in decreasing order: the features MMC's tag-count model reads (Yang et al. 2009, 3.3)."""
    proba = check_tag_proba(proba)
    totals = proba.sum(axis=1, keepdims=True)
    t = proba.shape[1]
    scaled = np.divide(proba, totals, out=np.full(proba.shape, 1.0 / t), where=totals > 0)
    return -np.sort(-scaled, axis=1)


def predict_cardinality(proba, labeled_proba, labeled_tags) -> np.ndarray:
    """(n,) int: how many tags MMC expects each pool item to carry.

    A multinomial logistic regression from :func:`cardinality_features` of the labeled
    items' probabilities ``labeled_proba`` (L, t) to their answered tag counts (from
    ``labeled_tags`` (L, t)), applied to the pool's ``proba`` (n, t). When every labeled
    item has the same count, that count.
    """
    from sklearn.linear_model import LogisticRegression

    counts = check_tag_matrix(labeled_tags, "labeled_tags").sum(axis=1)
    if counts.size == 0:
        raise ValueError("predict_cardinality needs at least one labeled item")
    seen = np.unique(counts)
    if seen.size == 1:
        return np.full(np.asarray(proba).shape[0], int(seen[0]))
    model = LogisticRegression(max_iter=1000).fit(cardinality_features(labeled_proba), counts)
    return model.predict(cardinality_features(proba)).astype(int)


def mmc_score(proba, cardinality, thresholds=None) -> np.ndarray:
    """(n, t) -> (n,): maximum loss reduction with maximal confidence (Yang et al. 2009).

    The most confident tag vector ``y`` gives +1 to the ``cardinality[i]`` tags with the
    largest signed margins ``f`` and -1 to the rest; the score is the loss its answer
    would remove, ``sum_j (1 - y_j f_j) / 2``, in [0, t]: with ``f = 2p - 1`` exactly the
    expected number of tags that guess gets wrong. ``cardinality``: (n,) ints.
    """
    f = signed_margin(proba, thresholds)
    n, t = f.shape
    cardinality = np.clip(np.asarray(cardinality, dtype=int), 0, t)
    if cardinality.shape != (n,):
        raise ValueError(f"cardinality must have shape ({n},), one count per item, got {cardinality.shape}")
    rank = np.argsort(np.argsort(-f, axis=1, kind="stable"), axis=1, kind="stable")  # 0 = largest f
    y = np.where(rank < cardinality[:, None], 1.0, -1.0)
    return ((1.0 - y * f) / 2.0).sum(axis=1)


def tag_vote_entropy(committee_proba, thresholds=None) -> np.ndarray:
    """(m, n, t) members' per-tag probabilities -> (n,): the mean over tags of the binary
    entropy of the members' votes, in nats, in [0, log 2].

    A member votes yes on a tag where its probability reaches the tag's threshold
    (``thresholds`` (t,), None: 0.5 each); a tag on which the m members split half and half
    gives log 2, one on which they agree 0. The single-label
    :func:`~alflow.tasks.strategies.vote_entropy`, per tag."""
    committee_proba = np.asarray(committee_proba, dtype=float)
    if committee_proba.ndim != 3:
        raise ValueError(f"committee probabilities must be (members, n_items, n_tags), got {committee_proba.shape}")
    m, n, t = committee_proba.shape
    if m == 0:
        raise ValueError("committee probabilities must come from at least one member, got 0")
    flat = check_tag_proba(committee_proba.reshape(m * n, t), "committee probabilities")
    votes = signed_margin(flat, thresholds).reshape(m, n, t) >= 0
    yes = votes.mean(axis=0)  # (n, t): share of members voting yes
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(yes > 0, yes * np.log(yes), 0.0) + np.where(yes < 1, (1 - yes) * np.log1p(-yes), 0.0)
    return 0.0 - terms.mean(axis=1)  # 0.0 -: no -0.0 where every member agrees


def committee_score(committee_proba, thresholds=None) -> np.ndarray:
    """(m, n, t) -> (n,): :func:`tag_vote_entropy`, plus :data:`TIE_BREAK` x the mean-margin
    uncertainty of the members' mean probabilities, which orders the many ties (with m
    members a tag's vote entropy takes only m // 2 + 1 values)."""
    disagreement = tag_vote_entropy(committee_proba, thresholds)
    consensus = np.asarray(committee_proba, dtype=float).mean(axis=0)
    return disagreement + TIE_BREAK * mean_margin_uncertainty(consensus, thresholds)


# -- strategies --------------------------------------------------------------------------------
def _ranked(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    picks = top_k(scores, k)
    return picks, scores[picks]


def mean_margin(pool, k: int, rng: np.random.Generator | None = None):
    """The k items with the highest :func:`mean_margin_uncertainty`."""
    pool = as_tag_pool(pool)
    return _ranked(mean_margin_uncertainty(pool.proba, pool.thresholds), k)


def min_margin(pool, k: int, rng: np.random.Generator | None = None):
    """The k items with the highest :func:`min_margin_uncertainty`."""
    pool = as_tag_pool(pool)
    return _ranked(min_margin_uncertainty(pool.proba, pool.thresholds), k)


def cardinality_inconsistency(pool, k: int, rng: np.random.Generator | None = None):
    """The k items whose predicted tag count is furthest from the labeled items' mean count
    (:func:`cardinality_inconsistency_score`). Without labeled tags there is no mean to
    compare with: :func:`mean_margin`."""
    pool = as_tag_pool(pool)
    if pool.labeled_tags is None or pool.labeled_tags.shape[0] == 0:
        return mean_margin(pool, k, rng)
    reference = float(pool.labeled_tags.sum(axis=1).mean())
    return _ranked(cardinality_inconsistency_score(pool.proba, reference, pool.thresholds), k)


def mmc(pool, k: int, rng: np.random.Generator | None = None):
    """The k items with the highest :func:`mmc_score`, tag counts from
    :func:`predict_cardinality` on ``labeled_proba``/``labeled_tags``. Without labeled
    items: :func:`mean_margin`."""
    pool = as_tag_pool(pool)
    if pool.labeled_tags is None or pool.labeled_tags.shape[0] == 0:
        return mean_margin(pool, k, rng)
    cardinality = predict_cardinality(pool.proba, pool.labeled_proba, pool.labeled_tags)
    return _ranked(mmc_score(pool.proba, cardinality, pool.thresholds), k)


def committee(candidates: int = 10) -> Strategy:
    """Query by committee over tags: among the ``k * candidates`` items with the highest
    :func:`mean_margin_uncertainty`, the k on which the members of ``pool.committee``
    disagree most (:func:`committee_score`: vote entropy per tag, averaged over tags; ties
    by the members' mean margin). ``pool.committee(rows)`` gives (m, len(rows), n_tags)
    per-tag probabilities of m members; votes are cut at ``pool.thresholds``. Without a
    committee (too few labels to bag one): :func:`mean_margin`.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")

    def strategy(pool, k: int, rng: np.random.Generator | None = None):
        pool = as_tag_pool(pool)
        if pool.committee is None:
            return mean_margin(pool, k, rng)
        rows = top_k(mean_margin_uncertainty(pool.proba, pool.thresholds), int(k) * candidates)
        member_proba = np.asarray(pool.committee(rows), dtype=float)
        expected = (len(rows), pool.proba.shape[1])
        if member_proba.ndim != 3 or member_proba.shape[1:] != expected:
            raise ValueError(f"pool.committee(rows) must give (members, {expected[0]}, {expected[1]}) per-tag "
                             f"probabilities, got {member_proba.shape}")
        scores = committee_score(member_proba, pool.thresholds)
        order = top_k(scores, k)
        return rows[order], scores[order]

    strategy.__name__ = "committee"
    return strategy


STRATEGIES: dict[str, Strategy] = {
    "mean_margin": mean_margin,
    "min_margin": min_margin,
    "cardinality_inconsistency": cardinality_inconsistency,
    "mmc": mmc,
    "committee": committee(),
    "random": random_sampling,
}
NAMES = tuple(STRATEGIES)


def get_strategy(name: str, exploration: float = 0.0, near_duplicate: float | None = None,
                 candidates: int = 10) -> Strategy:
    """The multi-label strategy ``name`` (one of :data:`NAMES`), composed as
    :func:`alflow.tasks.strategies.get_strategy` composes single-label ones: an
    ``exploration`` share of random picks, then near-duplicates (cosine >= ``near_duplicate``)
    dropped. ``candidates``: how many times k of the most uncertain items ``committee``
    looks at (``query.candidates``)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown multi-label strategy {name!r}; choose from {list(NAMES)}")
    strategy: Callable = committee(candidates) if name == "committee" else STRATEGIES[name]
    if name != "random" and exploration > 0:
        strategy = single.with_exploration(strategy, exploration)
    if near_duplicate is not None:
        strategy = single.without_near_duplicates(strategy, near_duplicate)
    return strategy
