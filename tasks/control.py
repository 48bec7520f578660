"""The random control slice: an honest estimate of each model's quality on the pool.

Actively chosen items are the ones the model finds hardest, so cross-validation on them
(or accuracy on them) says little about the pool. Each batch therefore also carries a
control slice (``query.control_share`` of it, at least one item): items drawn uniformly
from the pool, in SQL, by a hash of (seed, batch number, item id), so a replayed query
draws the same ones. They are labeled like the rest (picked_by ``control``) but shown
**blind**: no pre-label, no model figure, in the form, the files and the terminal, so the
answer is the reviewer's own and not an echo of the model it is to judge.

What is estimated: the control answers form a growing random test set (``control_answers``:
each item once, by its first non-skip answer given in a batch that drew it as control and
did not expire). With ``query.control_trains = false`` (the default) no model trains on
them, so every model, the newest included, is scored on all of them (its predictions are
stored in ``control_predictions`` after it is trained). With ``control_trains = true`` they
also train later models, and a model is scored only on the control answers given after its
label watermark (the newest model then has none until the next batch is answered). The
figure comes with a 95% interval: Wilson's for accuracy, a seeded bootstrap for macro F1.

Multi-label (``task = "multi_label"``, :func:`tag_control_estimate`): the answers and
predictions are tag sets; the estimate is each tag's F1 and micro F1 (and the configured
``evaluation.metric``), each with a percentile bootstrap interval over control items (one
seeded set of resamples for all of them), and subset accuracy (the whole set right) with
Wilson's interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from alflow.config import Settings
from alflow.tasks.store import CONTROL, Store

PICK_COLUMNS = ["item_id", "score", "prelabel", "confidence", "picked_by"]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: (low, high) in [0, 1].

    ``successes`` of ``n`` trials; (nan, nan) when ``n`` is 0. Computed by scipy.
    """
    from scipy.stats import binomtest

    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..n, got {successes} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def bootstrap_interval(truth: np.ndarray, predicted: np.ndarray, metric, seed: int, confidence: float = 0.95,
                       resamples: int = 1000, batched: bool = False) -> tuple[float, float]:
    """A percentile bootstrap interval of ``metric(truth, predicted)`` over items: (low, high).

    ``truth`` / ``predicted``: arrays of n labels; ``metric``: a function of the two;
    resampled ``resamples`` times with a generator seeded by ``seed``. ``batched``:
    ``metric`` takes every resample at once, two (resamples, n) arrays, and returns
    (resamples,) values (see :func:`macro_f1_rows`); the draws are the same either way."""
    n = len(truth)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    if batched:
        values = np.asarray(metric(truth[draws], predicted[draws]), dtype=float)
    else:
        values = np.array([metric(truth[d], predicted[d]) for d in draws])
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def class_codes(values, classes) -> np.ndarray:
    """``values`` (n labels) as indices into ``classes``; a label not in them is
    ``len(classes)``, which no class counts (as scikit-learn's ``labels=`` does)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.fromiter((index.get(v, len(index)) for v in values), dtype=np.int64, count=len(values))


def macro_f1_rows(n_classes: int):
    """Macro F1 over ``n_classes`` of many label sets at once, for :func:`bootstrap_interval`
    (``batched=True``): ``metric(truth, predicted)`` with (r, n) arrays of
    :func:`class_codes` returns (r,) values, each what ``f1_score(t, p, labels=classes,
    average="macro", zero_division=0)`` gives for that row, from per-class counts
    (F1 = 2 tp / (answers + predictions) of the class, 0 when both are 0). A thousand
    resamples cost milliseconds instead of a thousand scikit-learn calls (~4 s a cycle)."""
    width = n_classes + 1  # the last bin: labels outside the classes, never counted

    def metric(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        r = truth.shape[0]
        row = np.broadcast_to(np.arange(r)[:, None] * width, truth.shape)

        def per_class(codes: np.ndarray) -> np.ndarray:  # (r, n_classes) counts
            return np.bincount(codes.ravel(), minlength=r * width).reshape(r, width)[:, :n_classes]

        hit = truth == predicted
        tp = per_class((truth + row)[hit])
        both = per_class(truth + row) + per_class(predicted + row)
        f1 = np.divide(2.0 * tp, both, out=np.zeros(both.shape), where=both > 0)
        return f1.mean(axis=1)

    return metric


def tag_counts_rows(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-tag true positives, false positives and false negatives of (r, n, t) 0/1 tag
    matrices (r resamples of n items): three (r, t) arrays."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    return ((truth & predicted).sum(axis=1), (~truth & predicted).sum(axis=1),
            (truth & ~predicted).sum(axis=1))


def _f1(tp, fp, fn) -> np.ndarray:
    """2 tp / (2 tp + fp + fn), 0 where nothing was there nor predicted (scikit-learn's
    ``zero_division=0``)."""
    both = 2.0 * tp + fp + fn
    return np.divide(2.0 * tp, both, out=np.zeros(np.shape(both)), where=both > 0)


def tag_metric_rows(metric: str, tag: int | None = None):
    """A multi-label figure of many resamples at once, for :func:`bootstrap_interval`
    (``batched=True``): ``metric(truth, predicted)`` with (r, n, t) 0/1 arrays returns (r,)
    values of ``metric`` (micro_f1, macro_f1, hamming_loss, subset_accuracy, as
    :mod:`alflow.tasks.multilabel.metrics` computes them) or, with ``tag`` (a column
    index), that tag's F1."""
    def rows(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        if metric == "subset_accuracy":
            return (truth == predicted).all(axis=2).mean(axis=1)
        if metric == "hamming_loss":
            return (truth != predicted).mean(axis=(1, 2))
        tp, fp, fn = tag_counts_rows(truth, predicted)
        if tag is not None:
            return _f1(tp[:, tag], fp[:, tag], fn[:, tag])
        if metric == "micro_f1":
            return _f1(tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1))
        if metric == "macro_f1":
            return _f1(tp, fp, fn).mean(axis=1)
        raise ValueError(f"unknown multi-label metric {metric!r}")

    return rows


def _interval_figure(truth: np.ndarray, predicted: np.ndarray, metric, seed: int, confidence: float) -> dict:
    value = float(metric(truth[None], predicted[None])[0])
    low, high = bootstrap_interval(truth, predicted, metric, seed, confidence, batched=True)
    return {"value": value, "low": low, "high": high}


def tag_control_estimate(store: Store, model_version: int | None, tags: list[str], metric: str = "micro_f1",
                         seed: int = 0, confidence: float = 0.95) -> dict:
    """:func:`control_estimate` of a multi-label model: the control answers and predictions
    are tag sets' text forms. Returns its keys (``correct``/``accuracy``/``low``/``high``:
    whole sets right, subset accuracy with its Wilson interval; ``value`` with
    ``value_low``/``value_high``: ``metric``), plus ``micro_f1`` ``{value, low, high}`` and
    ``tags`` ``{tag: {f1, low, high, answers}}`` (``answers``: control answers carrying the
    tag). Every interval is a percentile bootstrap over control items from the same
    resamples (seeded by ``seed``). ``note`` names the tags no control answer carries yet
    (their F1 is 0 or undefined, not an estimate)."""
    from alflow.tasks.multilabel.tags import parse_tags, tag_matrix

    estimate = control_estimate(store, model_version, "accuracy", seed=seed, confidence=confidence)
    estimate.update(task="multi_label", micro_f1=None, tags={})
    if not estimate["n"]:
        estimate.update(metric=metric, value=None, value_low=None, value_high=None)
        return estimate
    outcomes = store.control_outcomes(model_version)
    truth = tag_matrix([parse_tags(v) for v in outcomes["label"]], tags)
    predicted = tag_matrix([parse_tags(v) for v in outcomes["predicted"]], tags)
    micro = _interval_figure(truth, predicted, tag_metric_rows("micro_f1"), seed, confidence)
    per_tag = {}
    for j, tag in enumerate(tags):
        figure = _interval_figure(truth, predicted, tag_metric_rows("f1", tag=j), seed, confidence)
        per_tag[tag] = {"f1": figure["value"], "low": figure["low"], "high": figure["high"],
                        "answers": int(truth[:, j].sum())}
    estimate.update(micro_f1=micro, tags=per_tag, metric=metric)
    if metric == "subset_accuracy":
        chosen = {"value": estimate["accuracy"], "low": estimate["low"], "high": estimate["high"]}
    elif metric == "micro_f1":
        chosen = micro
    else:
        chosen = _interval_figure(truth, predicted, tag_metric_rows(metric), seed, confidence)
    estimate.update(value=chosen["value"], value_low=chosen["low"], value_high=chosen["high"])
    absent = [t for t in tags if not per_tag[t]["answers"]]
    if absent:
        estimate["note"] = f"no control answer carries {', '.join(absent)} yet"
    return estimate


def control_size(share: float, k: int) -> int:
    """Control items in a batch of ``k``: ``share`` of it rounded, at least one (none when
    ``share`` is 0), never more than ``k``."""
    if share <= 0 or k <= 0:
        return 0
    return min(k, max(1, round(share * k)))


def control_picks(store: Store, settings: Settings, n: int) -> pd.DataFrame:
    """``n`` pool items drawn uniformly (:meth:`Store.control_draw`, seeded by the config's
    seed and the number of batches so far), blind: no pre-label and no confidence, so
    nothing the reviewer sees comes from the model the answers will judge."""
    if n <= 0:
        return pd.DataFrame(columns=PICK_COLUMNS)
    draw = int(store.scalar("SELECT count(*) FROM batches"))
    ids = store.control_draw(n, settings.seed, draw, settings.holdout_fraction)
    return pd.DataFrame({"item_id": ids, "score": np.nan, "prelabel": None, "confidence": np.nan,
                         "picked_by": CONTROL})


def compose_batch(store: Store, settings: Settings, model_version: int | None, active: pd.DataFrame,
                  k: int) -> pd.DataFrame:
    """The batch of ``k`` as asked: flagged items to recheck first (``query.recheck_share``),
    then the active picks, then the control slice (``query.control_share``).

    ``active``: the strategy's picks in rank order (PICK_COLUMNS). The control slice is
    drawn from the whole pool first and the active picks give way to it, so that the
    strategy's choice never shapes the control sample.
    """
    from alflow.tasks.label_check import recheck_picks

    q = settings.query
    n_recheck = int(q.recheck_share * k) if model_version is not None else 0
    recheck = recheck_picks(store, n_recheck)
    control = control_picks(store, settings, control_size(q.control_share, k - len(recheck)))
    room = max(0, k - len(recheck) - len(control))
    if len(active):
        active = active[~active["item_id"].isin(set(control["item_id"]))].reset_index(drop=True)
        # make room by dropping the strategy's own lowest-ranked picks, so that the
        # exploration share (ranked last) survives
        own = np.flatnonzero(active["picked_by"].to_numpy() != "exploration")
        excess = max(0, len(active) - room)
        active = active.drop(index=own[len(own) - min(excess, len(own)):]).head(room)
    parts = [p for p in (recheck, active, control) if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PICK_COLUMNS)


def score_control(store: Store, model_version: int, model) -> int:
    """Predict, with ``model`` (version ``model_version``), the control answers it has no
    prediction for yet, and store them; returns how many were predicted."""
    from alflow.tasks.multilabel.model import is_tag_model, model_tags, predict_tags

    todo = store.unscored_control(model_version)
    if todo.empty:
        return 0
    docs = todo["doc"].tolist()
    predicted = predict_tags(model, docs, model_tags(model)) if is_tag_model(model) else model.predict(docs)
    store.record_control_predictions(model_version, todo["item_id"].tolist(), [str(v) for v in predicted])
    return len(todo)


def control_estimate(store: Store, model_version: int | None, metric: str = "accuracy",
                     classes: list[str] | None = None, seed: int = 0, confidence: float = 0.95) -> dict:
    """Model ``model_version``'s quality on the control answers it never trained on
    (:meth:`Store.control_outcomes`).

    Returns ``{model_version, n, correct, accuracy, low, high, metric, value, value_low,
    value_high, note}``: accuracy with its Wilson interval; ``metric`` (``accuracy`` or
    ``macro_f1``) is the figure the target rule reads, ``value`` with its interval
    (macro F1: a bootstrap seeded by ``seed``). Macro F1 needs an answer of every class in
    ``classes``; without them the figure falls back to accuracy and ``note`` says why.
    Figures are None while n is 0."""
    outcomes = store.control_outcomes(model_version) if model_version is not None else pd.DataFrame(
        columns=["item_id", "batch_id", "label", "predicted"])
    n = len(outcomes)
    correct = int((outcomes["predicted"] == outcomes["label"]).sum()) if n else 0
    low, high = wilson_interval(correct, n, confidence)
    estimate = {"model_version": model_version, "n": n, "correct": correct,
                "accuracy": correct / n if n else None,
                "low": None if math.isnan(low) else low, "high": None if math.isnan(high) else high,
                "metric": "accuracy", "note": None}
    if metric == "macro_f1" and n:
        missing = sorted(set(classes or []) - set(outcomes["label"]))
        if missing:
            estimate["note"] = f"macro_f1 needs a control answer of every class (none yet of {', '.join(missing)})"
        else:
            truth = class_codes(outcomes["label"].tolist(), classes)
            predicted = class_codes(outcomes["predicted"].tolist(), classes)
            macro_f1 = macro_f1_rows(len(classes))
            f_low, f_high = bootstrap_interval(truth, predicted, macro_f1, seed, confidence, batched=True)
            estimate.update(metric="macro_f1", value=float(macro_f1(truth[None, :], predicted[None, :])[0]),
                            value_low=f_low, value_high=f_high)
    if estimate["metric"] == "accuracy":
        estimate.update(value=estimate["accuracy"], value_low=estimate["low"], value_high=estimate["high"])
    return estimate


def current_estimate(store: Store, settings: Settings) -> dict:
    """The control estimate of the newest model that has one (see :func:`control_estimate`):
    with ``control_trains`` off that is the newest model; with it on, the newest model with
    control answers given after it was trained. An empty estimate before any."""
    versions = store.query_df("SELECT model_version FROM models ORDER BY model_version DESC LIMIT 5")
    estimate = None
    for version in versions["model_version"]:
        if settings.task == "multi_label":
            estimate = tag_control_estimate(store, int(version), list(settings.labels), settings.evaluation.metric,
                                            settings.seed)
        else:
            estimate = control_estimate(store, int(version), settings.evaluation.metric, list(settings.labels),
                                        settings.seed)
        if estimate["n"]:
            return estimate
    if estimate is None and settings.task == "multi_label":
        return tag_control_estimate(store, None, list(settings.labels), settings.evaluation.metric)
    return estimate or control_estimate(store, None)


def estimate_line(estimate: dict) -> str:
    """'model v3: 0.912 [0.861, 0.946] accuracy (95% Wilson) on 57 control items', or why
    there is none yet."""
    if not estimate["n"]:
        return "no control item answered yet"
    if estimate.get("task") == "multi_label":
        return tag_estimate_line(estimate)
    if estimate["metric"] == "macro_f1":
        figure = (f"macro_f1 {estimate['value']:.3f} [{estimate['value_low']:.3f}, {estimate['value_high']:.3f}] "
                  f"(95% bootstrap), accuracy {estimate['accuracy']:.3f}")
    else:
        figure = f"accuracy {estimate['accuracy']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}] (95% Wilson)"
    note = f"; {estimate['note']}" if estimate.get("note") else ""
    return f"model v{estimate['model_version']}: {figure} on {estimate['n']} control items{note}"


def tag_estimate_line(estimate: dict) -> str:
    """:func:`estimate_line` of :func:`tag_control_estimate`: 'model v3: micro_f1 0.712
    [0.604, 0.801] (95% bootstrap), subset accuracy 0.450; per-tag F1 business 0.70 [0.50,
    0.86], ... on 40 control items'."""
    figure = (f"{estimate['metric']} {estimate['value']:.3f} [{estimate['value_low']:.3f}, "
              f"{estimate['value_high']:.3f}] (95% bootstrap)" if estimate["metric"] != "subset_accuracy" else
              f"subset_accuracy {estimate['value']:.3f} [{estimate['value_low']:.3f}, "
              f"{estimate['value_high']:.3f}] (95% Wilson)")
    if estimate["metric"] not in ("micro_f1", "subset_accuracy"):
        micro = estimate["micro_f1"]
        figure += f", micro_f1 {micro['value']:.3f} [{micro['low']:.3f}, {micro['high']:.3f}]"
    if estimate["metric"] != "subset_accuracy":
        figure += f", subset accuracy {estimate['accuracy']:.3f}"
    per_tag = ", ".join(f"{tag} {f['f1']:.2f} [{f['low']:.2f}, {f['high']:.2f}]" for tag, f in estimate["tags"].items())
    note = f"; {estimate['note']}" if estimate.get("note") else ""
    return (f"model v{estimate['model_version']}: {figure}; per-tag F1 {per_tag} on {estimate['n']} control "
            f"items{note}")
