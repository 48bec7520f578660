"""Query: choose the next batch for review and record it in ``batches`` / ``batch_items``.

:func:`select` and :func:`cold_start_select` are the selection itself, over plain arrays;
a real cycle (:func:`query_batch`) and ``alflow simulate`` both call them, so a simulation
replays exactly what a run would ask.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from sklearn.feature_extraction.text import TfidfVectorizer

from alflow.config import ModelSettings, QuerySettings, Settings
from alflow.tasks import strategies
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store
from alflow.tasks.store.batches import PoolChangedError

# How often the query picks again when another cycle took some of its picks meanwhile.
QUERY_ATTEMPTS = 3
# Members of the bagged committee of the ``committee`` strategy.
COMMITTEE_SIZE = 5
# What ``picked_by`` says for a strategy's own (non-random) picks.
PICKED_BY = {"badge": "diversity", "class_balanced": "class_balance", "committee": "committee"}


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


# -- the selection, shared by a real cycle and `alflow simulate` ------------------------------
def cold_start_select(docs: Sequence[str], k: int, rng: np.random.Generator,
                      cold_start: str) -> tuple[np.ndarray, np.ndarray, str]:
    """No model yet: (indices into ``docs``, scores, picked_by) for a coverage batch (one
    item per TF-IDF cluster) or a random one."""
    if cold_start == "coverage":
        features = TfidfVectorizer(sublinear_tf=True, min_df=1).fit_transform(list(docs))
        idx, scores = strategies.coverage(features, k, rng)
        return idx, scores, "coverage"
    idx, scores = strategies.random_sampling(np.zeros((len(docs), 2)), k, rng)
    return idx, scores, "random"


def _committee(model_settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
               classes: Sequence[str], rng: np.random.Generator) -> list:
    """COMMITTEE_SIZE models fitted on bootstrap samples of the labels, drawn per class so
    every member sees every class that has labels."""
    from alflow.tasks import modeling

    labels = np.asarray(labels, dtype=object)
    by_class = [np.flatnonzero(labels == c) for c in classes if (labels == c).any()]
    docs = list(docs)
    members = []
    for _ in range(COMMITTEE_SIZE):
        rows = np.concatenate([rng.choice(idx, size=idx.size, replace=True) for idx in by_class])
        members.append(modeling.fit(model_settings, [docs[i] for i in rows], labels[rows].tolist()))
    return members


def build_pool(q: QuerySettings, proba: np.ndarray, model, docs_of: Callable[[np.ndarray], list[str]],
               labeled_docs: Sequence[str], labeled_labels: Sequence[str], classes: Sequence[str],
               model_settings: ModelSettings, rng: np.random.Generator) -> strategies.Pool:
    """The :class:`~alflow.tasks.strategies.Pool` the configured strategy needs.

    ``proba`` (n, c): the current model's probabilities for the n pool items, columns in
    ``classes`` order; ``model``: that fitted pipeline (its vectorizer gives the features);
    ``docs_of(rows)``: the texts of those pool rows (only candidates are ever read);
    ``labeled_docs`` / ``labeled_labels``: the labels so far. Features and committee are
    computed lazily, for the rows a strategy asks about.
    """
    from alflow.tasks import modeling

    needs_features = q.near_duplicate is not None or q.strategy == "badge"
    vectorize = model[:-1].transform if needs_features else None
    features = (lambda rows: vectorize(docs_of(np.asarray(rows)))) if needs_features else None
    labeled_features = None
    if q.near_duplicate is not None and len(labeled_docs):
        labeled_features = vectorize(list(labeled_docs))
    counts = np.asarray([sum(1 for label in labeled_labels if label == c) for c in classes], dtype=float)
    committee = None
    if q.strategy == "committee":
        members: list = []

        def committee(rows):
            if not members:
                members.extend(_committee(model_settings, labeled_docs, labeled_labels, classes, rng))
            docs = docs_of(np.asarray(rows))
            return np.stack([modeling.predict_proba(m, docs, classes) for m in members])

    return strategies.Pool(proba, features=features, labeled_features=labeled_features,
                           labeled_counts=counts, committee=committee)


def select(q: QuerySettings, pool: strategies.Pool, k: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The configured strategy's batch: (indices into the pool, scores, picked_by)."""
    strategy = strategies.get_strategy(q.strategy, q.exploration, q.near_duplicate, q.candidates)
    idx, scores = strategy(pool, k, rng)
    if q.strategy == "random":
        picked_by = ["random"] * len(idx)
    else:
        own = PICKED_BY.get(q.strategy, "uncertainty")
        picked_by = ["exploration" if np.isnan(s) else own for s in scores]
    return idx, scores, picked_by


# -- a real cycle: the same selection over the store ------------------------------------------
def cold_start_picks(store: Store, settings: Settings, k: int, rng: np.random.Generator,
                     holdout: float | None) -> pd.DataFrame:
    """No model yet: :func:`cold_start_select` over a seeded sample of the pool."""
    sample = store.sample_pool(settings.query.coverage_sample, int(rng.integers(2**31 - 1)), holdout)
    if sample.empty:
        return pd.DataFrame()
    idx, scores, picked_by = cold_start_select(sample["doc"].tolist(), k, rng, settings.query.cold_start)
    return pd.DataFrame({
        "item_id": sample["item_id"].to_numpy()[idx],
        "score": scores,
        "prelabel": None,
        "confidence": np.nan,
        "picked_by": picked_by,
    })


def _load_model(store: Store, settings: Settings, model_version: int):
    from alflow.tasks import modeling
    from alflow.tasks.train import model_file

    row = store.model_row(model_version)
    return modeling.load_model(model_file(settings, row), modeling.trusted_types(settings.model, settings.labels))


def model_picks(store: Store, settings: Settings, model_version: int, k: int,
                rng: np.random.Generator, holdout: float | None) -> pd.DataFrame:
    """:func:`select` over the pool's stored predictions; candidates' texts come from DuckDB."""
    from alflow.tasks.store import document

    item_ids, proba, labels = store.pool_predictions(model_version, len(settings.labels), holdout)
    if len(item_ids) == 0:
        return pd.DataFrame()
    q = settings.query
    model = None
    labeled = pd.DataFrame({"doc": [], "label": []})
    if q.near_duplicate is not None or q.strategy in ("badge", "committee", "class_balanced"):
        labeled, _ = store.training_set(holdout)
        if q.near_duplicate is not None or q.strategy in ("badge", "committee"):
            model = _load_model(store, settings, model_version)

    def docs_of(rows: np.ndarray) -> list[str]:
        frame = store.items(item_ids[rows].tolist())
        return [document(t, x) for t, x in zip(frame["title"], frame["text"])]

    pool = build_pool(q, proba, model, docs_of, labeled["doc"].tolist(), labeled["label"].tolist(),
                      settings.labels, settings.model, rng)
    idx, scores, picked_by = select(q, pool, k, rng)
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
