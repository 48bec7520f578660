"""Label checking: confident learning on the labeled set flags likely label errors.

After each retrain, every labeled item gets out-of-fold probabilities (stratified k-fold:
no item is scored by a model that saw its label) and ``cleanlab.filter.find_label_issues``
flags the items whose given label those probabilities doubt, ranked by self-confidence
(the out-of-fold probability of the given label: low is likely wrong). The flags are
stored with the model version; the next batch re-asks the top ones (``query.recheck_share``,
picked_by ``recheck``) with the model's suggestion as the pre-label. Nothing is changed
without a human answer: a recheck's answer is one more label row.

Multi-label (``task = "multi_label"``): the labeled items' out-of-fold per-tag
probabilities (:func:`alflow.tasks.multilabel.model.out_of_fold_proba`) go to cleanlab's
``multilabel_classification.filter.find_label_issues`` (one-vs-rest confident learning:
an item is flagged when any of its tags looks wrong), ranked and scored by
``multilabel_classification.get_label_quality_scores``; the suggestion is the given set
with each checked tag set as the out-of-fold probabilities decide.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from alflow.config import SKIP, ModelSettings, Settings
from alflow.tasks.store import RECHECK, Store

# Fewer labels of a class than this and the check is skipped: out-of-fold probabilities
# from folds of one or two examples of a class are noise, and so would be the flags.
MIN_PER_CLASS = 3
# Fewer labeled items than this and the multi-label check is skipped. cleanlab's multi-label
# filter flags about half of the items on out-of-fold TF-IDF probabilities; what matters is
# the top of its ranking (what a batch rechecks). On the bundled news sample with 5% of the
# tags flipped (4 draws each), the top 10% of the ranking held 6% wrong sets at 40 labels
# (15% of all were wrong: worse than re-asking at random), 35% at 100 and 36% at 200
# (17-19%: ~2x random).
MIN_TAG_CHECK_LABELS = 100


def out_of_fold_proba(model_settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
                      classes: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """(n, len(classes)) probabilities of each labeled doc from a model fitted on the other
    folds (stratified ``folds``-fold, fewer when the smallest class is smaller; columns in
    ``classes`` order)."""
    from sklearn.model_selection import StratifiedKFold

    from alflow.tasks import modeling

    labels = np.asarray(labels, dtype=object)
    smallest = min(int((labels == c).sum()) for c in classes)
    splitter = StratifiedKFold(n_splits=max(2, min(folds, smallest)), shuffle=True, random_state=seed)
    proba = modeling.out_of_fold(model_settings, list(docs), labels.tolist(), splitter, seed, method="predict_proba")
    columns = sorted(set(labels.tolist()))  # cross_val_predict's column order
    return proba[:, [columns.index(c) for c in classes]]


def find_label_errors(labels: Sequence[str], proba: np.ndarray,
                      classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confident learning over out-of-sample ``proba`` (n, c) of ``labels`` (n class names).

    Returns (indices of likely label errors, most likely first; their self-confidence
    scores in [0, 1]; the suggested class of each: the most probable one).
    """
    from cleanlab.filter import find_label_issues

    index = {c: i for i, c in enumerate(classes)}
    given = np.asarray([index[label] for label in labels])
    proba = np.clip(proba, 1e-9, None)
    proba = proba / proba.sum(axis=1, keepdims=True)
    # "confident_learning" (off-diagonals of the confident joint): on actively chosen items,
    # which sit near the boundary, it flagged with ~1.3x the precision of the default
    # pruning at a little less recall (`alflow simulate --noise 0.05` on SMS spam).
    flagged = np.asarray(find_label_issues(given, proba, filter_by="confident_learning",
                                           return_indices_ranked_by="self_confidence"), dtype=int)
    scores = proba[flagged, given[flagged]] if len(flagged) else np.empty(0)
    suggested = np.asarray(classes, dtype=object)[proba[flagged].argmax(axis=1)] if len(flagged) else np.empty(0, object)
    return flagged, scores, suggested


def find_tag_errors(y, proba) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning over out-of-sample per-tag ``proba`` (n, t) of the given tag
    matrix ``y`` (n, t), by cleanlab's multi-label ``find_label_issues``.

    Returns (indices of items with a likely wrong tag, least label quality first; their
    label quality scores in [0, 1], cleanlab's ``get_label_quality_scores``: low is likely
    wrong)."""
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues

    from alflow.tasks.multilabel.tags import check_tag_matrix, check_tag_proba

    proba = check_tag_proba(proba)
    y = check_tag_matrix(y, "y", n_tags=proba.shape[1], n_items=proba.shape[0])
    given = [np.flatnonzero(row).tolist() for row in y]
    # the same filter as single-label (see find_label_errors), per tag, one-vs-rest
    flagged = np.asarray(find_label_issues(given, proba, filter_by="confident_learning",
                                           return_indices_ranked_by="self_confidence"), dtype=int)
    scores = get_label_quality_scores(given, proba)[flagged] if len(flagged) else np.empty(0)
    return flagged, np.asarray(scores, dtype=float)


def check_tag_labels(store: Store, settings: Settings, model_version: int,
                     min_labels: int = MIN_TAG_CHECK_LABELS) -> int:
    """:func:`check_labels` for task = "multi_label": tags with fewer than MIN_PER_CLASS
    items carrying (or lacking) them are not checked; none left, or fewer than
    ``min_labels`` labeled items (:data:`MIN_TAG_CHECK_LABELS`): no flags."""
    from alflow.tasks.multilabel.model import DEFAULT_THRESHOLD, apply_thresholds, choose_thresholds
    from alflow.tasks.multilabel.model import out_of_fold_proba as tag_oof
    from alflow.tasks.multilabel.tags import format_tags, parse_tags, tag_matrix, tag_sets

    tags = list(settings.labels)
    frame, _ = store.training_set(settings.holdout_fraction, settings.query.control_trains)
    frame = frame[frame["label"] != SKIP].reset_index(drop=True)
    y = tag_matrix([parse_tags(v) for v in frame["label"]], tags) if len(frame) else np.zeros((0, len(tags)))
    counts = y.sum(axis=0)
    checked = np.flatnonzero((counts >= MIN_PER_CLASS) & (len(frame) - counts >= MIN_PER_CLASS))
    if len(frame) < max(min_labels, 2 * MIN_PER_CLASS) or not len(checked):
        return store.record_label_flags(model_version, pd.DataFrame())
    proba = tag_oof(settings.model, frame["doc"].tolist(), y[:, checked], settings.evaluation.cv_folds,
                    settings.seed)
    idx, scores = find_tag_errors(y[:, checked], proba)
    thresholds = (choose_thresholds(y[:, checked], proba) if settings.model.tag_thresholds == "out_of_fold"
                  else np.full(len(checked), DEFAULT_THRESHOLD))
    suggested = y.copy()
    suggested[:, checked] = apply_thresholds(proba, thresholds)
    return _record_flags(store, model_version, frame, idx, [format_tags(s) for s in tag_sets(suggested[idx], tags)],
                         scores)


def _record_flags(store: Store, model_version: int, frame: pd.DataFrame, idx, suggested, scores) -> int:
    """Store the flags on rows ``idx`` of ``frame`` (item_id, label), most likely error
    first, with their ``suggested`` labels and ``scores``; returns how many."""
    label_ids = store.query_df("SELECT item_id, label_id FROM effective_labels")
    label_id = dict(zip(label_ids["item_id"], label_ids["label_id"]))
    flags = pd.DataFrame({
        "item_id": frame["item_id"].to_numpy()[idx],
        "label_id": [int(label_id[i]) for i in frame["item_id"].to_numpy()[idx]],
        "given_label": frame["label"].to_numpy()[idx],
        "suggested_label": suggested,
        "score": np.asarray(scores, dtype=float),
        "rank": np.arange(1, len(idx) + 1),
    })
    return store.record_label_flags(model_version, flags)


def check_labels(store: Store, settings: Settings, model_version: int) -> int:
    """Flag likely label errors among the effective labels and store them with
    ``model_version``; returns the number of flags (0 when too few labels per class).
    With task = "multi_label": :func:`check_tag_labels`."""
    if settings.task == "multi_label":
        return check_tag_labels(store, settings, model_version)
    holdout = settings.holdout_fraction
    frame, _ = store.training_set(holdout, settings.query.control_trains)
    frame = frame[frame["label"].isin(settings.labels)].reset_index(drop=True)
    # the embedding endpoint down: a label whose item has no vector is checked once it has one
    from alflow.tasks.embeddings import with_vectors

    frame = frame[with_vectors(store, settings, frame["doc"].tolist(), "labeled items",
                               "the label check")].reset_index(drop=True)
    classes = [c for c in settings.labels if (frame["label"] == c).sum() >= MIN_PER_CLASS]
    frame = frame[frame["label"].isin(classes)].reset_index(drop=True)
    if len(classes) < 2:
        return store.record_label_flags(model_version, pd.DataFrame())
    proba = out_of_fold_proba(settings.model, frame["doc"].tolist(), frame["label"].tolist(), classes,
                              settings.evaluation.cv_folds, settings.seed)
    idx, scores, suggested = find_label_errors(frame["label"].tolist(), proba, classes)
    return _record_flags(store, model_version, frame, idx, suggested, scores)


def recheck_picks(store: Store, n: int) -> pd.DataFrame:
    """Up to ``n`` open flags as batch picks (item_id, score, prelabel = the model's
    suggestion, confidence NaN, picked_by ``recheck``; ``score`` is the self-confidence of
    the given label), most likely wrong first."""
    flags = store.open_label_flags(n) if n > 0 else pd.DataFrame()
    if flags.empty:
        return pd.DataFrame(columns=["item_id", "score", "prelabel", "confidence", "picked_by"])
    return pd.DataFrame({
        "item_id": flags["item_id"],
        "score": flags["score"].astype(float),
        "prelabel": flags["suggested_label"],
        "confidence": np.nan,
        "picked_by": RECHECK,
    })
