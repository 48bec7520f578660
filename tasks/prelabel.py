"""Scoring on every core: the pool's pre-labels, and a model's labels for the gold holdout.

    DuckDB --Arrow chunks--> score tasks (threads or Dask) --arrays--> one writer

Chunks stream out of one DuckDB read; each is scored by a task on Prefect's task runner
(``[runner]``: a thread pool, or Dask via prefect-dask: this process's LocalCluster or a
scheduler at ``dask_address``): ``score-chunk`` for the pool (probabilities and uncertainty,
:func:`prelabel_pool`), ``predict-chunk`` for the holdout (the labels its metrics count,
:func:`predict_items`). Workers never touch the database: they return arrays, and the
calling process writes them (the pool's predictions in bulk transactions, ``WRITE_ROWS`` at a
time, so an interrupted run resumes after what it wrote; a model's holdout labels with its
``models`` row, alflow.tasks.train), so DuckDB has one writer.

The LocalCluster is started on first use and kept while this process scores (see
:class:`LocalClusterKeeper`): a cycle's pre-label, its holdout evaluation after the review
and the next cycle of `alflow run --cycles N` find its workers started and their imports
done, instead of paying seconds of start-up each time.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import RunnerSettings, Settings
from alflow.tasks.modeling import embeddings_needed, score_chunk
from alflow.tasks.progress import track
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store

_logger = logging.getLogger("alflow")

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


def scored_in_order(chunks: Iterable[pa.RecordBatch], submit: Callable[[pa.Array], object],
                    in_flight: int = 1) -> Iterator[tuple[pa.Array, object]]:
    """``(item_ids, result)`` for each chunk (columns item_id, doc), in the order read.

    ``submit(docs)`` (an Arrow string array) scores a chunk elsewhere and returns a future
    (``.result()``). At most ``in_flight`` chunks are out at once, so whatever the number
    of items, memory holds a few chunks.
    """
    pending: deque = deque()
    for chunk in chunks:
        pending.append((chunk.column("item_id"), submit(chunk.column("doc"))))
        while len(pending) >= max(1, in_flight):
            item_ids, future = pending.popleft()
            yield item_ids, future.result()
    while pending:
        item_ids, future = pending.popleft()
        yield item_ids, future.result()


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
    scored: list[pa.Table] = []
    written = 0

    with track("pre-label", total) as advance:
        def write() -> None:
            nonlocal written
            n = store.write_predictions(pa.concat_tables(scored), model_version)
            scored.clear()
            written += n
            advance(n)

        chunks = store.unscored_chunks(model_version, chunk_size, holdout_fraction)
        for item_ids, scores in scored_in_order(chunks, submit, in_flight):
            scored.append(predictions_table(item_ids, scores))
            if sum(t.num_rows for t in scored) >= write_rows:
                write()
        if scored:
            write()
    return written


def predicted_labels(model, docs: pa.Array) -> pa.Array:
    """``model.predict`` over ``docs`` (an Arrow string array): the labels as Arrow strings
    (a multi-label model's: its predicted sets' text forms, columns of its ``classes_``
    being the tags in ``settings.labels`` order)."""
    from alflow.tasks.multilabel.model import is_tag_model, model_tags, predict_tags

    if is_tag_model(model):
        return pa.array(predict_tags(model, docs.to_pylist(), model_tags(model)), type=pa.string())
    return pa.array(np.asarray(model.predict(docs.to_pylist()), dtype=str), type=pa.string())


def predict_items(model, chunks: Iterable[pa.RecordBatch], total: int,
                  submit: Callable[[pa.Array], object] | None = None, in_flight: int = 1,
                  description: str = "holdout") -> pa.Table:
    """``model.predict`` over every item of ``chunks`` (Arrow batches: item_id, doc):
    a table (item_id, label) of ``total`` rows or so, in the order read. ``submit(docs)``
    predicts a chunk elsewhere (a future whose ``.result()`` is :func:`predicted_labels`'
    array); by default chunks are predicted here. Keeps only ids and labels, never the
    texts: memory holds ``in_flight`` chunks of text at most."""
    if submit is None:
        submit = lambda docs: _Now(predicted_labels(model, docs))  # noqa: E731
    parts = []
    with track(description, total) as advance:
        for item_ids, labels in scored_in_order(chunks, submit, in_flight):
            parts.append(pa.table({"item_id": item_ids, "label": labels}))
            advance(len(labels))
    if not parts:
        return pa.table({"item_id": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    return pa.concat_tables(parts)


class _Now:
    """A finished "future": scoring in the calling thread, for the functions above alone."""

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


@task(name="predict-chunk", cache_policy=NONE)
def predict_chunk_task(model, docs: pa.Array) -> pa.Array:
    """:func:`predicted_labels` on a worker: a holdout chunk's texts in, its labels back."""
    return predicted_labels(model, docs)


class LocalClusterKeeper:
    """This process's Dask LocalCluster: started on first use (or ahead of it,
    :meth:`start_soon`), shared by every scoring step (pre-label, holdout evaluation, in
    every cycle the process runs), stopped ``idle_seconds`` after the last step using it
    ends, and at exit.

    A worker process imports alflow, scikit-learn and Prefect before it scores (seconds of
    CPU on each: done at its start, ``preload``); kept between steps, that is paid once per
    process, not per step. A step waiting days for a review does not keep it: the idle
    timer stops it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._cluster = None
        self._workers = 0
        self._users = 0
        self._timer: threading.Timer | None = None
        self._starting = False  # a start_soon thread is starting it (read without the lock)

    @property
    def starting(self) -> bool:
        """True while :meth:`start_soon` is starting the cluster: a step that asks for it
        now would wait for its workers (seconds of imports)."""
        return self._starting

    def running(self, workers: int) -> bool:
        """True if a cluster of ``workers`` worker processes is up (its start-up is paid)."""
        with self._lock:
            return self._up() and self._workers == workers

    def start_soon(self, workers: int, idle_seconds: float) -> threading.Thread:
        """Start the cluster in a background thread unless it is up: for a step that will
        use it after work of its own (the holdout evaluation, after training), so the
        workers start and import while that work runs. Unused, it stops after
        ``idle_seconds``. Returns the thread."""
        def start() -> None:
            try:
                with self._lock:
                    if self._users == 0 and not (self._up() and self._workers == workers):
                        try:
                            self._ensure(workers)
                        except Exception as exc:  # noqa: BLE001 - the step that uses it starts it again, or says why
                            _logger.warning(f"the local Dask cluster did not start ahead of its step: {exc}")
                            return
                        self._idle(idle_seconds)
            finally:
                self._starting = False

        self._starting = True  # from now: a step asking for the cluster finds it starting
        thread = threading.Thread(target=start, name="alflow-dask-start", daemon=True)
        thread.start()
        return thread

    @contextmanager
    def use(self, workers: int, idle_seconds: float) -> Iterator[str]:
        """The scheduler address of the running cluster of ``workers`` processes (started
        here if there is none; waited for if :meth:`start_soon` is starting it), held for
        the block."""
        with self._lock:
            self._ensure(workers)
            self._users += 1
            address = self._cluster.scheduler_address
        try:
            yield address
        finally:
            with self._lock:
                self._users -= 1
                self._idle(idle_seconds)

    def close(self) -> None:
        """Stop the cluster now (at exit, or when idle)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._close()

    def _ensure(self, workers: int) -> None:
        """Under the lock: a running cluster of ``workers`` processes, unless one in use has
        another size (it serves as it is)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._cluster is not None and self._users == 0 and not (self._up() and self._workers == workers):
            self._close()
        if self._cluster is None:
            from distributed import LocalCluster

            # One thread per worker process: scoring is CPU-bound Python, and BLAS threads
            # on top would only fight over the same cores.
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None, preload=[__name__])
            self._workers = workers

    def _idle(self, idle_seconds: float) -> None:
        """Under the lock: once no step uses the cluster, stop it ``idle_seconds`` later."""
        if self._users:
            return
        if idle_seconds > 0:
            timer = threading.Timer(idle_seconds, lambda: self._close_if_idle(timer))
            timer.daemon = True
            self._timer = timer
            timer.start()
        else:
            self._close()

    def _close_if_idle(self, timer: threading.Timer) -> None:
        with self._lock:
            if self._users == 0 and self._timer is timer:  # not a timer a later use cancelled
                self._timer = None
                self._close()

    def _up(self) -> bool:
        return self._cluster is not None and self._cluster.status.name == "running"

    def _close(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()


LOCAL_CLUSTER = LocalClusterKeeper()
atexit.register(LOCAL_CLUSTER.close)


def runner_kind(runner: RunnerSettings, n_items: int, warm: bool = False) -> str:
    """"threads" or "dask": the configured ``runner.type``, or for "auto" Dask when the
    step has at least ``dask_min_items`` items (``n_items``), or when ``warm`` (this
    process's cluster is up, so Dask costs no start-up), threads otherwise."""
    if runner.type != "auto":
        return runner.type
    return "dask" if warm or n_items >= runner.dask_min_items else "threads"


@contextmanager
def task_runner(settings: Settings, kind: str):
    """Prefect's task runner of ``kind`` (:func:`runner_kind`), started for the block: a
    ThreadPoolTaskRunner, or a DaskTaskRunner on the scheduler at ``dask_address`` (else
    on this process's LocalCluster of ``workers`` processes, :data:`LOCAL_CLUSTER`)."""
    runner = settings.runner
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        with ThreadPoolTaskRunner(max_workers=runner.workers) as started:
            yield started
        return
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        with DaskTaskRunner(address=runner.dask_address) as started:
            yield started
        return
    # Connected by address, the runner closes its client on exit, never the cluster.
    with LOCAL_CLUSTER.use(runner.workers, runner.dask_idle_seconds) as address, \
            DaskTaskRunner(address=address) as started:
        yield started


def start_runner_soon(settings: Settings, n_items: int) -> bool:
    """For scoring ``n_items`` items after other work: start this process's LocalCluster
    in the background now if that scoring will run on it (see
    :meth:`LocalClusterKeeper.start_soon`). Returns whether it did."""
    runner = settings.runner
    if runner.dask_address or runner_kind(runner, n_items) != "dask" or LOCAL_CLUSTER.running(runner.workers):
        return False
    LOCAL_CLUSTER.start_soon(runner.workers, runner.dask_idle_seconds)
    return True


@contextmanager
def on_runner(settings: Settings, n_items: int, scoring_task, **fixed) -> Iterator[tuple[Callable, int, str]]:
    """``(submit, in_flight, kind)`` for scoring ``n_items`` items chunk by chunk on the
    configured task runner: ``submit(docs)`` runs ``scoring_task(docs=docs, **fixed)``
    there and returns its future; ``in_flight`` is how many chunks to keep out at once."""
    runner = settings.runner
    # A warm local cluster is worth it for anything bigger than one chunk.
    warm = (not runner.dask_address and n_items > settings.query.chunk_size
            and LOCAL_CLUSTER.running(runner.workers))
    kind = runner_kind(runner, n_items, warm)
    if embeddings_needed(fixed.get("model")) is not None:
        kind = "threads"  # its vectors are read from DuckDB in this process (alflow.tasks.embeddings)
    with task_runner(settings, kind) as started:
        def submit(docs: pa.Array):
            return started.submit(scoring_task, dict(fixed, docs=docs))

        yield submit, IN_FLIGHT_PER_WORKER * runner.workers, kind


@contextmanager
def duckdb_threads(store: Store, threads: int) -> Iterator[None]:
    """Hold the database open (:meth:`Store.held`) with DuckDB on ``threads`` threads for the
    block, its setting restored after. While worker processes score on every core, the
    flow's streaming read and bulk appends need no more: DuckDB on every core too would
    only take CPU from the workers, and memory (a scan state per thread)."""
    with store.held():
        with store.connect() as con:
            before = int(con.execute("SELECT current_setting('threads')").fetchone()[0])
            con.execute(f"SET threads = {int(threads)}")
        try:
            yield
        finally:
            with store.connect() as con:
                con.execute(f"SET threads = {before}")


def prelabel_with_runner(settings: Settings, model, model_version: int) -> tuple[int, str | None]:
    """:func:`prelabel_pool` with the chunks scored on the configured task runner: (items
    scored, the runner kind used, None when there was nothing to score)."""
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    classes = list(settings.labels)
    unscored = store.count_unscored(model_version, settings.holdout_fraction)
    if unscored == 0:
        return 0, None  # nothing to score: no cluster started for it
    with on_runner(settings, unscored, score_chunk_task, model=model, classes=classes) as (submit, in_flight, kind):
        with duckdb_threads(store, 1) if kind == "dask" else nullcontext():
            n = prelabel_pool(store, model, model_version, classes, settings.query.chunk_size,
                              settings.holdout_fraction, submit=submit, in_flight=in_flight)
    return n, kind


def predict_with_runner(settings: Settings, model, chunks: Iterable[pa.RecordBatch],
                        n_items: int) -> tuple[pa.Table, str | None, int]:
    """:func:`predict_items` with the chunks predicted on the configured task runner:
    ((item_id, label) table, the runner kind used (None when no chunk went to it), how
    many items were predicted in this process instead).

    While this process's LocalCluster is starting (:meth:`LocalClusterKeeper.start_soon`,
    during the retrain's fit), chunks are predicted here rather than waiting for its
    workers' start-up with nothing to do; the runner takes the rest once it is up."""
    if n_items == 0:
        return predict_items(model, [], 0), None, 0
    runner: dict = {"here": 0}
    with ExitStack() as stack:
        def submit(docs: pa.Array):
            if "submit" not in runner:
                if LOCAL_CLUSTER.starting and not settings.runner.dask_address:
                    runner["here"] += len(docs)
                    return _Now(predicted_labels(model, docs))
                runner["submit"], _, runner["kind"] = stack.enter_context(
                    on_runner(settings, n_items, predict_chunk_task, model=model))
            return runner["submit"](docs)

        table = predict_items(model, chunks, n_items, submit=submit,
                              in_flight=IN_FLIGHT_PER_WORKER * settings.runner.workers)
    return table, runner.get("kind"), runner["here"]


@task(name="pre-label", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def prelabel_task(settings: Settings, model, model_version: int) -> int:
    """:func:`prelabel_with_runner` with a fitted ``model`` (see ``train.load_model_task``)."""
    from prefect.logging import get_run_logger

    n, kind = prelabel_with_runner(settings, model, model_version)
    get_run_logger().info(f"pre-labeled {n} pool items with model v{model_version}"
                          + (f" ({kind} runner)" if kind else ""))
    return n
