"""Query strategies: known probabilities in, known picks out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import sparse
from conftest import SMS_CSV
from sklearn.feature_extraction.text import TfidfVectorizer

from alflow.tasks import strategies as st

# Five items, three classes. The three measures rank them three different ways.
PROBA = np.array([
    [0.80, 0.10, 0.10],  # 0: confident
    [0.50, 0.50, 0.00],  # 1: a coin flip between two classes
    [0.40, 0.30, 0.30],  # 2: spread over all three
    [0.70, 0.15, 0.15],  # 3: fairly sure, but the rest is spread
    [0.45, 0.45, 0.10],  # 4: a coin flip, a little mass elsewhere
])


def plogp(*ps: float) -> float:
    return -sum(p * math.log(p) for p in ps if p > 0)


# -- the measures ------------------------------------------------------------------------
def test_least_confidence_values():
    np.testing.assert_allclose(st.least_confidence(PROBA), [0.2, 0.5, 0.6, 0.3, 0.55])


def test_margin_values_are_top1_minus_top2():
    np.testing.assert_allclose(st.margin(PROBA), [0.7, 0.0, 0.1, 0.55, 0.0], atol=1e-12)
    # The top two need not be in the first columns, nor sorted.
    np.testing.assert_allclose(st.margin([[0.1, 0.3, 0.6], [0.25, 0.05, 0.7]]), [0.3, 0.45])


def test_entropy_values_in_nats():
    expected = [
        plogp(0.8, 0.1, 0.1),
        math.log(2),  # the zero column contributes nothing (no NaN from 0 * log 0)
        plogp(0.4, 0.3, 0.3),
        plogp(0.7, 0.15, 0.15),
        plogp(0.45, 0.45, 0.1),
    ]
    values = st.entropy(PROBA)
    assert not np.isnan(values).any()
    np.testing.assert_allclose(values, expected)
    np.testing.assert_allclose(st.entropy([[1 / 3] * 3, [1.0, 0.0, 0.0]]), [math.log(3), 0.0], atol=1e-12)


@pytest.mark.parametrize("measure", [st.least_confidence, st.margin, st.entropy])
@pytest.mark.parametrize("bad", [np.array([0.2, 0.8]), np.array([[1.0], [1.0]]), np.zeros((2, 2, 2))])
def test_measures_reject_bad_shapes(measure, bad):
    with pytest.raises(ValueError, match="n_classes"):
        measure(bad)


# -- uncertainty strategies: picks and their order ---------------------------------------
@pytest.mark.parametrize(
    ("measure", "order", "scores"),
    [
        ("least_confidence", [2, 4, 1, 3, 0], [0.6, 0.55, 0.5, 0.3, 0.2]),
        # 1 - margin; items 1 and 4 tie at 1.0 and the lower index comes first.
        ("margin", [1, 4, 2, 3, 0], [1.0, 1.0, 0.9, 0.45, 0.3]),
        ("entropy", [2, 4, 3, 1, 0],
         [plogp(0.4, 0.3, 0.3), plogp(0.45, 0.45, 0.1), plogp(0.7, 0.15, 0.15), math.log(2),
          plogp(0.8, 0.1, 0.1)]),
    ],
)
def test_uncertainty_sampling_picks_expected_items_in_order(measure, order, scores):
    strategy = st.uncertainty_sampling(measure)
    rng = np.random.default_rng(0)
    for k in range(0, 6):
        picks, got = strategy(PROBA, k, rng)
        assert picks.tolist() == order[:k]
        assert picks.dtype == np.int64
        np.testing.assert_allclose(got, scores[:k])
    picks, _ = strategy(PROBA, 50, rng)  # more than there are items: all of them
    assert picks.tolist() == order


def test_uncertainty_sampling_ignores_the_rng():
    strategy = st.uncertainty_sampling("entropy")
    a, _ = strategy(PROBA, 3, np.random.default_rng(1))
    b, _ = strategy(PROBA, 3, np.random.default_rng(2))
    assert a.tolist() == b.tolist()


def test_unknown_measure_rejected():
    with pytest.raises(ValueError, match="unknown uncertainty measure"):
        st.uncertainty_sampling("confusion")


@pytest.mark.parametrize("name", ["least_confidence", "margin", "entropy"])
def test_uncertainty_strategies_reject_bad_proba(name):
    with pytest.raises(ValueError):
        st.uncertainty_sampling(name)(np.array([0.3, 0.7]), 1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        st.uncertainty_sampling(name)(np.ones((4, 1)), 1, np.random.default_rng(0))


# -- top_k -------------------------------------------------------------------------------
def test_top_k_highest_first_ties_to_lower_index():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 0.5])
    assert st.top_k(scores, 1).tolist() == [1]
    assert st.top_k(scores, 2).tolist() == [1, 2]
    assert st.top_k(scores, 3).tolist() == [1, 2, 4]
    assert st.top_k(scores, 4).tolist() == [1, 2, 4, 3]
    assert st.top_k(scores, 6).tolist() == [1, 2, 4, 3, 0, 5]


def test_top_k_edge_sizes():
    scores = np.array([0.2, 0.9, 0.5])
    assert st.top_k(scores, 3).tolist() == [1, 2, 0]
    assert st.top_k(scores, 100).tolist() == [1, 2, 0]
    for k in (0, -3):
        empty = st.top_k(scores, k)
        assert empty.size == 0 and empty.dtype == np.int64
    assert st.top_k(np.array([]), 5).size == 0


def test_top_k_matches_a_stable_full_sort_with_many_ties():
    rng = np.random.default_rng(123)
    for trial in range(30):
        n = int(rng.integers(1, 400))
        scores = rng.integers(0, 6, size=n).astype(float)  # few distinct values: ties everywhere
        k = int(rng.integers(0, n + 3))
        expected = np.argsort(-scores, kind="stable")[:k]
        got = st.top_k(scores, k)
        assert got.tolist() == expected.tolist(), (trial, n, k)


def test_top_k_is_deterministic_on_permuted_input():
    # The same multiset of scores in another order: the picked *scores* are the same,
    # and among equal scores the lower index always wins.
    scores = np.array([0.3, 0.7, 0.7, 0.7, 0.1, 0.7])
    assert st.top_k(scores, 2).tolist() == [1, 2]
    assert st.top_k(scores[::-1].copy(), 2).tolist() == [0, 2]


# -- random and exploration --------------------------------------------------------------
def uniform_proba(n: int, c: int = 2) -> np.ndarray:
    return np.full((n, c), 1.0 / c)


def test_random_sampling_seeded():
    proba = uniform_proba(1000)
    a, scores = st.random_sampling(proba, 20, np.random.default_rng(5))
    b, _ = st.random_sampling(proba, 20, np.random.default_rng(5))
    c, _ = st.random_sampling(proba, 20, np.random.default_rng(6))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 20
    assert a.min() >= 0 and a.max() < 1000
    assert np.isnan(scores).all() and scores.shape == (20,)


def test_random_sampling_clips_k():
    picks, scores = st.random_sampling(uniform_proba(7), 50, np.random.default_rng(0))
    assert sorted(picks.tolist()) == list(range(7))
    assert scores.shape == (7,)
    picks, scores = st.random_sampling(uniform_proba(7), 0, np.random.default_rng(0))
    assert picks.size == 0 and scores.size == 0


def ranked_proba(n: int) -> np.ndarray:
    """Row i has p(class 0) = 0.5 + i / (2n): row 0 is the most uncertain, then 1, 2, ..."""
    p0 = 0.5 + np.arange(n) / (2.0 * n)
    return np.column_stack([p0, 1.0 - p0])


def test_with_exploration_puts_random_picks_last():
    proba = ranked_proba(200)
    strategy = st.with_exploration(st.uncertainty_sampling("margin"), 0.3)
    picks, scores = strategy(proba, 10, np.random.default_rng(11))
    n_random = st.n_exploration(10, 0.3)
    assert n_random == 3
    assert len(picks) == 10 and len(set(picks.tolist())) == 10
    # The first seven are the uncertainty picks, most uncertain first, with their scores.
    assert picks[:7].tolist() == list(range(7))
    assert not np.isnan(scores[:7]).any()
    assert np.all(np.diff(scores[:7]) <= 0)
    # The last three are random: NaN scores, drawn from outside the uncertainty picks.
    assert np.isnan(scores[7:]).all()
    assert set(picks[7:].tolist()).isdisjoint(range(7))


def test_with_exploration_seeded():
    proba = ranked_proba(500)
    strategy = st.with_exploration(st.uncertainty_sampling("entropy"), 0.5)
    a, _ = strategy(proba, 20, np.random.default_rng(3))
    b, _ = strategy(proba, 20, np.random.default_rng(3))
    c, _ = strategy(proba, 20, np.random.default_rng(4))
    assert a.tolist() == b.tolist()
    assert a[:10].tolist() == c[:10].tolist()  # the uncertainty part does not depend on the rng
    assert a[10:].tolist() != c[10:].tolist()


def test_with_exploration_never_repeats_an_index():
    strategy = st.with_exploration(st.uncertainty_sampling("least_confidence"), 0.5)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for n, k in [(10, 10), (10, 9), (5, 4), (30, 7), (3, 50)]:
            picks, scores = strategy(ranked_proba(n), k, rng)
            assert len(picks) == min(k, n)
            assert len(set(picks.tolist())) == len(picks)
            assert len(scores) == len(picks)


@pytest.mark.parametrize(("k", "share", "n_random"), [(20, 0.1, 2), (10, 0.0, 0), (10, 1.0, 10), (8, 0.25, 2), (10, 0.24, 2), (10, 0.26, 3), (10, 0.3, 3)])
def test_with_exploration_share(k, share, n_random):
    picks, scores = st.with_exploration(st.uncertainty_sampling("margin"), share)(
        ranked_proba(100), k, np.random.default_rng(0))
    assert st.n_exploration(k, share) == n_random
    assert np.isnan(scores).sum() == n_random
    assert np.isnan(scores[k - n_random:]).all()
    assert picks[: k - n_random].tolist() == list(range(k - n_random))


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_with_exploration_rejects_bad_share(share):
    with pytest.raises(ValueError):
        st.with_exploration(st.uncertainty_sampling("margin"), share)


# -- get_strategy ------------------------------------------------------------------------
def test_get_strategy_without_exploration_is_the_plain_measure():
    proba = ranked_proba(50)
    picks, scores = st.get_strategy("margin", 0.0)(proba, 5, np.random.default_rng(0))
    expected, expected_scores = st.uncertainty_sampling("margin")(proba, 5, np.random.default_rng(0))
    assert picks.tolist() == expected.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(scores, expected_scores)


def test_get_strategy_composes_exploration():
    proba = ranked_proba(50)
    picks, scores = st.get_strategy("least_confidence", 0.2)(proba, 10, np.random.default_rng(9))
    assert picks[:8].tolist() == list(range(8))
    assert np.isnan(scores[8:]).all() and not np.isnan(scores[:8]).any()
    again, _ = st.with_exploration(st.uncertainty_sampling("least_confidence"), 0.2)(
        proba, 10, np.random.default_rng(9))
    assert picks.tolist() == again.tolist()


def test_get_strategy_random_ignores_exploration():
    proba = uniform_proba(100)
    a, scores = st.get_strategy("random", 0.3)(proba, 10, np.random.default_rng(2))
    b, _ = st.random_sampling(proba, 10, np.random.default_rng(2))
    assert a.tolist() == b.tolist()
    assert np.isnan(scores).all()


def test_get_strategy_unknown_name():
    with pytest.raises(ValueError):
        st.get_strategy("most_confused", 0.1)


# -- coverage (cold start) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sms_tfidf():
    import pandas as pd

    texts = pd.read_csv(SMS_CSV)["text"].head(400).tolist()
    return TfidfVectorizer().fit_transform(texts)


def test_coverage_on_real_texts_picks_k_distinct(sms_tfidf):
    picks, scores = st.coverage(sms_tfidf, 12, np.random.default_rng(42))
    assert picks.dtype == np.int64
    assert len(picks) == 12 and len(set(picks.tolist())) == 12
    assert picks.min() >= 0 and picks.max() < sms_tfidf.shape[0]
    assert len(scores) == 12
    shares = scores[~np.isnan(scores)]
    assert np.all(shares > 0) and shares.sum() <= 1.0 + 1e-9
    # Largest cluster first.
    assert np.all(np.diff(shares) <= 1e-12)


def test_coverage_deterministic_under_seed(sms_tfidf):
    a, sa = st.coverage(sms_tfidf, 10, np.random.default_rng(7))
    b, sb = st.coverage(sms_tfidf, 10, np.random.default_rng(7))
    assert a.tolist() == b.tolist()
    np.testing.assert_array_equal(sa, sb)


def test_coverage_picks_one_item_per_cluster():
    # Three tight groups: one sentence each, varied by a trailing word; 7, 6 and 8 members.
    bases = {
        "football": "the striker scored a late goal to win the football match for the home team",
        "cooking": "simmer the garlic and onion sauce slowly in a heavy pan then add fresh basil",
        "markets": "shares fell sharply as the stock market index dropped on weak bank earnings",
    }
    sizes = {"football": 7, "cooking": 6, "markets": 8}
    tails = ["today", "again", "yesterday", "reportedly", "finally", "tonight", "quickly", "once more"]
    texts, group_of = [], []
    for name, base in bases.items():
        for tail in tails[: sizes[name]]:
            texts.append(f"{base} {tail}")
            group_of.append(name)
    features = TfidfVectorizer().fit_transform(texts)
    for seed in range(10):
        picks, scores = st.coverage(features, 3, np.random.default_rng(seed))
        # One per group, largest group first; scores are the groups' shares of the pool.
        assert [group_of[i] for i in picks] == ["markets", "football", "cooking"], seed
        np.testing.assert_allclose(scores, [8 / 21, 7 / 21, 6 / 21])


def test_coverage_dense_features_and_edge_sizes():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = np.vstack([c + rng.normal(scale=0.1, size=(15, 2)) for c in centres])
    picks, _ = st.coverage(points, 4, np.random.default_rng(1))
    assert sorted(int(i) // 15 for i in picks) == [0, 1, 2, 3]
    all_picks, shares = st.coverage(points, 60, np.random.default_rng(1))
    assert all_picks.tolist() == list(range(60))
    np.testing.assert_allclose(shares, 1 / 60)
    assert st.coverage(points, 200, np.random.default_rng(1))[0].tolist() == list(range(60))
    none, none_scores = st.coverage(points, 0, np.random.default_rng(1))
    assert none.size == 0 and none_scores.size == 0


# -- the Pool shape: features, labeled counts, committees ----------------------------------
def test_a_bare_array_is_a_pool_of_probabilities():
    pool = st.Pool(PROBA)
    for name in ("margin", "entropy", "least_confidence"):
        a, sa = st.uncertainty_sampling(name)(pool, 3, np.random.default_rng(0))
        b, sb = st.uncertainty_sampling(name)(PROBA, 3, np.random.default_rng(0))
        assert a.tolist() == b.tolist()
        np.testing.assert_allclose(sa, sb)


def one_hot_rows(*dims: int, d: int = 6) -> np.ndarray:
    x = np.zeros((len(dims), d))
    x[np.arange(len(dims)), dims] = 1.0
    return x


def test_badge_spreads_the_batch_over_directions():
    # Items 0 and 1 are the same text and the most uncertain; 2 points elsewhere.
    # k-means++ takes the largest gradient first (0), never its twin (distance 0), then 2.
    proba = np.array([[0.5, 0.5], [0.5, 0.5], [0.6, 0.4]])
    x = one_hot_rows(0, 0, 1)
    pool = st.Pool(proba, features=lambda rows: x[rows])
    for seed in range(10):
        picks, scores = st.badge(candidates=2)(pool, 2, np.random.default_rng(seed))
        assert picks.tolist() == [0, 2]
        np.testing.assert_allclose(scores, [0.5, 0.5 + 0.32])  # |a_0|²; |a_0|² + |a_2|² (orthogonal)
    # Asked for more than there are distinct items: stops short of the twin.
    picks, _ = st.badge(candidates=2)(pool, 3, np.random.default_rng(0))
    assert picks.tolist() == [0, 2]


def test_badge_only_looks_at_the_uncertain_candidates():
    proba = ranked_proba(100)  # row 0 most uncertain
    x = np.eye(100)
    picks, _ = st.badge(candidates=3)(st.Pool(proba, features=lambda rows: x[rows]), 5, np.random.default_rng(1))
    assert len(set(picks.tolist())) == 5 and max(picks) < 15  # within the 5 * 3 smallest margins


def test_badge_without_features_is_margin():
    picks, _ = st.badge()(ranked_proba(30), 4, np.random.default_rng(0))
    assert picks.tolist() == [0, 1, 2, 3]


def test_badge_at_200k_candidates_in_bounded_memory():
    import tracemalloc

    rng = np.random.default_rng(0)
    n, c, d = 200_000, 4, 16
    logits = rng.normal(size=(n, c))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    x = rng.normal(size=(n, d)).astype(np.float32)
    pool = st.Pool(proba, features=lambda rows: x[rows])
    tracemalloc.start()
    picks, _ = st.badge(candidates=10_000)(pool, 20, np.random.default_rng(1))  # all 200k are candidates
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(set(picks.tolist())) == 20
    # A few vectors of length n (features, gradients, distances): tens of MB. One n×n
    # matrix would be 320 GB, one n×k float matrix per pick still far below this bound.
    assert peak < 120 * 2**20, peak / 2**20


def test_class_balanced_fills_the_rarest_class_first():
    # Items 0-3 predicted class 0, 4-6 class 1; uncertainty rises with the index in each.
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4],
                      [0.2, 0.8], [0.4, 0.6], [0.45, 0.55]])
    pool = st.Pool(proba, labeled_counts=np.array([5, 2]))
    picks, scores = st.class_balanced(pool, 5, np.random.default_rng(0))
    # Class 1 has 3 fewer labels: its three predicted items first (most uncertain first),
    # then the classes are even and take turns (class 0 first on ties).
    assert picks.tolist() == [6, 5, 4, 3, 2]
    np.testing.assert_allclose(scores, 1 - st.margin(proba[picks]))


def test_class_balanced_skips_a_class_with_no_predicted_items():
    proba = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    picks, _ = st.class_balanced(st.Pool(proba, labeled_counts=np.array([1, 1, 0])), 3, np.random.default_rng(0))
    assert sorted(picks.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="labeled_counts"):
        st.class_balanced(st.Pool(proba, labeled_counts=np.array([1, 1])), 2, np.random.default_rng(0))


def test_vote_entropy_values():
    # 4 members, 2 items: unanimous, and split 2-2.
    members = np.array([
        [[0.9, 0.1], [0.9, 0.1]],
        [[0.8, 0.2], [0.7, 0.3]],
        [[0.6, 0.4], [0.2, 0.8]],
        [[0.7, 0.3], [0.1, 0.9]],
    ])
    np.testing.assert_allclose(st.vote_entropy(members), [0.0, math.log(2)], atol=1e-12)


def test_committee_picks_where_members_disagree():
    proba = ranked_proba(6)  # the single model finds row 0 most uncertain
    votes = {2: [0, 1, 0, 1], 4: [0, 0, 0, 1]}  # members split on row 2, a little on row 4

    def committee(rows):
        out = np.zeros((4, len(rows), 2))
        for j, row in enumerate(rows):
            for m, cls in enumerate(votes.get(int(row), [0, 0, 0, 0])):
                out[m, j, cls] = 0.8
                out[m, j, 1 - cls] = 0.2
        return out

    picks, scores = st.committee(candidates=3)(st.Pool(proba, committee=committee), 2, np.random.default_rng(0))
    assert picks.tolist() == [2, 4]
    assert scores[0] > scores[1] > 0


# -- near-duplicates ---------------------------------------------------------------------
def test_near_duplicates_never_in_one_batch_nor_already_labeled():
    texts = [
        "win a free cruise now call 0800 123",      # 0
        "win a free cruise now call 0800 123!",     # 1: the same message
        "are we still on for lunch tomorrow",        # 2
        "meeting moved to 3pm see you there",        # 3: the same as a labeled item
        "your parcel is waiting, pay the fee",       # 4
        "win a free cruise now call 0800 123",       # 5: the same as 0
        "can you pick up milk on the way home",      # 6
    ]
    labeled = ["meeting moved to 3pm see you there"]
    vec = TfidfVectorizer().fit(texts + labeled)
    x = vec.transform(texts)
    proba = ranked_proba(len(texts))  # margin order: 0, 1, 2, ...
    pool = st.Pool(proba, features=lambda rows: x[rows], labeled_features=vec.transform(labeled))
    for name in ("margin", "random", "badge", "entropy"):
        strategy = st.get_strategy(name, 0.0, near_duplicate=0.9, candidates=10)
        for seed in range(5):
            picks, _ = strategy(pool, 4, np.random.default_rng(seed))
            chosen = set(picks.tolist())
            assert len(chosen) == len(picks) == 4, (name, seed)
            assert len(chosen & {0, 1, 5}) <= 1, (name, seed, picks)
            assert 3 not in chosen, (name, seed, picks)
    picks, _ = st.get_strategy("margin", 0.0, near_duplicate=0.9)(pool, 4, np.random.default_rng(0))
    assert picks.tolist() == [0, 2, 4, 6]
    # Asked for everything: only the distinct, never-labeled messages come back.
    picks, _ = st.get_strategy("margin", 0.0, near_duplicate=0.9)(pool, 7, np.random.default_rng(0))
    assert picks.tolist() == [0, 2, 4, 6]


def test_near_duplicates_keep_the_exploration_share():
    x = np.eye(200)
    x[1] = x[0]  # one duplicate pair among the most uncertain
    pool = st.Pool(ranked_proba(200), features=lambda rows: x[rows])
    strategy = st.get_strategy("margin", 0.2, near_duplicate=0.9)
    picks, scores = strategy(pool, 10, np.random.default_rng(3))
    assert len(set(picks.tolist())) == 10 and 1 not in picks.tolist()
    assert picks[:8].tolist() == [0, 2, 3, 4, 5, 6, 7, 8]
    assert np.isnan(scores[8:]).all() and not np.isnan(scores[:8]).any()


def test_get_strategy_knows_every_configurable_name():
    from alflow.config import STRATEGIES

    assert set(STRATEGIES) == set(st.NAMES)
    for name in st.NAMES:
        picks, _ = st.get_strategy(name, 0.1, 0.9)(ranked_proba(40), 5, np.random.default_rng(0))
        assert len(set(picks.tolist())) == 5


# -- cluster_margin: the most uncertain item of each cluster of the uncertain candidates ----
def test_cluster_margin_takes_the_most_uncertain_item_of_each_cluster():
    # Rows 0-2 are one topic, rows 3-5 another; row 0 is the most uncertain, then 1, 2, ...
    # Margin would ask about 0 and 1 (the same topic twice); cluster_margin asks 0 and 3.
    proba = ranked_proba(6)
    emb = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.0, 1.0], [0.1, 0.99], [0.2, 0.98]])
    pool = st.Pool(proba, embedding=lambda rows: emb[rows])
    for seed in range(5):
        picks, scores = st.cluster_margin(candidates=3)(pool, 2, np.random.default_rng(seed))
        assert picks.tolist() == [0, 3]
        np.testing.assert_allclose(scores, 1 - st.margin(proba[[0, 3]]))
    assert st.uncertainty_sampling("margin")(pool, 2)[0].tolist() == [0, 1]


def test_cluster_margin_clusters_the_features_without_an_embedding():
    proba = ranked_proba(6)
    x = sparse.csr_matrix(one_hot_rows(0, 0, 1, 1, 2, 2))  # three topics, two items each
    picks, _ = st.cluster_margin(candidates=2)(st.Pool(proba, features=lambda rows: x[rows]), 3,
                                               np.random.default_rng(0))
    assert picks.tolist() == [0, 2, 4]


def test_cluster_margin_only_looks_at_the_uncertain_candidates_and_is_seeded():
    rng = np.random.default_rng(0)
    proba = ranked_proba(300)
    emb = rng.normal(size=(300, 8))
    pool = st.Pool(proba, embedding=lambda rows: emb[rows])
    a, _ = st.cluster_margin(candidates=4)(pool, 10, np.random.default_rng(7))
    b, _ = st.cluster_margin(candidates=4)(pool, 10, np.random.default_rng(7))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and max(a) < 40
    assert a[0] == 0  # the most uncertain item leads its cluster and the batch


def test_cluster_margin_without_features_is_margin():
    picks, _ = st.cluster_margin()(ranked_proba(30), 4, np.random.default_rng(0))
    assert picks.tolist() == [0, 1, 2, 3]
