"""Label checking: confident learning on the labeled set flags likely label errors.

After each retrain, every labeled item gets out-of-fold probabilities (stratified k-fold:
no item is scored by a model that saw its label) and ``cleanlab.filter.find_label_issues``
flags the items whose given label those probabilities doubt, ranked by self-confidence
(the out-of-fold probability of the given label: low is likely wrong). The flags are
stored with the model version; the next batch re-asks the top ones (``query.recheck_share``,
picked_by ``recheck``) with the model's suggestion as the pre-label. Nothing is changed
without a human answer: a recheck's answer is one more label row.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from alflow.config import ModelSettings, Settings
from alflow.tasks.store import RECHECK, Store

# Fewer labels of a class than this and the check is skipped: out-of-fold probabilities
# from folds of one or two examples of a class are noise, and so would be the flags.
MIN_PER_CLASS = 3


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


def check_labels(store: Store, settings: Settings, model_version: int) -> int:
    """Flag likely label errors among the effective labels and store them with
    ``model_version``; returns the number of flags (0 when too few labels per class)."""
    holdout = settings.holdout_fraction
    frame, _ = store.training_set(holdout, settings.query.control_trains)
    frame = frame[frame["label"].isin(settings.labels)].reset_index(drop=True)
    classes = [c for c in settings.labels if (frame["label"] == c).sum() >= MIN_PER_CLASS]
    frame = frame[frame["label"].isin(classes)].reset_index(drop=True)
    if len(classes) < 2:
        return store.record_label_flags(model_version, pd.DataFrame())
    proba = out_of_fold_proba(settings.model, frame["doc"].tolist(), frame["label"].tolist(), classes,
                              settings.evaluation.cv_folds, settings.seed)
    idx, scores, suggested = find_label_errors(frame["label"].tolist(), proba, classes)
    label_ids = store.query_df("SELECT item_id, label_id FROM effective_labels")
    label_id = dict(zip(label_ids["item_id"], label_ids["label_id"]))
    flags = pd.DataFrame({
        "item_id": frame["item_id"].to_numpy()[idx],
        "label_id": [int(label_id[i]) for i in frame["item_id"].to_numpy()[idx]],
        "given_label": frame["label"].to_numpy()[idx],
        "suggested_label": suggested,
        "score": scores.astype(float),
        "rank": np.arange(1, len(idx) + 1),
    })
    return store.record_label_flags(model_version, flags)


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
