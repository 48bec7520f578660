"""Pre-label: score the unlabeled pool with the current model, chunk by chunk.

    DuckDB --Arrow chunks--> score-chunk tasks (threads or Dask) --arrays--> one writer

Chunks stream out of one DuckDB read; each is scored by a ``score-chunk`` task on Prefect's
task runner (``[runner]``: a thread pool, or Dask via prefect-dask: a LocalCluster or a
scheduler at ``dask_address``). Workers never touch the database: they return arrays, and
the calling process appends them in bulk transactions (``WRITE_ROWS`` at a time), so DuckDB
has one writer and an interrupted run resumes after what it wrote.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import RunnerSettings, Settings
from alflow.tasks.modeling import score_chunk
from alflow.tasks.progress import track
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store

# Chunks scored ahead of the writer, per worker: keeps workers busy while memory stays
# bounded by a few chunks.
IN_FLIGHT_PER_WORKER = 2
# Scored rows appended per transaction: few large appends cost DuckDB far less than many
# small ones (its primary-key index and commit), and stay a few MB.
WRITE_ROWS = 50_000


def predictions_table(item_ids: pa.Array, scores: dict[str, np.ndarray]) -> pa.Table:
    """A chunk's predictions as an Arrow table for :meth:`Store.write_predictions`:
    ``item_ids`` (n,) and :func:`~alflow.tasks.modeling.score_chunk`'s arrays, no Python
    object per row (proba becomes a fixed-size list column over the (n, c) array)."""
    proba = np.ascontiguousarray(scores["proba"], dtype=np.float64)
    return pa.table({
        "item_id": item_ids,
        "label": pa.array(scores["label"], type=pa.string()),
        "proba": pa.FixedSizeListArray.from_arrays(pa.array(proba.ravel()), proba.shape[1]),
        "least_confidence": scores["least_confidence"],
        "margin": scores["margin"],
        "entropy": scores["entropy"],
    })


def prelabel_pool(store: Store, model, model_version: int, classes: Sequence[str], chunk_size: int,
                  holdout_fraction: float | None = None,
                  submit: Callable[[pa.Array], object] | None = None, in_flight: int = 1,
                  write_rows: int = WRITE_ROWS) -> int:
    """Write ``predictions`` for every pool item ``model_version`` has not scored yet.

    Reads ``chunk_size`` items at a time out of DuckDB as Arrow batches. ``submit(docs)``
    (an Arrow string array) scores a chunk elsewhere and returns a future (``.result()``
    -> :func:`score_chunk`'s dict); by default chunks are scored here. At most
    ``in_flight`` chunks are out at once.
    Scored chunks are appended in bulk, one transaction per ``write_rows`` rows or so
    (DuckDB's per-commit and index costs are then paid a few times, not per chunk), so an
    interrupted run keeps what it wrote and resumes after it. Returns how many items were
    scored.
    """
    classes = list(classes)
    if submit is None:
        submit = _Now.scorer(model, classes)
    total = store.count_unscored(model_version, holdout_fraction)
    pending: deque = deque()
    scored: list[pa.Table] = []
    written = 0

    with track("pre-label", total) as advance:
        def collect(until: int, last: bool = False) -> None:
            nonlocal written
            while len(pending) > until:
                item_ids, future = pending.popleft()
                scored.append(predictions_table(item_ids, future.result()))
            if scored and (last or sum(t.num_rows for t in scored) >= write_rows):
                n = store.write_predictions(pa.concat_tables(scored), model_version)
                scored.clear()
                written += n
                advance(n)

        for chunk in store.unscored_chunks(model_version, chunk_size, holdout_fraction):
            pending.append((chunk.column("item_id"), submit(chunk.column("doc"))))
            collect(until=max(1, in_flight) - 1)
        collect(until=0, last=True)
    return written


class _Now:
    """A finished "future": scoring in the calling thread, for :func:`prelabel_pool` alone."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    @classmethod
    def scorer(cls, model, classes: list[str]) -> Callable[[pa.Array], "_Now"]:
        return lambda docs: cls(score_chunk(model, docs.to_pylist(), classes))


@task(name="score-chunk", cache_policy=NONE)
def score_chunk_task(model, docs: pa.Array, classes: list[str]) -> dict[str, np.ndarray]:
    """:func:`~alflow.tasks.modeling.score_chunk` on a worker: an Arrow string array in,
    arrays back, no database. (Arrow, not a list: Prefect walks a list's every element
    looking for futures, and ships it slower to a Dask worker.)"""
    return score_chunk(model, docs.to_pylist(), classes)


def runner_kind(runner: RunnerSettings, n_items: int) -> str:
    """"threads" or "dask": the configured ``runner.type``, or for "auto" Dask when the
    pre-label has at least ``dask_min_items`` items (``n_items``), threads below."""
    if runner.type != "auto":
        return runner.type
    return "dask" if n_items >= runner.dask_min_items else "threads"


def task_runner(settings: Settings, kind: str):
    """Prefect's task runner of ``kind`` (:func:`runner_kind`): a ThreadPoolTaskRunner, or a
    DaskTaskRunner on the scheduler at ``dask_address`` (else on a LocalCluster of
    ``workers`` processes)."""
    runner = settings.runner
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.workers)
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    # One thread per worker process: scoring is CPU-bound Python, and BLAS threads on top
    # would only fight over the same cores.
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def prelabel_with_runner(settings: Settings, model, model_version: int) -> tuple[int, str | None]:
    """:func:`prelabel_pool` with the chunks scored on the configured task runner: (items
    scored, the runner kind used, None when there was nothing to score)."""
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    classes = list(settings.labels)
    unscored = store.count_unscored(model_version, settings.holdout_fraction)
    if unscored == 0:
        return 0, None  # nothing to score: no cluster started for it
    kind = runner_kind(settings.runner, unscored)
    with task_runner(settings, kind) as runner:
        def submit(docs: pa.Array):
            return runner.submit(score_chunk_task, {"model": model, "docs": docs, "classes": classes})

        n = prelabel_pool(store, model, model_version, classes, settings.query.chunk_size,
                          settings.holdout_fraction, submit=submit,
                          in_flight=IN_FLIGHT_PER_WORKER * settings.runner.workers)
    return n, kind


@task(name="pre-label", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def prelabel_task(settings: Settings, model, model_version: int) -> int:
    """:func:`prelabel_with_runner` with a fitted ``model`` (see ``train.load_model_task``)."""
    from prefect.logging import get_run_logger

    n, kind = prelabel_with_runner(settings, model, model_version)
    get_run_logger().info(f"pre-labeled {n} pool items with model v{model_version}"
                          + (f" ({kind} runner)" if kind else ""))
    return n
