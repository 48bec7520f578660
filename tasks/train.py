"""Retrain on every effective label, evaluate, version the model, promote if not worse."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import Settings
from alflow.tasks import modeling
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store


@dataclass
class TrainResult:
    model_version: int | None  # None: nothing trainable yet
    n_labels: int
    metrics: dict | None = None
    promoted: bool = False
    reason: str = ""
    class_counts: dict = field(default_factory=dict)


def retrain(store: Store, settings: Settings, flow_run_id: str | None = None) -> TrainResult:
    """Fit on the effective labels, evaluate, save with skops and record a ``models`` row.

    Evaluation is ``holdout`` (gold items never queried) or ``cv`` (stratified k-fold on
    the labels). Promotion compares the new and the current model on the same items: the
    holdout set, or (cv) the labels added since the current model was trained, where the
    current model's predictions and the new model's out-of-fold ones are both unseen.
    Re-running with no new labels returns the model already trained on them.
    """
    holdout = settings.holdout_fraction
    frame, watermark = store.training_set(holdout)
    labels = frame["label"].tolist()
    counts = modeling.class_counts(labels)
    reason = modeling.trainable(labels)
    if reason:
        return TrainResult(None, len(frame), reason=reason, class_counts=counts)

    params = settings.model.model_dump()
    existing = store.query_df(
        "SELECT * FROM models WHERE label_watermark = ? AND params = ?::JSON ORDER BY model_version DESC LIMIT 1",
        [watermark, json.dumps(params, default=str)],
    )
    if not existing.empty:
        row = existing.iloc[0]
        return TrainResult(int(row["model_version"]), int(row["n_labels"]),
                           json.loads(row["metrics"]) if row["metrics"] else None, bool(row["promoted"]),
                           "already trained on these labels", counts)

    docs = frame["doc"].tolist()
    model = modeling.fit(settings.model, docs, labels)
    current = store.current_model()
    metric = settings.evaluation.metric
    current_model = (
        modeling.load_model(current["path"], current["classifier"]) if current is not None else None
    )

    if holdout:
        gold = store.holdout_set(holdout)
        gold = gold[gold["label"].isin(settings.labels)]
        metrics = modeling.evaluate_holdout(model, gold["doc"].tolist(), gold["label"].tolist())
        compared = len(gold)
        current_score = (
            modeling.evaluate_holdout(current_model, gold["doc"].tolist(), gold["label"].tolist())[metric]
            if current_model is not None else None
        )
        new_score = metrics[metric]
    else:
        metrics, oof, why = modeling.evaluate_cv(
            settings.model, docs, labels, settings.evaluation.cv_folds, settings.seed
        )
        if metrics is None:
            metrics = {"method": "cv", "note": why}
        new_score, current_score, compared = None, None, 0
        if current_model is not None and oof is not None:
            fresh = store.query_df(
                "SELECT DISTINCT item_id FROM labels WHERE label_id > ?", [int(current["label_watermark"])]
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
    decision = modeling.should_promote(new_score, current_score if current is not None else None,
                                       metric, compared)
    metrics = dict(metrics, promotion={"promoted": decision.promoted, "reason": decision.reason,
                                       "compared_on": compared, "new": new_score, "current": current_score})

    version = store.next_model_version()
    path = settings.models_dir / f"model-{version:04d}.skops"
    modeling.save_model(model, path)
    store.register_model(version, str(path), settings.model.classifier, params, len(frame),
                         watermark, metrics, decision.promoted, flow_run_id)
    return TrainResult(version, len(frame), metrics, decision.promoted, decision.reason, counts)


@task(name="retrain-evaluate", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def retrain_task(settings: Settings, flow_run_id: str | None = None) -> TrainResult:
    from prefect.logging import get_run_logger

    result = retrain(Store(settings.database, settings.store.lock_timeout_seconds), settings, flow_run_id)
    logger = get_run_logger()
    if result.model_version is None:
        logger.warning(f"no model trained: {result.reason}")
    else:
        logger.info(
            f"model v{result.model_version} on {result.n_labels} labels: "
            f"{'promoted' if result.promoted else 'not promoted'} ({result.reason})"
        )
    return result
