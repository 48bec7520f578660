"""The multi-label model: one-vs-rest with the configured classifier, per-tag thresholds.

The features are the configured ones (:func:`alflow.tasks.modeling.build_model`'s TF-IDF,
fitted as ``vectorizer_fit`` says); on top, one copy of the configured classifier per tag
(scikit-learn's ``OneVsRestClassifier``) gives per-tag probabilities. A tag is predicted
where its probability reaches the tag's threshold, chosen to maximise that tag's F1 on
out-of-fold predictions of the labeled items (:func:`choose_thresholds`): with few
positives of a tag, or class weights, 0.5 is rarely the best cut.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from sklearn.model_selection import KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline

from alflow.config import ModelSettings
from alflow.tasks import modeling
from alflow.tasks.multilabel.strategies import DEFAULT_THRESHOLD
from alflow.tasks.multilabel.tags import check_tag_matrix, check_tag_proba, check_tags

FOLDS = 5


@dataclass
class Tagger:
    """A fitted multi-label model: ``model`` (a Pipeline: features, then a
    ``OneVsRestClassifier``), the ``tags`` its columns stand for and ``thresholds``
    (n_tags,). ``folds``: how many out-of-fold splits the thresholds were chosen on (0:
    none; every threshold is :data:`DEFAULT_THRESHOLD`); ``oof_proba`` (n_labeled,
    n_tags): those out-of-fold probabilities (None without folds)."""

    model: Pipeline
    tags: tuple[str, ...]
    thresholds: np.ndarray
    folds: int = 0
    oof_proba: np.ndarray | None = field(default=None, repr=False)

    def predict_proba(self, docs: Sequence[str]) -> np.ndarray:
        """(n_docs, n_tags) per-tag probabilities, columns in the order of ``tags``."""
        return tag_proba(self.model, docs)

    def predict(self, docs: Sequence[str]) -> np.ndarray:
        """(n_docs, n_tags) 0/1 tag matrix: the tags whose probability reaches their threshold."""
        return apply_thresholds(self.predict_proba(docs), self.thresholds)


def one_vs_rest(settings: ModelSettings) -> OneVsRestClassifier:
    """An unfitted ``OneVsRestClassifier`` of the configured classifier (one copy per tag)."""
    return OneVsRestClassifier(modeling.build_model(settings).steps[-1][1])


def tag_proba(model, docs_or_rows) -> np.ndarray:
    """(n, n_tags) per-tag probabilities of a fitted one-vs-rest ``model`` (or a Pipeline
    ending in one). A tag the training labels never (or always) carried is the constant
    probability one-vs-rest gives it."""
    proba = np.asarray(model.predict_proba(docs_or_rows), dtype=float)
    return np.clip(proba, 0.0, 1.0)


def apply_thresholds(proba, thresholds) -> np.ndarray:
    """(n, t) probabilities, (t,) thresholds -> (n, t) uint8: 1 where proba >= threshold."""
    proba = check_tag_proba(proba)
    thresholds = np.asarray(thresholds, dtype=float)
    if thresholds.shape != (proba.shape[1],):
        raise ValueError(f"thresholds must have shape ({proba.shape[1]},), one per tag, got {thresholds.shape}")
    return (proba >= thresholds).astype(np.uint8)


def best_f1_threshold(y_true: np.ndarray, proba: np.ndarray) -> float:
    """The cut that maximises one tag's F1: ``y_true`` (n,) 0/1, ``proba`` (n,) its
    probabilities. Every cut between two consecutive distinct probabilities is tried; the
    threshold returned is the midpoint of the cut (half the smallest value when every item
    is called positive), so items near but not at a value seen get the same decision. Ties
    in F1 go to the threshold nearest :data:`DEFAULT_THRESHOLD`. Without a positive and a
    negative there is no F1 to maximise: :data:`DEFAULT_THRESHOLD`.
    """
    y_true = np.asarray(y_true).astype(bool)
    proba = np.asarray(proba, dtype=float)
    positives = int(y_true.sum())
    if positives == 0 or positives == y_true.size:
        return DEFAULT_THRESHOLD
    values, inverse = np.unique(-proba, return_inverse=True)  # decreasing probabilities
    values = -values
    tp = np.cumsum(np.bincount(inverse, weights=y_true, minlength=values.size))
    called = np.cumsum(np.bincount(inverse, minlength=values.size))
    f1 = 2.0 * tp / (called + positives)  # 2tp / (2tp + fp + fn), fp + fn + 2tp = called + positives
    below = np.append(values[1:], 0.0)
    cuts = (values + below) / 2.0
    best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0.0, atol=1e-12))
    return float(cuts[best[np.argmin(np.abs(cuts[best] - DEFAULT_THRESHOLD))]])


def choose_thresholds(y_true, proba) -> np.ndarray:
    """(n, t) tag matrix and (n, t) out-of-fold probabilities -> (t,) thresholds, each tag's
    :func:`best_f1_threshold`."""
    proba = check_tag_proba(proba, "proba")
    y_true = check_tag_matrix(y_true, "y_true", n_tags=proba.shape[1], n_items=proba.shape[0])
    return np.array([best_f1_threshold(y_true[:, j], proba[:, j]) for j in range(proba.shape[1])])


def _features(settings: ModelSettings, docs: list[str], pool_docs: Sequence[str] | None,
              corpus: modeling.Corpus | None) -> Pipeline:
    """The configured feature steps fitted as ``settings.vectorizer_fit`` says (the labeled
    docs, or the pool sample plus them), as :func:`alflow.tasks.modeling.fit` fits them."""
    if settings.vectorizer_fit == "labeled":
        return modeling.labeled_features(settings, docs, corpus)
    return modeling.fit_features(settings, list(pool_docs or []) + docs)


def _fitted_one_vs_rest(settings: ModelSettings, x, y: np.ndarray) -> OneVsRestClassifier:
    clf = one_vs_rest(settings)
    with warnings.catch_warnings():
        # a tag every (or no) training item carries: one-vs-rest predicts it constantly, as wanted
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        warnings.filterwarnings("ignore", message="Label not .* is present in all training examples")
        return clf.fit(x, y)


def _fit_one_vs_rest(settings: ModelSettings, features: Pipeline, docs: list[str], y: np.ndarray) -> Pipeline:
    clf = _fitted_one_vs_rest(settings, features.transform(docs), y)
    return Pipeline(list(features.steps) + [("clf", clf)])


def out_of_fold_proba(settings: ModelSettings, docs: Sequence[str], y, folds: int = FOLDS, seed: int = 0,
                      pool_docs: Sequence[str] | None = None, corpus: modeling.Corpus | None = None) -> np.ndarray:
    """(n, t) out-of-fold per-tag probabilities of the labeled ``docs`` (n,) with tag matrix
    ``y`` (n, t): shuffled k-fold (``seed``), each fold's model, features included, fitted
    without that fold. ``folds`` is capped at n; it must leave at least 2."""
    docs = list(docs)
    y = check_tag_matrix(y, "y", n_items=len(docs))
    k = min(int(folds), len(docs))
    if k < 2:
        raise ValueError(f"out-of-fold predictions need at least 2 labeled items and folds >= 2, got {len(docs)} "
                         f"items and folds={folds}")
    out = np.zeros(y.shape)
    docs_array = np.asarray(docs, dtype=object)
    for train, test in KFold(n_splits=k, shuffle=True, random_state=seed).split(docs_array):
        fold_docs = docs_array[train].tolist()
        model = _fit_one_vs_rest(settings, _features(settings, fold_docs, pool_docs, corpus), fold_docs, y[train])
        out[test] = tag_proba(model, docs_array[test].tolist())
    return out


def fit_tagger(settings: ModelSettings, docs: Sequence[str], y, tags: Sequence[str], *, folds: int = FOLDS,
               seed: int = 0, threshold_rows=None, pool_docs: Sequence[str] | None = None,
               corpus: modeling.Corpus | None = None) -> Tagger:
    """The multi-label model of the labeled ``docs`` (n,) and their tag matrix ``y`` (n, t),
    columns named by ``tags`` (t,).

    Thresholds come from :func:`out_of_fold_proba` with ``folds`` folds (at most one per
    item; ``folds`` < 2 or a single item: none, and every threshold is 0.5), read on the rows
    ``threshold_rows`` (indices into ``docs``; None: all). Why a choice: the items a
    strategy picked are not a sample of the pool (they sit near the boundaries), so the cut
    that maximises F1 on them need not on the pool; the rows drawn at random (cold start,
    exploration, control) are a sample, but few (benchmarks/results/multilabel.md measures
    both). ``pool_docs``: the unlabeled sample ``vectorizer_fit = "pool"`` fits the
    features on; ``corpus``: pre-tokenized docs (:class:`alflow.tasks.modeling.Corpus`) for
    ``vectorizer_fit = "labeled"``, the same features without tokenizing again.
    """
    docs = list(docs)
    tags = check_tags(tags)
    if len(tags) < 2:
        raise ValueError(f"a multi-label model needs at least 2 tags, got {list(tags)}")
    if not docs:
        raise ValueError("fit_tagger needs at least one labeled item")
    if any(not isinstance(d, str) for d in docs):
        raise ValueError("docs must be texts (str)")
    y = check_tag_matrix(y, "y", n_tags=len(tags), n_items=len(docs))
    rows = np.arange(len(docs)) if threshold_rows is None else _rows(threshold_rows, len(docs))
    model = _fit_one_vs_rest(settings, _features(settings, docs, pool_docs, corpus), docs, y)
    k = min(int(folds), len(docs))
    if k < 2:
        return Tagger(model, tags, np.full(len(tags), DEFAULT_THRESHOLD), folds=0)
    oof = out_of_fold_proba(settings, docs, y, k, seed, pool_docs, corpus)
    return Tagger(model, tags, choose_thresholds(y[rows], oof[rows]), folds=k, oof_proba=oof)


def _rows(rows, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.size == 0:  # no row to read: every tag keeps the default threshold
        return rows.astype(np.int64).ravel()
    if rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and (rows.min() < 0 or rows.max() >= n)):
        raise ValueError(f"threshold_rows must be a 1-D array of row indices in [0, {n})")
    return rows


# -- a fitted tagger as one file: the pipeline, its thresholds on its last step --------------
THRESHOLDS_ATTRIBUTE = "tag_thresholds_"
TAGS_ATTRIBUTE = "tag_names_"


def tagger_pipeline(tagger: Tagger) -> Pipeline:
    """The Pipeline of ``tagger`` with its (n_tags,) thresholds kept on its one-vs-rest step
    (attribute :data:`THRESHOLDS_ATTRIBUTE`), so the saved model file carries them and
    :func:`model_thresholds` reads them back from the loaded model."""
    clf = tagger.model.steps[-1][1]
    setattr(clf, THRESHOLDS_ATTRIBUTE, np.asarray(tagger.thresholds, dtype=float))
    setattr(clf, TAGS_ATTRIBUTE, list(tagger.tags))
    return tagger.model


def is_tag_model(model) -> bool:
    """True if ``model`` is a multi-label model (a Pipeline ending in a one-vs-rest step
    that carries per-tag thresholds, :func:`tagger_pipeline`)."""
    steps = getattr(model, "steps", None)
    return bool(steps) and hasattr(steps[-1][1], THRESHOLDS_ATTRIBUTE)


def model_thresholds(model) -> np.ndarray:
    """(n_tags,) per-tag thresholds of a loaded multi-label model, in ``settings.labels`` order."""
    if not is_tag_model(model):
        raise ValueError(f"{type(model).__name__} is not a multi-label model: it has no per-tag thresholds")
    return np.asarray(getattr(model.steps[-1][1], THRESHOLDS_ATTRIBUTE), dtype=float)


def model_tags(model) -> list[str]:
    """The tags a loaded multi-label model's columns stand for (``settings.labels`` when trained)."""
    model_thresholds(model)  # the same check: a multi-label model
    return list(getattr(model.steps[-1][1], TAGS_ATTRIBUTE))


def set_confidence(proba, predicted) -> np.ndarray:
    """(n,) the model's probability of each item's whole predicted tag set, tags taken as
    independent: prod_j (p_j if tag j is in the set else 1 - p_j). ``proba`` (n, t),
    ``predicted`` (n, t) 0/1."""
    proba = check_tag_proba(proba)
    predicted = check_tag_matrix(predicted, "predicted", n_tags=proba.shape[1], n_items=proba.shape[0])
    return np.where(predicted == 1, proba, 1.0 - proba).prod(axis=1)


def score_tags(model, docs: Sequence[str], tags: Sequence[str]) -> dict[str, np.ndarray]:
    """Pre-labels of a multi-label ``model`` for a chunk, in the shape of
    :func:`alflow.tasks.modeling.score_chunk`: ``label`` (n,) the predicted sets' text forms,
    ``proba`` (n, t) per-tag probabilities in ``tags`` order, and the multi-label analogues
    of the uncertainty columns: ``least_confidence`` = 1 - :func:`set_confidence`;
    ``margin`` = the smallest |signed margin| over tags (0: a tag at its threshold; small =
    uncertain, as a single-label margin); ``entropy`` = the mean over tags of each tag's
    binary entropy, in nats."""
    from alflow.tasks.multilabel.strategies import signed_margin
    from alflow.tasks.multilabel.tags import format_tags, tag_sets

    thresholds = model_thresholds(model)
    proba = tag_proba(model, list(docs))
    predicted = apply_thresholds(proba, thresholds)
    clipped = np.clip(proba, 1e-12, 1 - 1e-12)
    entropy = -(clipped * np.log(clipped) + (1 - clipped) * np.log(1 - clipped)).mean(axis=1)
    return {
        "label": np.asarray([format_tags(s) for s in tag_sets(predicted, tags)], dtype=object),
        "proba": proba,
        "least_confidence": 1.0 - set_confidence(proba, predicted),
        "margin": np.abs(signed_margin(proba, thresholds)).min(axis=1),
        "entropy": entropy,
    }


def predict_tags(model, docs: Sequence[str], tags: Sequence[str]) -> list[str]:
    """(n,) text forms of the tag sets a multi-label ``model`` predicts for ``docs``."""
    from alflow.tasks.multilabel.tags import format_tags, tag_sets

    predicted = apply_thresholds(tag_proba(model, list(docs)), model_thresholds(model))
    return [format_tags(s) for s in tag_sets(predicted, tags)]


# -- the committee of the ``committee`` strategy -------------------------------------------------
@dataclass
class Committee:
    """Bagged one-vs-rest members over shared, already fitted ``features`` (a Pipeline of
    the feature steps); ``members``: the fitted one-vs-rest classifiers."""

    features: Pipeline
    members: list[OneVsRestClassifier]

    def predict_proba(self, docs: Sequence[str]) -> np.ndarray:
        """(m, n_docs, n_tags) each member's per-tag probabilities; the docs are turned into
        features once for all members."""
        x = self.features.transform(list(docs))
        return np.stack([tag_proba(member, x) for member in self.members])


def fit_committee(settings: ModelSettings, docs: Sequence[str], y, features: Pipeline, size: int,
                  rng: np.random.Generator) -> Committee:
    """``size`` one-vs-rest models of the configured classifier, each fitted on a bootstrap
    sample of the labeled ``docs`` (n,) / tag matrix ``y`` (n, t), drawn per tag set (every
    set the answers carry keeps its count), so every member sees every tag and tag set that
    has answers, as the single-label committee draws per class. ``features``: the current
    model's fitted feature steps (``model[:-1]``), shared by the members and not refitted."""
    docs = list(docs)
    if not docs:
        raise ValueError("fit_committee needs at least one labeled item")
    y = check_tag_matrix(y, "y", n_items=len(docs))
    if size < 1:
        raise ValueError(f"a committee needs at least 1 member, got size={size}")
    _, group = np.unique(y, axis=0, return_inverse=True)
    by_set = [np.flatnonzero(group.ravel() == g) for g in np.unique(group)]
    x = features.transform(docs)
    members = []
    for _ in range(size):
        rows = np.concatenate([rng.choice(idx, size=idx.size, replace=True) for idx in by_set])
        members.append(_fitted_one_vs_rest(settings, x[rows], y[rows]))
    return Committee(features, members)


# -- self-training: the single-label design (alflow.tasks.modeling.confident_picks) over tag sets --
SELF_TRAINING_SHARE = 1.0  # pseudo-labels per human label, as single-label self-training's "auto" share


def confident_set_picks(proba, thresholds, label_sets: Sequence[str], tags: Sequence[str],
                        share: float = SELF_TRAINING_SHARE) -> np.ndarray:
    """Self-training's pseudo-labels of a multi-label model: which pool rows to train on as
    predicted (their tag sets: ``apply_thresholds(proba, thresholds)`` of those rows).

    ``proba`` (n, t): the pool's per-tag probabilities; ``thresholds`` (t,); ``label_sets``
    (L,): the human answers' text forms. A row's prediction is its thresholded tag set,
    its confidence :func:`set_confidence` (the probability of that whole set); per tag set
    the human labels carry, the ``share`` x its count surest rows predicted as that set
    (:func:`alflow.tasks.modeling.confident_picks`). Why per set: the pseudo-labels mirror
    the human sets, so the common single-tag sets cannot drown the rarer combinations, and
    a set no human gave (say the empty one) is never invented. Returns rows (m,).
    """
    from alflow.tasks.multilabel.tags import format_tags, tag_sets

    predicted = apply_thresholds(proba, thresholds)
    names = np.asarray([format_tags(s) for s in tag_sets(predicted, tags)], dtype=object)
    return modeling.confident_picks(names, set_confidence(proba, predicted),
                                    modeling.class_counts(list(label_sets)), share)


def fit_self_trained_tagger(settings: ModelSettings, docs: Sequence[str], y, tags: Sequence[str],
                            pool_docs: Sequence[str], *, share: float = SELF_TRAINING_SHARE, seed: int = 0,
                            corpus: modeling.Corpus | None = None) -> Tagger:
    """The multi-label model of the labeled ``docs`` (n,) / ``y`` (n, t) plus pseudo-labels of
    the unlabeled ``pool_docs`` (benchmarks/results/multilabel.md: the multi-label default).

    A model of the human labels alone (thresholds 0.5: out-of-fold thresholds read on
    strategy picks hurt) predicts the pool; its surest sets (:func:`confident_set_picks`)
    join the human labels, features refitted on both with ``vectorizer_fit = "labeled"``
    as single-label self-training does, and the final model keeps thresholds 0.5. The
    pseudo-labels always come from the model of human labels only, so a mistake is not
    fed back cycle after cycle. No pool, or no confident pick: the plain model.
    """
    from alflow.tasks.multilabel.tags import format_tags, tag_sets

    docs, tags = list(docs), check_tags(tags)
    pool_docs = list(pool_docs)
    plain = fit_tagger(settings, docs, y, tags, folds=0, seed=seed, pool_docs=pool_docs, corpus=corpus)
    if not pool_docs or share <= 0:
        return plain
    y = check_tag_matrix(y, "y", n_tags=len(tags), n_items=len(docs))
    proba = plain.predict_proba(pool_docs)
    rows = confident_set_picks(proba, plain.thresholds, [format_tags(s) for s in tag_sets(y, tags)], tags, share)
    if rows.size == 0:
        return plain
    extra = [pool_docs[i] for i in rows]
    train_y = np.vstack([y, apply_thresholds(proba[rows], plain.thresholds)])
    model = _fit_one_vs_rest(settings, _features(settings, docs + extra, pool_docs, corpus), docs + extra, train_y)
    return Tagger(model, tags, np.full(len(tags), DEFAULT_THRESHOLD), folds=0)


def min_cardinality(y) -> int:
    """The fewest tags any labeled item carries, from its (n, t) tag matrix ``y``: 1 when no
    human ever answered "none of these tags apply", else 0."""
    y = check_tag_matrix(y, "y")
    return int(y.sum(axis=1).min()) if y.shape[0] else 0


def predict_with_minimum(proba, thresholds, minimum: int) -> np.ndarray:
    """(n, t) probabilities, (t,) thresholds -> (n, t) uint8 tag matrix: the tags at or above
    their threshold (:func:`apply_thresholds`), and where that is fewer than ``minimum``
    tags, the most probable ones up to ``minimum``. Why: a model of few labels leaves many
    items with no tag above 0.5, an answer (the empty set) no annotator of a data set whose
    every item has a tag would give; its most probable tag is the better guess."""
    predicted = apply_thresholds(proba, thresholds)
    minimum = int(minimum)
    if minimum <= 0:
        return predicted
    proba = check_tag_proba(proba)
    short = np.flatnonzero(predicted.sum(axis=1) < minimum)
    top = np.argsort(-proba[short], axis=1, kind="stable")[:, :minimum]
    predicted[short[:, None], top] = 1
    return predicted
