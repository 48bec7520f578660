"""Multi-label foundations: tags, strategies, the one-vs-rest model, metrics, agreement over
tag sets and the AG News multi-label builder. Known inputs, known answers; no Prefect."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
from conftest import AG_NEWS_CSV, DATA, REPO
from scipy import sparse
from sklearn import metrics as skm

from alflow.config import ModelSettings
from alflow.tasks import agreement
from alflow.tasks import strategies as st
from alflow.tasks.multilabel import metrics as mm
from alflow.tasks.multilabel import model as mmodel
from alflow.tasks.multilabel import strategies as ml
from alflow.tasks.multilabel.tags import format_tags, parse_tags, tag_matrix, tag_sets

SAMPLE = DATA / "ag_news_multilabel.csv"

# Three tags at the default threshold 0.5. |signed margin| = |2p - 1|.
#   A: one tag at its boundary, two sure ones   mean |m| 0.687, min |m| 0.10
#   B: every tag fairly unsure                  mean |m| 0.367, min |m| 0.30
#   C: sure of every tag                        mean |m| 0.900, min |m| 0.90
#   D: sure it carries all three                mean |m| 0.600, min |m| 0.40
PROBA = np.array([
    [0.55, 0.99, 0.01],
    [0.70, 0.30, 0.65],
    [0.95, 0.05, 0.05],
    [0.90, 0.80, 0.70],
])


def _load_builder():
    spec = importlib.util.spec_from_file_location("make_multilabel", REPO / "benchmarks" / "make_multilabel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- tags ---------------------------------------------------------------------------------------
def test_tags_round_trip_and_matrix():
    assert parse_tags(" world;sports ; ") == {"world", "sports"}
    assert parse_tags("") == parse_tags(None) == parse_tags(float("nan")) == frozenset()
    assert format_tags({"world", "business"}) == "business;world"
    assert format_tags(set()) == ""
    y = tag_matrix([{"b"}, set(), {"a", "c"}], ["a", "b", "c"])
    np.testing.assert_array_equal(y, [[0, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert tag_sets(y, ["a", "b", "c"]) == [{"b"}, frozenset(), {"a", "c"}]


def test_tags_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="item 1 has tag 'z'"):
        tag_matrix([{"a"}, {"z"}], ["a", "b"])
    with pytest.raises(ValueError, match="'a' is repeated"):
        tag_matrix([{"a"}], ["a", "a"])
    with pytest.raises(ValueError, match="without ';'"):
        format_tags({"a;b"})
    with pytest.raises(ValueError, match="labels cell must be text"):
        parse_tags(3)


# -- strategies: measures and rankings --------------------------------------------------------
def test_signed_margin_is_scaled_distance_to_each_threshold():
    np.testing.assert_allclose(ml.signed_margin([[0.75, 0.25, 0.5]]), [[0.5, -0.5, 0.0]])
    # threshold 0.2: 0.6 is half way up to 1, 0.1 half way down to 0
    np.testing.assert_allclose(ml.signed_margin([[0.6, 0.1]], [0.2, 0.2]), [[0.5, -0.5]])


def test_mean_and_min_margin_rank_as_computed_by_hand():
    np.testing.assert_allclose(ml.mean_margin_uncertainty(PROBA), 1 - np.array([2.06 / 3, 1.1 / 3, 0.9, 0.6]))
    np.testing.assert_allclose(ml.min_margin_uncertainty(PROBA), [0.9, 0.7, 0.1, 0.6])
    picks, scores = ml.mean_margin(PROBA, 4, None)
    assert picks.tolist() == [1, 3, 0, 2]  # B, D, A, C
    picks, _ = ml.min_margin(PROBA, 2, None)
    assert picks.tolist() == [0, 1]  # A's boundary tag beats B's spread doubt
    # thresholds move the boundary: at 0.7 for tag 0, B's first tag is exactly undecided
    picks, scores = ml.min_margin(ml.TagPool(PROBA, thresholds=[0.7, 0.5, 0.5]), 1, None)
    assert picks.tolist() == [1] and scores[0] == pytest.approx(1.0)


def test_cardinality_inconsistency_picks_tag_counts_unlike_the_labeled_ones():
    labeled = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])  # every answer so far: one tag
    pool = ml.TagPool(PROBA, labeled_proba=labeled * 0.8 + 0.1, labeled_tags=labeled)
    picks, scores = ml.cardinality_inconsistency(pool, 4, None)
    # predicted counts A 1, B 2, C 1, D 3 against a mean of 1; A and C tie, A is less sure
    assert picks.tolist() == [3, 1, 0, 2]
    assert scores[0] == pytest.approx(2.0, abs=ml.TIE_BREAK)
    # without labeled tags there is nothing to be inconsistent with: mean margin
    assert ml.cardinality_inconsistency(PROBA, 4, None)[0].tolist() == ml.mean_margin(PROBA, 4, None)[0].tolist()


def test_mmc_score_is_the_loss_of_the_most_confident_tag_vector():
    proba = np.array([[0.9, 0.6, 0.1], [0.6, 0.6, 0.05]])
    # one tag: +1 on the largest f; loss = sum (1 - y f) / 2 = (1 - p) on +1, p on -1
    np.testing.assert_allclose(ml.mmc_score(proba, [1, 1]), [0.1 + 0.6 + 0.1, 0.4 + 0.6 + 0.05])
    np.testing.assert_allclose(ml.mmc_score(proba, [2, 2]), [0.1 + 0.4 + 0.1, 0.4 + 0.4 + 0.05])
    np.testing.assert_allclose(ml.mmc_score(proba, [0, 3]), [0.9 + 0.6 + 0.1, 0.4 + 0.4 + 0.95])


def test_mmc_predicts_tag_counts_from_the_labeled_items():
    one, two = [0.9, 0.1, 0.1], [0.85, 0.8, 0.1]
    labeled_proba = np.array([one, two] * 10)
    labeled_tags = np.array([[1, 0, 0], [1, 1, 0]] * 10)
    pool = np.array([[0.1, 0.9, 0.05], [0.1, 0.85, 0.8], [0.6, 0.6, 0.05]])
    counts = ml.predict_cardinality(pool, labeled_proba, labeled_tags)
    assert counts.tolist() == [1, 2, 2]
    assert ml.predict_cardinality(pool, labeled_proba[:1], labeled_tags[:1]).tolist() == [1, 1, 1]
    picks, scores = ml.mmc(ml.TagPool(pool, labeled_proba=labeled_proba, labeled_tags=labeled_tags), 3, None)
    np.testing.assert_allclose(scores, np.sort(ml.mmc_score(pool, counts))[::-1])
    assert picks.tolist() == [2, 1, 0]


# Two members on A-D of PROBA: they agree on A's and C's tags, split on one tag of B and on
# all three of D; B's split is near the boundary, D's sure-looking mean hides it.
MEMBERS = np.array([
    [[0.60, 0.99, 0.01], [0.80, 0.20, 0.60], [0.95, 0.05, 0.05], [0.90, 0.80, 0.70]],
    [[0.52, 0.98, 0.02], [0.60, 0.40, 0.45], [0.94, 0.04, 0.06], [0.40, 0.30, 0.20]],
])


def test_tag_vote_entropy_is_the_mean_binary_vote_entropy_over_tags():
    h = np.log(2)  # a tag on which the two members split
    np.testing.assert_allclose(ml.tag_vote_entropy(MEMBERS), [0.0, h / 3, 0.0, h])
    # three members, one of three says yes: the binary entropy of 1/3, on one tag of two
    three = np.array([[[0.9, 0.1]], [[0.1, 0.1]], [[0.2, 0.1]]])
    third = -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3))
    np.testing.assert_allclose(ml.tag_vote_entropy(three), [third / 2])
    # votes are cut at each tag's threshold: at 0.3 for tag 0 both members say yes to D's first tag
    np.testing.assert_allclose(ml.tag_vote_entropy(MEMBERS, [0.3, 0.5, 0.5])[[1, 3]], [h / 3, 2 * h / 3])
    # ties in vote entropy (A and C: 0) go to the less sure consensus
    scores = ml.committee_score(MEMBERS)
    assert scores[0] > scores[2] and scores[3] - ml.TIE_BREAK <= h <= scores[3]


@pytest.mark.parametrize(("members", "message"), [
    (MEMBERS[0], r"\(members, n_items, n_tags\)"),
    (MEMBERS[:0], "at least one member"),
    (MEMBERS * 2, "committee probabilities must hold per-tag probabilities"),
])
def test_tag_vote_entropy_rejects_bad_input_in_one_line(members, message):
    with pytest.raises(ValueError, match=message):
        ml.tag_vote_entropy(members)


def test_committee_picks_disagreement_among_the_most_uncertain_and_falls_back_to_mean_margin():
    asked = []

    def committee(rows):
        asked.append(np.asarray(rows).tolist())
        return MEMBERS[:, rows]

    pool = ml.TagPool(PROBA, committee=committee)
    picks, scores = ml.committee(candidates=2)(pool, 1, None)
    # the two most uncertain by mean margin are B and D; the members disagree more on D
    assert asked == [[1, 3]] and picks.tolist() == [3] and scores[0] >= np.log(2)
    picks, _ = ml.get_strategy("committee", candidates=1)(pool, 2, None)
    assert sorted(asked[-1]) == [1, 3] and picks.tolist() == [3, 1]
    picks, _ = ml.committee(candidates=4)(pool, 3, None)  # more candidates than items: every one
    assert sorted(asked[-1]) == [0, 1, 2, 3] and picks.tolist() == [3, 1, 0]
    # no committee (too few labels to bag one): mean margin's picks and scores
    for a, b in zip(ml.get_strategy("committee")(PROBA, 3, None), ml.mean_margin(PROBA, 3, None)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"pool.committee\(rows\) must give \(members, 2, 3\)"):
        ml.committee(candidates=1)(ml.TagPool(PROBA, committee=lambda rows: MEMBERS), 2, None)
    with pytest.raises(ValueError, match="candidates must be >= 1, got 0"):
        ml.committee(candidates=0)


def test_random_draws_distinct_items_with_nan_scores():
    picks, scores = ml.get_strategy("random")(ml.TagPool(np.full((30, 4), 0.5)), 10, np.random.default_rng(1))
    assert len(set(picks.tolist())) == 10 and np.isnan(scores).all()


@pytest.mark.parametrize(("pool", "message"), [
    (np.array([0.2, 0.8]), "n_items, n_tags"),
    (np.array([[0.2, 1.3]]), r"in \[0, 1\]"),
    (np.array([[0.2, np.nan]]), "without NaN"),
])
def test_tag_pool_rejects_bad_probabilities(pool, message):
    with pytest.raises(ValueError, match=message):
        ml.mean_margin(pool, 1, None)


def test_tag_pool_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match=r"thresholds must have shape \(3,\)"):
        ml.TagPool(PROBA, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ml.TagPool(PROBA, thresholds=[0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="give both or neither"):
        ml.TagPool(PROBA, labeled_tags=np.eye(3))
    with pytest.raises(ValueError, match="labeled_tags has 2 tag columns, expected 3"):
        ml.TagPool(PROBA, labeled_proba=np.zeros((2, 2)), labeled_tags=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="labeled_proba has 1 rows, expected 2"):
        ml.TagPool(PROBA, labeled_proba=np.zeros((1, 3)), labeled_tags=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ml.TagPool(PROBA, labeled_proba=np.zeros((1, 3)), labeled_tags=[[0, 2, 0]])
    with pytest.raises(ValueError, match="unknown multi-label strategy 'margin'"):
        ml.get_strategy("margin")


# -- composition with the single-label wrappers -----------------------------------------------
def test_a_plain_pool_becomes_a_tag_pool_with_its_fields():
    features = sparse.identity(4, format="csr")
    pool = ml.as_tag_pool(st.Pool(PROBA, features=lambda rows: features[rows], explore=np.array([0, 2])))
    assert isinstance(pool, ml.TagPool) and pool.explore.tolist() == [0, 2] and pool.features([1]).shape == (1, 4)


def test_with_exploration_composes():
    strategy = st.with_exploration(ml.mean_margin, 0.5)
    picks, scores = strategy(ml.TagPool(PROBA), 4, np.random.default_rng(0))
    assert picks[:2].tolist() == [1, 3] and not np.isnan(scores[:2]).any()
    assert np.isnan(scores[2:]).all() and sorted(picks.tolist()) == [0, 1, 2, 3]


def test_without_near_duplicates_composes():
    # B and D (the two most uncertain by mean margin) are the same text: D must give way to A
    features = sparse.csr_matrix(np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]]))
    pool = ml.TagPool(PROBA, features=lambda rows: features[rows])
    picks, _ = st.without_near_duplicates(ml.mean_margin, 0.95)(pool, 2, np.random.default_rng(0))
    assert picks.tolist() == [1, 0]
    # the configured composition, labeled items included, on every strategy
    labeled = np.array([[1, 0, 0], [1, 1, 0]])
    full = ml.TagPool(PROBA, features=lambda rows: features[rows], labeled_features=features[[1]],
                      labeled_proba=np.array([[0.9, 0.1, 0.1], [0.8, 0.7, 0.2]]), labeled_tags=labeled)
    for name in ml.NAMES:
        picks, scores = ml.get_strategy(name, exploration=0.5, near_duplicate=0.95)(full, 2, np.random.default_rng(3))
        assert 1 not in picks.tolist() and 3 not in picks.tolist(), name  # a labeled item's twin
        assert len(picks) == 2 == len(scores), name


# -- the model ------------------------------------------------------------------------------------
def test_best_f1_threshold_on_a_constructed_case():
    y = np.array([1, 1, 1, 0, 0, 0])
    # every positive below 0.5, every negative below them: the cut lies between 0.2 and 0.3
    assert mmodel.best_f1_threshold(y, [0.3, 0.35, 0.4, 0.1, 0.15, 0.2]) == pytest.approx(0.25)
    # one negative above the positives: F1 is best calling four, down to 0.3 (2*3 / (4 + 3) = 0.86)
    assert mmodel.best_f1_threshold(y, [0.3, 0.35, 0.4, 0.1, 0.15, 0.9]) == pytest.approx(0.225)
    # no positive: no F1 to maximise
    assert mmodel.best_f1_threshold(np.zeros(3), [0.1, 0.2, 0.3]) == 0.5
    thresholds = mmodel.choose_thresholds(np.array([[1, 0], [0, 0], [1, 0]]), np.array([[0.7, 0.2], [0.3, 0.1],
                                                                                      [0.6, 0.3]]))
    np.testing.assert_allclose(thresholds, [0.45, 0.5])
    with pytest.raises(ValueError, match="y_true has 2 rows, expected 3"):
        mmodel.choose_thresholds(np.zeros((2, 2)), np.zeros((3, 2)))


@pytest.fixture(scope="module")
def sample():
    frame = pd.read_csv(SAMPLE, keep_default_na=False)
    sets = [parse_tags(c) for c in frame["labels"]]
    tags = sorted(set().union(*sets))
    return frame["text"].tolist(), tag_matrix(sets, tags), tags


@pytest.fixture(scope="module")
def tagger(sample):
    docs, y, tags = sample
    return mmodel.fit_tagger(ModelSettings(), docs[:240], y[:240], tags, seed=0)


def test_tagger_thresholds_come_from_out_of_fold_predictions(sample, tagger):
    docs, y, tags = sample
    assert tagger.folds == 5 and tagger.oof_proba.shape == (240, len(tags))
    np.testing.assert_allclose(tagger.thresholds, mmodel.choose_thresholds(y[:240], tagger.oof_proba))
    assert not np.allclose(tagger.thresholds, 0.5)
    proba = tagger.predict_proba(docs[240:])
    assert proba.shape == (len(docs) - 240, len(tags))
    np.testing.assert_array_equal(tagger.predict(docs[240:]), (proba >= tagger.thresholds).astype(np.uint8))
    # learned, not guessed: well above predicting every tag everywhere (0.57; the model: 0.69)
    every_tag = mm.micro_f1(y[240:], np.ones_like(y[240:]))
    assert mm.micro_f1(y[240:], tagger.predict(docs[240:])) > every_tag + 0.08


def test_thresholds_on_chosen_rows_or_none(sample):
    docs, y, tags = sample
    on_rows = mmodel.fit_tagger(ModelSettings(), docs[:80], y[:80], tags, seed=0, threshold_rows=np.arange(40))
    # out-of-fold predictions of every row, thresholds read on the first 40 only
    assert on_rows.oof_proba.shape == (80, len(tags))
    np.testing.assert_allclose(on_rows.thresholds, mmodel.choose_thresholds(y[:40], on_rows.oof_proba[:40]))
    assert not np.allclose(on_rows.thresholds, mmodel.choose_thresholds(y[:80], on_rows.oof_proba))
    fixed = mmodel.fit_tagger(ModelSettings(), docs[:40], y[:40], tags, folds=0)
    assert fixed.folds == 0 and fixed.oof_proba is None and (fixed.thresholds == 0.5).all()


def test_the_committee_is_bagged_per_tag_set_seeded_and_fitted_once(sample):
    from alflow.tasks.query import COMMITTEE_SIZE, tag_committee

    docs, y, tags = sample
    settings = ModelSettings(classifier="sklearn.naive_bayes.ComplementNB", classifier_params={})  # fast
    y = y[:60].copy()
    y[:, 0] = 0
    y[7, 0] = 1  # one answer alone carries tag 0: a plain bootstrap would leave it out of most members
    features = mmodel.fit_tagger(settings, docs[:60], y, tags, folds=0).model[:-1]
    read = []

    def docs_of(rows):
        read.append(np.asarray(rows).tolist())
        return [docs[100 + i] for i in rows]

    members = tag_committee(settings, features, docs[:60], y, docs_of, np.random.default_rng(0))
    assert read == []  # nothing fitted nor read before a strategy asks
    proba = members(np.arange(8))
    assert proba.shape == (COMMITTEE_SIZE, 8, len(tags)) and read == [list(range(8))]
    assert np.ptp(proba, axis=0).max() > 0.01  # bootstrap samples differ, so do the members
    np.testing.assert_array_equal(members(np.arange(8)), proba)  # fitted once
    fitted = mmodel.fit_committee(settings, docs[:60], y, features, COMMITTEE_SIZE, np.random.default_rng(0))
    np.testing.assert_array_equal(fitted.predict_proba(docs[100:108]), proba)  # seeded: the same draws
    assert all(type(m.estimators_[0]).__name__ != "_ConstantPredictor" for m in fitted.members)  # all saw tag 0
    other = mmodel.fit_committee(settings, docs[:60], y, features, COMMITTEE_SIZE, np.random.default_rng(1))
    assert not np.array_equal(other.predict_proba(docs[100:108]), proba)
    assert tag_committee(settings, features, docs[:1], y[:1], docs_of, np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="at least 1 member, got size=0"):
        mmodel.fit_committee(settings, docs[:60], y, features, 0, np.random.default_rng(0))


def test_pool_fitted_features_read_the_pool(sample):
    docs, y, tags = sample
    settings = ModelSettings(vectorizer_fit="pool")
    pooled = mmodel.fit_tagger(settings, docs[:40], y[:40], tags, folds=2, pool_docs=docs[300:])
    vocabulary = pooled.model.named_steps["tfidf"].vocabulary_
    labeled_only = mmodel.fit_tagger(ModelSettings(), docs[:40], y[:40], tags, folds=0)
    assert len(vocabulary) > 2 * len(labeled_only.model.named_steps["tfidf"].vocabulary_)
    assert pooled.predict_proba(docs[40:45]).shape == (5, len(tags))


def test_fit_tagger_rejects_bad_input(sample):
    docs, y, tags = sample
    with pytest.raises(ValueError, match="y has 10 rows, expected 9"):
        mmodel.fit_tagger(ModelSettings(), docs[:9], y[:10], tags)
    with pytest.raises(ValueError, match="at least 2 tags"):
        mmodel.fit_tagger(ModelSettings(), docs[:9], y[:9, :1], tags[:1])
    with pytest.raises(ValueError, match="y has 4 tag columns, expected 3"):
        mmodel.fit_tagger(ModelSettings(), docs[:9], y[:9], tags[:3])
    with pytest.raises(ValueError, match=r"threshold_rows must be a 1-D array of row indices in \[0, 9\)"):
        mmodel.fit_tagger(ModelSettings(), docs[:9], y[:9], tags, folds=3, threshold_rows=[3, 9])


# -- metrics --------------------------------------------------------------------------------------
def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(5)
    y_true, y_pred = rng.integers(0, 2, (40, 4)), rng.integers(0, 2, (40, 4))
    got = mm.tag_metrics(y_true, y_pred)
    assert got == pytest.approx({
        "micro_f1": skm.f1_score(y_true, y_pred, average="micro"),
        "macro_f1": skm.f1_score(y_true, y_pred, average="macro"),
        "hamming_loss": skm.hamming_loss(y_true, y_pred),
        "subset_accuracy": skm.accuracy_score(y_true, y_pred),
    })
    assert mm.tag_metrics([[1, 0], [0, 1]], [[1, 0], [1, 1]]) == pytest.approx(
        {"micro_f1": 0.8, "macro_f1": (1 + 2 / 3) / 2, "hamming_loss": 0.25, "subset_accuracy": 0.5})
    with pytest.raises(ValueError, match="y_pred has 3 tag columns, expected 2"):
        mm.micro_f1([[1, 0]], [[1, 0, 0]])
    with pytest.raises(ValueError, match="y_true must hold only 0 and 1"):
        mm.hamming_loss([[0.5, 1]], [[1, 0]])


# -- agreement over tag sets --------------------------------------------------------------------
def test_masi_distance_known_values():
    assert agreement.masi_distance({"a", "b"}, {"b", "a"}) == 0.0
    assert agreement.masi_distance(set(), set()) == 0.0
    assert agreement.masi_distance({"a"}, {"a", "b"}) == pytest.approx(1 - 0.5 * 2 / 3)
    assert agreement.masi_distance({"a", "b"}, {"b", "c"}) == pytest.approx(1 - (1 / 3) * (1 / 3))
    assert agreement.masi_distance({"a"}, {"b"}) == 1.0
    assert agreement.masi_distance(set(), {"b"}) == 1.0


def test_alpha_over_sets_by_hand():
    # values {a} x3, {a,b} x1, {b} x2 (n = 6): D_o = 2/9, D_e = 56/90, alpha = 1 - 20/56
    data = [[{"a"}, {"a"}, {"b"}], [{"a"}, {"a", "b"}, {"b"}]]
    assert agreement.krippendorff_alpha_sets(data) == pytest.approx(9 / 14)
    assert agreement.krippendorff_alpha_sets([[{"a"}, {"b"}], [{"a"}, {"b"}]]) == 1.0
    assert math.isnan(agreement.krippendorff_alpha_sets([[{"a"}, None], [{"a"}, {"b"}]]))
    with pytest.raises(ValueError, match="answer of annotator 1 on item 0 must be a set of tags"):
        agreement.krippendorff_alpha_sets([[{"a"}], ["a"]])


def test_alpha_over_sets_matches_the_krippendorff_package():
    krippendorff = pytest.importorskip("krippendorff")
    rng = np.random.default_rng(11)
    tags = ["a", "b", "c"]
    truth = [frozenset(t for t in tags if rng.random() < 0.4) for _ in range(25)]
    data = []
    for _ in range(3):
        row = []
        for s in truth:
            if rng.random() < 0.15:
                row.append(None)
            elif rng.random() < 0.3:
                row.append(frozenset(t for t in tags if rng.random() < 0.5))
            else:
                row.append(s)
        data.append(row)
    domain = sorted({s for row in data for s in row if s is not None}, key=sorted)
    counts = np.array([[sum(row[j] == v for row in data) for v in domain] for j in range(25)])
    delta = np.array([[agreement.masi_distance(x, y) for y in domain] for x in domain])

    def masi(v1, v2, i1, i2, n_v, dtype=np.float64):
        return delta[i1, i2].astype(dtype)

    expected = krippendorff.alpha(value_counts=counts, level_of_measurement=masi)
    assert agreement.krippendorff_alpha_sets(data) == pytest.approx(expected)


def test_per_tag_kappa_matches_scikit_learn():
    a = [{"x"}, {"x", "y"}, set(), {"y"}, None, {"x"}]
    b = [{"x"}, {"y"}, {"x"}, {"y"}, {"x"}, set()]
    kappas = agreement.per_tag_kappa(a, b, ["x", "y", "z"])
    both = [0, 1, 2, 3, 5]  # item 4: a did not answer
    for tag in ("x", "y"):
        expected = skm.cohen_kappa_score([int(tag in a[i]) for i in both], [int(tag in b[i]) for i in both])
        assert kappas[tag] == pytest.approx(expected)
    assert math.isnan(kappas["z"])  # nobody ever gave it: nothing to agree about


# -- the data builder -----------------------------------------------------------------------------
def test_builder_invariants_and_the_shipped_sample(tmp_path):
    builder = _load_builder()
    out = tmp_path / "built.csv"
    builder.main([str(AG_NEWS_CSV), str(out)])
    # deterministic, and the shipped sample is exactly what it builds from the repo's AG News
    assert out.read_bytes() == SAMPLE.read_bytes()
    built = pd.read_csv(out, keep_default_na=False)
    articles = pd.read_csv(AG_NEWS_CSV)
    sets = [parse_tags(c) for c in built["labels"]]
    assert {len(s) for s in sets} == {1, 2, 3}
    assert all(format_tags(s) == c for s, c in zip(sets, built["labels"]))
    # each document is its articles' texts, its tags their classes, and no article is used twice
    texts, classes = articles["text"].str.strip().tolist(), articles["label"].tolist()
    used = []
    for text, tag_set in zip(built["text"], sets):
        inside = [i for i, article in enumerate(texts) if article in text]
        assert len(inside) == len(tag_set) and {classes[i] for i in inside} == tag_set
        used += inside
    assert len(used) == len(set(used))
    other = builder.build(articles, seed=1, rows=50)
    assert len(other) == 50 and not other["text"].equals(built["text"].head(50))
    with pytest.raises(ValueError, match="no 'labels' column"):
        builder.build(articles, label_col="labels")
