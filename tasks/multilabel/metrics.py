"""Multi-label metrics: scikit-learn's, over checked (n_items, n_tags) tag matrices.

* ``micro_f1``: F1 over every (item, tag) decision pooled; frequent tags weigh more;
* ``macro_f1``: the mean of the per-tag F1s (a tag never present nor predicted scores 0,
  scikit-learn's ``zero_division=0``);
* ``hamming_loss``: the share of (item, tag) decisions that are wrong, in [0, 1] (lower
  is better);
* ``subset_accuracy``: the share of items whose whole tag set is right.
"""

from __future__ import annotations

import numpy as np

from alflow.tasks.multilabel.tags import check_tag_matrix

METRICS = ("micro_f1", "macro_f1", "hamming_loss", "subset_accuracy")
# the ones where higher is better: a learning curve or a stopping rule may use these
HIGHER_IS_BETTER = ("micro_f1", "macro_f1", "subset_accuracy")


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = check_tag_matrix(y_true, "y_true")
    y_pred = check_tag_matrix(y_pred, "y_pred", n_tags=y_true.shape[1], n_items=y_true.shape[0])
    if y_true.shape[0] == 0:
        raise ValueError("y_true has no items: nothing to score")
    return y_true, y_pred


def micro_f1(y_true, y_pred) -> float:
    from sklearn.metrics import f1_score

    y_true, y_pred = _pair(y_true, y_pred)
    return float(f1_score(y_true, y_pred, average="micro", zero_division=0))


def macro_f1(y_true, y_pred) -> float:
    from sklearn.metrics import f1_score

    y_true, y_pred = _pair(y_true, y_pred)
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def per_tag_f1(y_true, y_pred) -> np.ndarray:
    """(n_tags,) F1 of each tag column."""
    from sklearn.metrics import f1_score

    y_true, y_pred = _pair(y_true, y_pred)
    return np.asarray(f1_score(y_true, y_pred, average=None, zero_division=0), dtype=float)


def hamming_loss(y_true, y_pred) -> float:
    from sklearn.metrics import hamming_loss as sk_hamming_loss

    y_true, y_pred = _pair(y_true, y_pred)
    return float(sk_hamming_loss(y_true, y_pred))


def subset_accuracy(y_true, y_pred) -> float:
    from sklearn.metrics import accuracy_score

    y_true, y_pred = _pair(y_true, y_pred)
    return float(accuracy_score(y_true, y_pred))


def tag_metrics(y_true, y_pred) -> dict[str, float]:
    """Every metric of :data:`METRICS` for ``y_pred`` against ``y_true``, both (n_items,
    n_tags) 0/1 with n_items >= 1."""
    return {name: globals()[name](y_true, y_pred) for name in METRICS}
