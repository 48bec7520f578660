"""Pre-label: score the unlabeled pool with the current model, chunk by chunk."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import Settings
from alflow.tasks.modeling import score_chunk
from alflow.tasks.progress import track
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store


def prelabel_pool(store: Store, model, model_version: int, classes: list[str], chunk_size: int,
                  holdout_fraction: float | None = None) -> int:
    """Write ``predictions`` for every pool item ``model_version`` has not scored yet.

    Reads ``chunk_size`` items at a time from DuckDB and writes each chunk's predictions in
    its own transaction, so memory stays bounded by the chunk and an interrupted run picks
    up where it stopped. Returns how many items were scored.
    """
    total = store.count_unscored(model_version, holdout_fraction)
    scored = 0
    with track("pre-label", total) as advance:
        for chunk in store.unscored_chunks(model_version, chunk_size, holdout_fraction):
            result = score_chunk(model, chunk["doc"].tolist(), classes)
            frame = pd.DataFrame({
                "item_id": chunk["item_id"].to_numpy(),
                "label": result["label"],
                "proba": list(result["proba"]),
                "least_confidence": result["least_confidence"],
                "margin": result["margin"],
                "entropy": result["entropy"],
            })
            store.write_predictions(frame, model_version)
            scored += len(frame)
            advance(len(frame))
    return scored


@task(name="pre-label", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def prelabel_task(settings: Settings, model, model_version: int) -> int:
    """:func:`prelabel_pool` with a fitted ``model`` (see ``train.load_model_task``)."""
    from prefect.logging import get_run_logger

    store = Store(settings.database, settings.store.lock_timeout_seconds)
    n = prelabel_pool(store, model, model_version, list(settings.labels), settings.query.chunk_size,
                      settings.holdout_fraction)
    get_run_logger().info(f"pre-labeled {n} pool items with model v{model_version}")
    return n
