"""Retrain on every effective label, evaluate, version the model, promote if not worse; and
find the model a cycle pre-labels with (:func:`load_current_model`).

Model rows keep the file name only; the file is looked up in the configured ``models_dir``
(:func:`model_file`), so the project folder can move.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import Settings
from alflow.tasks import modeling
from alflow.tasks.embeddings import endpoint_down, report_left_out, use_stored_vectors, with_vectors
from alflow.tasks.faults import fault_point
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store, document

log = logging.getLogger("alflow")

# As modeling.evaluate_holdout says it.
HOLDOUT_EMPTY = "the holdout set is empty: no source has gold labels (set label_column)"


@dataclass
class TrainResult:
    model_version: int | None  # None: nothing trainable yet
    n_labels: int
    metrics: dict | None = None
    promoted: bool = False
    reason: str = ""
    class_counts: dict = field(default_factory=dict)
    evaluate_seconds: float = 0.0  # of the retrain's wall time, spent evaluating (holdout or cv)


@dataclass
class CurrentModel:
    """The promoted model a cycle uses: its ``models`` row and the fitted pipeline."""

    row: dict
    model: Any

    @property
    def version(self) -> int:
        return int(self.row["model_version"])


@dataclass(frozen=True)
class Unusable:
    """Why the newest promoted model cannot serve this config, and what is done instead."""

    version: int
    why: str
    remedy: str

    def line(self) -> str:
        return f"{self.why}: {self.remedy}"


def model_file(settings: Settings, row: dict) -> Path:
    """The file of a ``models`` row: its ``path`` (a file name) in the configured ``models_dir``."""
    path = Path(str(row["path"]))
    return settings.models_dir / (path.name if path.is_absolute() else path)


def _mismatch(store: Store, settings: Settings, row: dict, model=None) -> tuple[str, str] | None:
    """(why, remedy) if the model of ``row`` was built for another classifier or class list.

    A row from before schema v2 has no ``labels``: once ``model`` is loaded, its
    ``classes_`` outside ``labels``, or stored probabilities of another width, tell.
    """
    version = int(row["model_version"])
    trained_for = row.get("task") if isinstance(row.get("task"), str) else "single_label"
    if trained_for != settings.task:
        return (f"task changed since model v{version} ({trained_for} -> {settings.task})",
                f"retraining as {settings.task}")
    embeddings = _embeddings_mismatch(settings, row, model)
    if embeddings is not None:
        return embeddings, "retraining with the configured features"
    if row["classifier"] != settings.model.classifier:
        why = f"model.classifier changed since model v{version} ({row['classifier']} -> {settings.model.classifier})"
        return why, "retraining with the configured classifier"
    new = list(settings.labels)
    if row.get("labels") is not None:
        old = list(row["labels"])
    elif model is not None:
        classes = [str(c) for c in model.classes_]
        width = store.prediction_width(version)
        if not set(classes) <= set(new):
            old = classes
        elif width is not None and width != len(new):
            old = f"{width} classes"
        else:
            return None
    else:
        return None
    if old == new:
        return None
    return f"labels changed since model v{version} ({old} -> {new})", "retraining on the new class list"


def _embeddings_needed(row: dict, model=None) -> tuple[str, int] | None:
    """(embedding model, dimension) the model of ``row`` reads (its metrics say, else the
    loaded ``model``), or None for a model of TF-IDF features alone."""
    stored = (_metrics(row).get("embeddings") or {})
    if stored.get("model"):
        return str(stored["model"]), int(stored["dim"])
    return modeling.embeddings_needed(model) if model is not None else None


def _embeddings_mismatch(settings: Settings, row: dict, model=None) -> str | None:
    """Why the model of ``row`` cannot read this config's embeddings (one line naming both
    embedding models), or None."""
    needed = _embeddings_needed(row, model)
    if needed is None:
        return None
    name, dim = needed
    version = int(row["model_version"])
    if settings.model.features == "tfidf":
        return (f"model v{version} reads embeddings of {name!r} ({dim} dimensions) and model.features is now "
                f"'tfidf'")
    configured = settings.llm.embedding_model
    if configured != name:
        return (f"model v{version} reads embeddings of {name!r} ({dim} dimensions), the config names "
                f"llm.embedding_model {configured!r}")
    return None


def _metrics(row: dict) -> dict:
    """A ``models`` row's metrics as a dict, whether parsed already or JSON text ({} if none)."""
    metrics = row.get("metrics")
    if isinstance(metrics, str):
        metrics = json.loads(metrics)
    return metrics if isinstance(metrics, dict) else {}


def find_usable_model(store: Store, settings: Settings,
                      logger: logging.Logger | logging.LoggerAdapter = log) -> tuple[CurrentModel | None, Unusable | None]:
    """The newest promoted model whose file loads and that fits the configured labels and
    classifier, walking promoted models newest first. Never trains.

    Returns (model, None); (None, None) before the first model; or (None, why) when the
    newest promoted model was built for another class list or classifier, its file is
    missing or unreadable, or no promoted model is usable. A file holding types the
    configured model does not need is refused (an error in the log) and the previous
    promoted model is tried.
    """
    rows = store.promoted_models()
    if not rows:
        return None, None
    trusted = modeling.trusted_types(settings.model, settings.labels, settings.task)
    newest = int(rows[0]["model_version"])
    for i, row in enumerate(rows):
        version = int(row["model_version"])
        problem = _mismatch(store, settings, row)
        model = None
        if problem is None:
            try:
                model = modeling.load_model(model_file(settings, row), trusted)
            except modeling.UntrustedModelError as exc:
                logger.error(f"{exc}; trying the previous promoted model")
                continue
            except modeling.ModelFileError as exc:
                problem = (str(exc), "retraining from the stored labels")
            else:
                problem = _mismatch(store, settings, row, model)
        if problem is None:
            if version != newest:
                logger.warning(f"using model v{version}, the newest promoted model that loads and fits the "
                               f"labels (v{newest} does not)")
            return CurrentModel(row, model), None
        if i == 0:
            return None, Unusable(version, *problem)
    return None, Unusable(newest, f"no promoted model up to v{newest} loads and fits labels {list(settings.labels)}",
                          "retraining from the stored labels")


def load_current_model(store: Store, settings: Settings, logger: logging.Logger | logging.LoggerAdapter = log,
                       flow_run_id: str | None = None, on_runner: bool = False) -> CurrentModel | None:
    """The model to pre-label with, repaired if need be; None for a cold start.

    If the newest promoted model was built for another class list or classifier, or its
    file is missing or unreadable, says so in one warning and retrains from the stored
    labels (a new promoted version whose ``reason`` names the version it replaces and why;
    ``on_runner``: see :func:`retrain`). Untrusted files fall back to the previous promoted
    model (see :func:`find_usable_model`). If nothing is trainable on the configured labels
    yet, logs it and returns None.
    """
    use_stored_vectors(store, settings, logger=logger)  # before the pool is pre-labeled
    current, problem = find_usable_model(store, settings, logger)
    if problem is None:
        return _serving(store, settings, current, logger)
    logger.warning(problem.line())
    result, model = _retrain(store, settings, flow_run_id, logger, replaces=problem, on_runner=on_runner)
    if result.model_version is None:
        logger.warning(f"no model can be trained on labels {list(settings.labels)} yet ({result.reason}): "
                       "cold start, the batch is chosen for coverage")
        return _serving(store, settings, None, logger)
    logger.info(f"model v{result.model_version} trained on {result.n_labels} labels ({result.reason})")
    return _serving(store, settings, CurrentModel(store.model_row(result.model_version), model), logger)


def _serving(store: Store, settings: Settings, current: CurrentModel | None,
             logger: logging.Logger | logging.LoggerAdapter) -> CurrentModel | None:
    """``current``, once the items it cannot read while the embedding endpoint is down are
    reported left out; with no model, the cold start reads the whole pool again (it picks
    by TF-IDF coverage or at random: no vectors)."""
    down = endpoint_down(store)
    if current is not None:
        report_left_out(store, settings, logger)
    elif down is not None:
        store.read_embedded_only(None)
        logger.warning(f"the cold start needs no vectors (endpoint down: {down}): the batch is chosen by "
                       f"{settings.query.cold_start} over the whole pool")
    return current


def _keep_current(store: Store, settings: Settings, left_out: int, reason: str, counts: dict,
                  logger: logging.Logger | logging.LoggerAdapter) -> TrainResult | None:
    """The current model kept, when the labels lacking a vector (``left_out`` of them) made
    the rest untrainable (``reason``); None when none was left out or there is no model."""
    current = find_usable_model(store, settings, logger)[0] if left_out else None
    if current is None:
        return None
    why = f"kept model v{current.version}: {reason} without the {left_out} labeled items that have no vector"
    logger.warning(why)
    return TrainResult(current.version, int(current.row["n_labels"]), _metrics(current.row) or None, False, why,
                       counts)


def retrain(store: Store, settings: Settings, flow_run_id: str | None = None,
            logger: logging.Logger | logging.LoggerAdapter = log, on_runner: bool = False) -> TrainResult:
    """Fit on the effective labels, evaluate, save with skops and record a ``models`` row.

    The training set is the effective labels whose class is in ``settings.labels``.
    Evaluation is ``holdout`` (gold items never queried) or ``cv`` (stratified k-fold on
    the labels). Promotion compares the new and the current model on the same items: the
    holdout set, or (cv) the labels added since the current model was trained, where the
    current model's predictions and the new model's out-of-fold ones are both unseen. The
    current model is the newest usable promoted one (:func:`find_usable_model`); if none
    is usable, the new model is promoted as the first usable one.
    Re-running with no new labels returns the model already trained on them.

    The holdout is predicted chunk by chunk (:func:`holdout_predictions`), with
    ``on_runner`` on Prefect's task runner like the pre-label (inside a flow run), else in
    this process. A promoted model's holdout labels are stored with it, so the next
    retrain's comparison reads them instead of predicting the holdout again.
    """
    return _retrain(store, settings, flow_run_id, logger, on_runner=on_runner)[0]


def _retrain(store: Store, settings: Settings, flow_run_id: str | None,
             logger: logging.Logger | logging.LoggerAdapter, replaces: Unusable | None = None,
             on_runner: bool = False):
    """:func:`retrain`, also returning the fitted model (None if none was fitted).

    ``replaces``: the newest promoted model is unusable; train anew and promote.
    """
    if settings.task == "multi_label":
        return _retrain_tags(store, settings, flow_run_id, logger, replaces)
    holdout = settings.holdout_fraction
    control_trains = settings.query.control_trains
    # the cycle's pre-label embedded every item (load_current_model): a retrain after the
    # review needs no endpoint, and a text without a vector is embedded when it is read
    use_stored_vectors(store, settings, logger=logger, embed=False)
    frame, watermark = store.training_set(holdout, control_trains)
    frame = frame[frame["label"].isin(settings.labels)].reset_index(drop=True)
    # with the embedding endpoint down, a label whose item has no vector waits for the next fit
    readable = with_vectors(store, settings, frame["doc"].tolist(), "labeled items", "this fit", logger)
    frame = frame[readable].reset_index(drop=True)
    labels = frame["label"].tolist()
    counts = modeling.class_counts(labels)
    reason = modeling.trainable(labels)
    if reason:
        kept = _keep_current(store, settings, int((~readable).sum()), reason, counts, logger) \
            if replaces is None else None
        return kept or TrainResult(None, len(frame), reason=reason, class_counts=counts), None

    params = settings.model.model_dump()
    if replaces is None:
        existing = store.query_df(
            """SELECT * FROM models WHERE label_watermark = ? AND params = ?::JSON AND labels = ?::JSON
              AND coalesce(json_extract(metrics, '$.control_trains')::BOOLEAN, true) = ?
              -- a fit that left out labels without a vector was not on all these labels
              AND coalesce(json_extract(metrics, '$.labels_without_vector')::INTEGER, 0) = 0
            ORDER BY model_version DESC""",
            [watermark, json.dumps(params, default=str), json.dumps(list(settings.labels)), control_trains],
        )
        for row in existing.to_dict("records"):
            if model_file(settings, row).is_file() and _embeddings_mismatch(settings, row) is None:
                return TrainResult(int(row["model_version"]), int(row["n_labels"]),
                                   json.loads(row["metrics"]) if row["metrics"] else None, bool(row["promoted"]),
                                   "already trained on these labels", counts), None

    gold = store.holdout_labels(holdout, settings.labels) if holdout else None
    if on_runner and gold is not None and settings.model.features == "tfidf":  # embeddings: scored on threads
        from alflow.tasks.prelabel import start_runner_soon

        # The cluster starts while the model trains, if the evaluation needs it, or the
        # pool's next pre-label will (then the evaluation finds it up and uses it too).
        start_runner_soon(settings, max(len(gold), store.pool_size(holdout)))
    docs = frame["doc"].tolist()
    features, vocabulary = None, None
    if settings.model.vectorizer_fit == "pool":  # unsupervised: the pool's words, not its labels
        vocabulary = store.sample_pool(settings.model.vectorizer_sample, settings.seed, holdout)["doc"].tolist()
        features = modeling.fit_features(settings.model, vocabulary + docs)
    weak = weak_labels(store, settings)
    unlabeled = None
    if settings.model.self_training != 0:  # held-out items are never in the pool, so never pseudo-labeled
        unlabeled = store.sample_pool(settings.model.self_training_sample, settings.seed, holdout)["doc"].tolist()
        if weak[0]:  # an item is a weak label or a candidate pseudo-label, not both
            taken = set(weak[0])
            unlabeled = [doc for doc in unlabeled if doc not in taken]
    current = find_usable_model(store, settings, logger)[0] if replaces is None else None
    current_model = current.model if current is not None else None
    previous = _previous_self_training(store, params, settings.labels)
    trained = modeling.self_train(settings.model, docs, labels, unlabeled, features=features,
                                  metric=settings.evaluation.metric, seed=settings.seed, previous=previous,
                                  # the self-trained fit starts where the current self-trained model ended
                                  warm=current_model if current is not None and _self_trained(current.row) else None,
                                  weak=weak if weak[0] else None)
    model, pseudo_docs = trained.model, trained.pseudo_docs
    metric = settings.evaluation.metric

    evaluating = time.perf_counter()
    predicted = None  # the new model's holdout labels: stored with it if it is promoted
    if holdout:
        if gold.empty:
            raise modeling.ModelError(HOLDOUT_EMPTY)
        predicted = holdout_predictions(store, settings, model, gold, on_runner=on_runner, logger=logger)
        metrics = holdout_metrics(gold, predicted)
        metrics["holdout_set"] = holdout_fingerprint(gold["item_id"], gold["label"])
        compared = len(gold)
        current_score = None
        if current_model is not None:
            current_score = _holdout_score(current.row, metrics["holdout_set"], metric)
            if current_score is None:  # the holdout changed since it was scored (new gold items)
                current_score = holdout_metrics(gold, holdout_predictions(
                    store, settings, current_model, gold, current.version, on_runner, logger))[metric]
        new_score = metrics[metric]
    else:
        metrics, oof, why = modeling.evaluate_cv(
            # each fold as the model was trained: self-trained (on its own labels) or not, as decided
            settings.model.model_copy(update={"self_training": trained.decision["share"]
                                              if trained.decision["used"] else 0.0}),
            docs, labels, settings.evaluation.cv_folds, settings.seed, vocabulary=vocabulary,
            pool_docs=unlabeled,
        )
        if metrics is None:
            metrics = {"method": "cv", "note": why}
        new_score, current_score, compared = None, None, 0
        if current_model is not None and oof is not None:
            # items first labeled after the incumbent was trained: neither model has seen them
            # (an item asked again, a recheck or an adjudication, the incumbent trained on)
            fresh = store.query_df(
                "SELECT item_id FROM labels GROUP BY item_id HAVING min(label_id) > ?",
                [int(current.row["label_watermark"])],
            )["item_id"]
            mask = frame["item_id"].isin(set(fresh)).to_numpy()
            compared = int(mask.sum())
            if compared:
                truth = np.asarray(labels, dtype=object)[mask]
                new_score = modeling.metrics(truth, oof[mask])[metric]
                old_pred = current_model.predict([d for d, m in zip(docs, mask) if m])
                current_score = modeling.metrics(truth, old_pred)[metric]
            else:
                new_score = current_score = 0.0
        elif current_model is not None:
            new_score, current_score = None, 0.0
    evaluate_seconds = time.perf_counter() - evaluating
    if replaces is not None:
        decision = modeling.Promotion(True, f"replaces model v{replaces.version}: {replaces.why}")
    elif current is None and store.current_model() is not None:
        decision = modeling.Promotion(True, "first usable model")
    else:
        decision = modeling.should_promote(new_score, current_score if current is not None else None,
                                           metric, compared)
    needed = modeling.embeddings_needed(model)
    if needed is not None:  # which vectors it reads: checked before it is loaded (_mismatch)
        metrics["embeddings"] = {"model": needed[0], "dim": needed[1]}
    if not readable.all():  # read by the "already trained on these labels" lookup above
        metrics["labels_without_vector"] = int((~readable).sum())
    metrics = dict(metrics, control_trains=control_trains,
                   self_training=dict(trained.decision, pseudo_labels=len(pseudo_docs),
                                      pool_sample=len(unlabeled or [])),
                   promotion={"promoted": decision.promoted, "reason": decision.reason,
                              "compared_on": compared, "new": new_score, "current": current_score})

    # The file first, then its row: a process stopped between the two leaves a file no row
    # names, which the next retrain (same version number) writes over, atomically.
    version = store.next_model_version()
    path = modeling.save_model(model, settings.models_dir / f"model-{version:04d}.skops")
    fault_point("retrain-after-file")
    store.register_model(version, path.name, settings.model.classifier, params, len(frame),
                         watermark, metrics, decision.promoted, flow_run_id, labels=list(settings.labels),
                         # only a promoted model is ever the current one a later retrain compares with
                         holdout_predictions=predicted if decision.promoted else None)
    fault_point("promotion")
    return TrainResult(version, len(frame), metrics, decision.promoted, decision.reason, counts,
                       evaluate_seconds), model


def tag_answers(settings: Settings, values) -> list[str]:
    """Of ``values`` (stored answers or gold), the text forms of sets of ``settings.labels``
    (the tags), "" included; anything else (skip, a class of another task) is left out."""
    from alflow.tasks.multilabel.tags import parse_tags

    tags = set(settings.labels)
    return [value for value in values if isinstance(value, str) and parse_tags(value) <= tags]


def tag_counts(settings: Settings, answers) -> dict[str, int]:
    """How many of the answers (text forms) carry each tag, in ``labels`` order."""
    from alflow.tasks.multilabel.tags import parse_tags

    sets = [parse_tags(a) for a in answers]
    return {tag: sum(tag in s for s in sets) for tag in settings.labels}


def tag_metrics_of(truth, predicted, tags) -> dict:
    """:func:`alflow.tasks.multilabel.metrics.tag_metrics` of two sequences of text forms."""
    from alflow.tasks.multilabel.metrics import tag_metrics
    from alflow.tasks.multilabel.tags import parse_tags, tag_matrix

    return tag_metrics(tag_matrix([parse_tags(t) for t in truth], tags),
                       tag_matrix([parse_tags(p) for p in predicted], tags))


def promote_tags(new: float | None, current: float | None, metric: str, n_compared: int) -> modeling.Promotion:
    """:func:`alflow.tasks.modeling.should_promote` for a multi-label ``metric``: hamming_loss
    is lower-is-better, so its comparison is turned around."""
    from alflow.tasks.multilabel.metrics import HIGHER_IS_BETTER

    if metric in HIGHER_IS_BETTER or new is None or current is None or n_compared == 0:
        return modeling.should_promote(new, current, metric, n_compared)
    if new <= current:
        return modeling.Promotion(True, f"{metric} {new:.3f} <= current {current:.3f} on {n_compared} items")
    return modeling.Promotion(False, f"{metric} {new:.3f} > current {current:.3f} on {n_compared} items")


def _retrain_tags(store: Store, settings: Settings, flow_run_id: str | None,
                  logger: logging.Logger | logging.LoggerAdapter, replaces: Unusable | None = None):
    """:func:`_retrain` with task = "multi_label": one-vs-rest with the configured classifier
    on the effective answers' tag sets (:func:`alflow.tasks.multilabel.model.fit_tagger`),
    per-tag thresholds as ``model.tag_thresholds`` says (stored with the model: its file and
    ``models.thresholds``), scored on the gold tag sets of the holdout (or out-of-fold, cv)
    with ``evaluation.metric``, promoted as a single-label model is. With
    ``model.self_training`` not 0 and ``tag_thresholds = "fixed"``, self-trained on a pool
    sample (:func:`alflow.tasks.multilabel.model.fit_self_trained_tagger`, as ``alflow
    simulate --task multi_label`` fits it). No weak labels (docs/multi-label.md)."""
    from alflow.tasks.multilabel.model import FOLDS, apply_thresholds, fit_self_trained_tagger, fit_tagger, \
        out_of_fold_proba, predict_tags, tagger_pipeline
    from alflow.tasks.multilabel.tags import parse_tags, tag_matrix

    holdout = settings.holdout_fraction
    control_trains = settings.query.control_trains
    tags = list(settings.labels)
    frame, watermark = store.training_set(holdout, control_trains)
    frame = frame[frame["label"].isin(tag_answers(settings, frame["label"].unique()))].reset_index(drop=True)
    answers = frame["label"].tolist()
    counts = tag_counts(settings, answers)
    y = tag_matrix([parse_tags(a) for a in answers], tags)
    if len(frame) < 2 or not y.any() or y.all():
        reason = (f"{len(frame)} tag-set answers" if len(frame) < 2 else
                  "every answer carries " + ("no tag" if not y.any() else "every tag"))
        return TrainResult(None, len(frame), reason=f"not trainable yet: {reason}", class_counts=counts), None

    params = settings.model.model_dump()
    if replaces is None:
        existing = store.query_df(
            """SELECT * FROM models WHERE label_watermark = ? AND params = ?::JSON AND labels = ?::JSON
              AND task = 'multi_label'
              AND coalesce(json_extract(metrics, '$.control_trains')::BOOLEAN, true) = ?
            ORDER BY model_version DESC""",
            [watermark, json.dumps(params, default=str), json.dumps(tags), control_trains],
        )
        for row in existing.to_dict("records"):
            if model_file(settings, row).is_file():
                return TrainResult(int(row["model_version"]), int(row["n_labels"]),
                                   json.loads(row["metrics"]) if row["metrics"] else None, bool(row["promoted"]),
                                   "already trained on these labels", counts), None

    docs = frame["doc"].tolist()
    pool_docs = None
    if settings.model.vectorizer_fit == "pool":  # unsupervised: the pool's words, not its labels
        pool_docs = store.sample_pool(settings.model.vectorizer_sample, settings.seed, holdout)["doc"].tolist()
    mode, share = modeling.self_training_mode(settings.model)
    if mode != "off" and settings.model.tag_thresholds == "fixed":
        # held-out items are never in the pool, so never pseudo-labeled
        unlabeled = store.sample_pool(settings.model.self_training_sample, settings.seed, holdout)["doc"].tolist()
        tagger = fit_self_trained_tagger(settings.model, docs, y, tags, unlabeled, share=share, seed=settings.seed)
        self_training = {"used": bool(unlabeled), "mode": mode, "share": share, "pool_sample": len(unlabeled)}
    else:
        folds = FOLDS if settings.model.tag_thresholds == "out_of_fold" else 0
        tagger = fit_tagger(settings.model, docs, y, tags, folds=folds, seed=settings.seed, pool_docs=pool_docs)
        self_training = {"used": False, "mode": mode,
                         "reason": "model.self_training = 0" if mode == "off" else
                         "off with tag_thresholds = \"out_of_fold\": pseudo-labels are cut at 0.5"}
    model = tagger_pipeline(tagger)
    current = find_usable_model(store, settings, logger)[0] if replaces is None else None
    metric = settings.evaluation.metric

    evaluating = time.perf_counter()
    predicted = None
    current_score = None
    if holdout:
        gold_forms = tag_answers(settings, store.query_df(
            "SELECT DISTINCT gold_label FROM items WHERE gold_label IS NOT NULL")["gold_label"])
        gold = store.holdout_labels(holdout, gold_forms)
        if gold.empty:
            raise modeling.ModelError(HOLDOUT_EMPTY)
        predicted = holdout_predictions(store, settings, model, gold, labels=gold_forms, logger=logger)
        metrics = _tag_holdout_metrics(gold, predicted, tags)
        metrics["holdout_set"] = holdout_fingerprint(gold["item_id"], gold["label"])
        compared = len(gold)
        if current is not None:
            current_score = _holdout_score(current.row, metrics["holdout_set"], metric)
            if current_score is None:  # the holdout changed since it was scored (new gold items)
                current_score = _tag_holdout_metrics(gold, holdout_predictions(
                    store, settings, current.model, gold, current.version, labels=gold_forms,
                    logger=logger), tags)[metric]
        new_score = metrics[metric]
    else:
        k = min(settings.evaluation.cv_folds, len(docs))
        oof = apply_thresholds(out_of_fold_proba(settings.model, docs, y, k, settings.seed, pool_docs),
                               tagger.thresholds)
        oof_forms = [";".join(sorted(t for t, on in zip(tags, row) if on)) for row in oof]
        metrics = dict(tag_metrics_of(answers, oof_forms, tags), method="cv", n_eval=len(docs))
        new_score, compared = None, 0
        if current is not None:
            # items first labeled after the incumbent was trained: neither model has seen them
            fresh = store.query_df("SELECT item_id FROM labels GROUP BY item_id HAVING min(label_id) > ?",
                                   [int(current.row["label_watermark"])])["item_id"]
            mask = frame["item_id"].isin(set(fresh)).to_numpy()
            compared = int(mask.sum())
            if compared:
                truth = [a for a, m in zip(answers, mask) if m]
                new_score = tag_metrics_of(truth, [f for f, m in zip(oof_forms, mask) if m], tags)[metric]
                old = predict_tags(current.model, [d for d, m in zip(docs, mask) if m], tags)
                current_score = tag_metrics_of(truth, old, tags)[metric]
            else:
                new_score = current_score = 0.0
    evaluate_seconds = time.perf_counter() - evaluating
    if replaces is not None:
        decision = modeling.Promotion(True, f"replaces model v{replaces.version}: {replaces.why}")
    elif current is None and store.current_model() is not None:
        decision = modeling.Promotion(True, "first usable model")
    else:
        decision = promote_tags(new_score, current_score if current is not None else None, metric, compared)
    metrics = dict(metrics, control_trains=control_trains, tag_thresholds=settings.model.tag_thresholds,
                   thresholds=[float(t) for t in tagger.thresholds],
                   self_training=self_training,
                   promotion={"promoted": decision.promoted, "reason": decision.reason,
                              "compared_on": compared, "new": new_score, "current": current_score})

    # The file first, then its row, as for a single-label model (see _retrain).
    version = store.next_model_version()
    path = modeling.save_model(model, settings.models_dir / f"model-{version:04d}.skops")
    fault_point("retrain-after-file")
    store.register_model(version, path.name, settings.model.classifier, params, len(frame), watermark, metrics,
                         decision.promoted, flow_run_id, labels=tags,
                         holdout_predictions=predicted if decision.promoted else None,
                         task="multi_label", thresholds=list(tagger.thresholds))
    fault_point("promotion")
    return TrainResult(version, len(frame), metrics, decision.promoted, decision.reason, counts,
                       evaluate_seconds), model


def _tag_holdout_metrics(gold: pd.DataFrame, predicted: pa.Table, tags: list[str]) -> dict:
    """Multi-label metrics of ``predicted`` text forms (item_id, label) against every ``gold``
    holdout item's gold set (item_id, label), as :func:`holdout_metrics` for classes."""
    guess = dict(zip(predicted.column("item_id").to_pylist(), predicted.column("label").to_pylist()))
    missing = [i for i in gold["item_id"] if i not in guess]
    if missing:
        raise ValueError(f"holdout: {len(missing)} of {len(gold)} gold items have no prediction")
    result = tag_metrics_of(gold["label"].tolist(), [guess[i] for i in gold["item_id"]], tags)
    result.update({"method": "holdout", "n_eval": len(gold)})
    return result


def weak_labels(store: Store, settings: Settings) -> tuple[list[str], list[str]]:
    """(docs, labels) of the weak labels a retrain adds: with ``[llm] weak_label_confidence``,
    the stored LLM pre-labels of this config's lineage (endpoint, model, prompt) that named
    a class with at least that confidence, of items still in the pool: never an answered
    item (so never a control item once answered), an item of an open batch (a control item
    waiting) or a held-out one. Nothing is written: they live in ``llm_predictions`` and
    count as no one's answer. Empty lists when off or when nothing qualifies."""
    from alflow.connectors.llm import LLMClient

    floor = settings.llm.weak_label_confidence
    if floor is None or settings.llm.base_url is None or not settings.llm.model:
        return [], []
    with LLMClient.from_settings(settings) as client:  # no request: the lineage names the cached answers
        version = store.find_llm_version(client.lineage, list(settings.labels))
    if version is None:
        return [], []
    answers = store.llm_labels(version, floor)
    answers = answers[answers["label"].isin(settings.labels)]
    members = store.pool_members(answers["item_id"].tolist(), settings.holdout_fraction)
    if not members:
        return [], []
    label_of = dict(zip(answers["item_id"], answers["label"]))
    items = store.items(members)
    docs = [document(title, text) for title, text in zip(items["title"], items["text"])]
    return docs, [label_of[item_id] for item_id in items["item_id"]]


def _previous_self_training(store: Store, params: dict, labels) -> dict | None:
    """The self-training decision of the newest model trained with these settings and
    classes (its evidence may stand: :func:`modeling.self_train`), or None."""
    rows = store.query_df(
        "SELECT metrics FROM models WHERE params = ?::JSON AND labels = ?::JSON ORDER BY model_version DESC LIMIT 1",
        [json.dumps(params, default=str), json.dumps(list(labels))],
    )
    if rows.empty or rows["metrics"].iloc[0] is None:
        return None
    metrics = rows["metrics"].iloc[0]
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    return (metrics or {}).get("self_training")


def _self_trained(row: dict) -> bool:
    metrics = row.get("metrics") or {}
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    return bool(((metrics or {}).get("self_training") or {}).get("used"))


def holdout_fingerprint(item_ids, labels) -> str:
    """A digest of the holdout's items and gold labels: a model's holdout score stored with
    this digest is its score on this holdout, so it is not predicted again."""
    import hashlib

    digest = hashlib.sha256()
    for item_id, label in sorted(zip(item_ids, labels)):
        digest.update(f"{item_id}\t{label}\n".encode())
    return digest.hexdigest()


def holdout_predictions(store: Store, settings: Settings, model, gold: pd.DataFrame,
                        stored_version: int | None = None, on_runner: bool = False,
                        logger: logging.Logger | logging.LoggerAdapter = log,
                        labels: list[str] | None = None) -> pa.Table:
    """``model``'s labels of the ``gold`` holdout items (item_id, label; as
    :meth:`Store.holdout_labels` lists them): a table (item_id, label) of every one.
    ``labels``: the gold values the holdout is read with (default ``settings.labels``; a
    multi-label project's: the gold tag sets' text forms).

    ``stored_version``: the model is that promoted version; its stored holdout labels are
    read and only the items it has none of are predicted, then stored with it. The texts
    stream out of DuckDB in ``query.chunk_size`` chunks, predicted on the task runner
    with ``on_runner`` (:func:`alflow.tasks.prelabel.predict_with_runner`: here while
    this process's Dask cluster is still starting), else here.
    """
    from alflow.tasks.prelabel import predict_items, predict_with_runner

    known = None
    n = len(gold)
    if stored_version is not None:
        known = store.holdout_predictions(stored_version)
        known = known[known["item_id"].isin(set(gold["item_id"]))]
        n -= len(known)
    kind, here = None, 0
    if n:
        chunks = store.holdout_chunks(settings.holdout_fraction, labels or settings.labels, settings.query.chunk_size,
                                      unpredicted_by=stored_version)
        if on_runner:
            fresh, kind, here = predict_with_runner(settings, model, chunks, n)
        else:
            fresh = predict_items(model, chunks, n)
    else:
        fresh = predict_items(model, [], 0)
    if stored_version is not None:
        store.write_holdout_predictions(stored_version, fresh)
    version = "the new model" if stored_version is None else f"model v{stored_version}"
    where = [f"{kind} runner"] if kind else []
    if kind and here:
        where.append(f"{here} of them here while its cluster started")
    logger.info(f"holdout: {version} predicted {fresh.num_rows} of {len(gold)} items"
                + (f" ({'; '.join(where)})" if where else "")
                + (f", {len(known)} stored" if known is not None and len(known) else ""))
    if known is None or known.empty:
        return fresh
    return pa.concat_tables([pa.Table.from_pandas(known, preserve_index=False, schema=fresh.schema), fresh])


def holdout_metrics(gold: pd.DataFrame, predicted: pa.Table) -> dict:
    """Metrics of ``predicted`` labels (item_id, label) of every ``gold`` holdout item
    (item_id, label): what :func:`alflow.tasks.modeling.evaluate_holdout` gives for the
    model that predicted them. Raises ValueError if a gold item has no prediction."""
    import pyarrow.compute as pc

    at = pc.index_in(pa.array(gold["item_id"], pa.string()), value_set=predicted.column("item_id"))
    if at.null_count:
        raise ValueError(f"holdout: {at.null_count} of {len(gold)} gold items have no prediction")
    truth = pa.array(gold["label"], pa.string())
    guess = predicted.column("label").take(at)
    # The labels as codes in their sorted order: the metrics count the same classes in the
    # same order as over the strings, without sorting 2n Python strings to find them.
    classes = pc.unique(pa.chunked_array([truth, *guess.chunks], pa.string()).drop_null()).sort()
    result = modeling.metrics(pc.index_in(truth, value_set=classes).to_numpy(zero_copy_only=False),
                              pc.index_in(guess, value_set=classes).to_numpy(zero_copy_only=False))
    result.update({"method": "holdout", "n_eval": len(gold)})
    return result


def _holdout_score(row: dict, fingerprint: str, metric: str) -> float | None:
    """The model's ``metric`` as stored when it was scored on the holdout ``fingerprint``, else None."""
    stored = row.get("metrics") or {}
    if stored.get("method") == "holdout" and stored.get("holdout_set") == fingerprint and metric in stored:
        return float(stored[metric])
    return None


@task(name="retrain-evaluate", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def retrain_task(settings: Settings, flow_run_id: str | None = None) -> TrainResult:
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    result = retrain(Store(settings.database, settings.store.lock_timeout_seconds), settings, flow_run_id, logger,
                     on_runner=True)
    if result.model_version is None:
        logger.warning(f"no model trained: {result.reason}")
    else:
        logger.info(
            f"model v{result.model_version} on {result.n_labels} labels: "
            f"{'promoted' if result.promoted else 'not promoted'} ({result.reason})"
        )
    return result


@task(name="load-model", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def load_model_task(settings: Settings, flow_run_id: str | None = None) -> CurrentModel | None:
    """:func:`load_current_model` in a cycle; retried only on transient errors (a held lock)."""
    from prefect.logging import get_run_logger

    store = Store(settings.database, settings.store.lock_timeout_seconds)
    return load_current_model(store, settings, get_run_logger(), flow_run_id, on_runner=True)
