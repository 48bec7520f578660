"""Query: choose the next batch for review and record it in ``batches`` / ``batch_items``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from sklearn.feature_extraction.text import TfidfVectorizer

from alflow.config import Settings
from alflow.tasks import strategies
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store
from alflow.tasks.store.batches import PoolChangedError

# How often the query picks again when another cycle took some of its picks meanwhile.
QUERY_ATTEMPTS = 3


def batch_rng(seed: int, store: Store) -> np.random.Generator:
    """A generator seeded by (seed, batches so far): each cycle differs, a replay repeats."""
    n_batches = int(store.scalar("SELECT count(*) FROM batches"))
    return np.random.default_rng([seed, n_batches])


def strategy_label(settings: Settings, model_version: int | None) -> str:
    q = settings.query
    if model_version is None:
        return f"cold-start:{q.cold_start}"
    if q.strategy == "random" or q.exploration == 0:
        return q.strategy
    return f"{q.strategy}+exploration({q.exploration:g})"


def cold_start_picks(store: Store, settings: Settings, k: int, rng: np.random.Generator,
                     holdout: float | None) -> pd.DataFrame:
    """No model yet: a coverage batch (one item per TF-IDF cluster) or a random one."""
    sample = store.sample_pool(settings.query.coverage_sample, int(rng.integers(2**31 - 1)), holdout)
    if sample.empty:
        return pd.DataFrame()
    if settings.query.cold_start == "coverage":
        features = TfidfVectorizer(sublinear_tf=True, min_df=1).fit_transform(sample["doc"])
        idx, scores = strategies.coverage(features, k, rng)
        picked_by = "coverage"
    else:
        idx, scores = strategies.random_sampling(np.zeros((len(sample), 2)), k, rng)
        picked_by = "random"
    return pd.DataFrame({
        "item_id": sample["item_id"].to_numpy()[idx],
        "score": scores,
        "prelabel": None,
        "confidence": np.nan,
        "picked_by": picked_by,
    })


def model_picks(store: Store, settings: Settings, model_version: int, k: int,
                rng: np.random.Generator, holdout: float | None) -> pd.DataFrame:
    """The configured strategy over the pool's stored predictions."""
    item_ids, proba, labels = store.pool_predictions(model_version, len(settings.labels), holdout)
    if len(item_ids) == 0:
        return pd.DataFrame()
    q = settings.query
    strategy = strategies.get_strategy(q.strategy, q.exploration)
    idx, scores = strategy(proba, k, rng)
    if q.strategy == "random":
        picked_by = ["random"] * len(idx)
    else:
        n_random = strategies.n_exploration(len(idx), q.exploration) if q.exploration else 0
        picked_by = ["uncertainty"] * (len(idx) - n_random) + ["exploration"] * n_random
    return pd.DataFrame({
        "item_id": item_ids[idx],
        "score": scores,
        "prelabel": labels[idx],
        "confidence": proba[idx].max(axis=1),
        "picked_by": picked_by,
    })


def query_batch(store: Store, settings: Settings, model_version: int | None,
                flow_run_id: str | None, budget_left: int | None = None) -> str | None:
    """Pick and record a batch; returns its batch_id, or None if nothing is left to ask.

    Idempotent per flow run: a retried or re-run step returns the run's existing batch.
    If another cycle recorded a batch with some of the same items meanwhile, the batch is
    refused by the store and picked again from the pool as it now is (``QUERY_ATTEMPTS``
    times at most): an item is never in two open batches.
    """
    k = settings.query.batch_size if budget_left is None else min(settings.query.batch_size, budget_left)
    holdout = settings.holdout_fraction
    for attempt in range(1, QUERY_ATTEMPTS + 1):
        if flow_run_id:
            existing = store.batch_for_run(flow_run_id)
            if existing:
                return existing["batch_id"]
        if k <= 0:
            return None
        rng = batch_rng(settings.seed, store)
        if model_version is None:
            picks = cold_start_picks(store, settings, k, rng, holdout)
        else:
            picks = model_picks(store, settings, model_version, k, rng, holdout)
        if picks.empty:
            return None
        picks = picks.assign(rank=np.arange(1, len(picks) + 1))
        try:
            return store.create_batch(flow_run_id, strategy_label(settings, model_version), model_version, picks)
        except PoolChangedError:
            if attempt == QUERY_ATTEMPTS:
                raise
    return None  # not reached: the last attempt returns or raises


@task(name="query", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def query_task(settings: Settings, model_version: int | None, flow_run_id: str | None,
               budget_left: int | None = None) -> str | None:
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    return query_batch(store, settings, model_version, flow_run_id, budget_left)
