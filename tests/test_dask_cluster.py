"""A real Dask cluster: a `dask scheduler` and two `dask worker` processes on 127.0.0.1,
started here from the CLI that `distributed` installs, used by cycles through
``[runner] dask_address``. A cycle's pre-label and holdout evaluation give exactly what the
thread runner gives; a worker killed (SIGKILL) in the middle of a pre-label costs the
cycle nothing: its chunk is scored again on the other worker and every pool item gets
exactly one prediction."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SMS_CSV, ingested_here, write_config

from alflow.config import load_config
from alflow.tasks import modeling, prelabel
from alflow.tasks.store import Store
from alflow.tasks.train import model_file, retrain

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

DASK = Path(sys.executable).with_name("dask")
COLUMNS = "item_id, label, proba, least_confidence, margin, entropy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """(scheduler address, {worker name: its process}): `dask scheduler` and two
    single-threaded `dask worker` processes without a nanny (a killed worker stays dead),
    started, not waited for (:func:`connected`): each preloads alflow's scoring module
    (Prefect, scikit-learn: seconds of imports) while the project is set up here."""
    address = f"tcp://127.0.0.1:{free_port()}"
    common = {"cwd": REPO, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
              "env": dict(os.environ, OMP_NUM_THREADS="1")}
    processes = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                   "--no-dashboard"], **common)]
    workers = {}
    try:
        for name in ("w1", "w2"):
            workers[name] = subprocess.Popen(
                [str(DASK), "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--name", name, "--death-timeout", "60", "--preload", "alflow.tasks.prelabel"],
                **common)
            processes.append(workers[name])
        yield address, workers
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cluster):
    """A project over the SMS corpus on the cluster (type "dask", 200-item chunks), its pool
    ingested and model v1 trained without Prefect: the state every cycle below starts from."""
    folder = tmp_path_factory.mktemp("dask") / "base"
    folder.mkdir()
    config = write_config(folder, labels=["ham", "spam"], source_path=SMS_CSV,
                          extra=f'\n[runner]\ntype = "dask"\ndask_address = "{cluster[0]}"\n')
    config.write_text(config.read_text().replace("[query]\n", "[query]\nchunk_size = 200\n"))
    store, settings = ingested_here(config)
    from test_models import label_gold

    label_gold(store, settings, 30)
    assert retrain(store, settings).model_version == 1
    return folder


def connected(address: str, n: int) -> None:
    """Wait until ``n`` workers have joined the scheduler at ``address``."""
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(n, timeout=90)


def copy_project(base: Path, to: Path, runner: str | None = None) -> tuple[Path, Store]:
    """A copy of the project folder ``base`` (config and state); ``runner`` replaces its
    [runner] section. Returns (its config, its store)."""
    shutil.copytree(base, to)
    config = to / "alflow.toml"
    if runner is not None:
        text = config.read_text()
        config.write_text(text[:text.index("[runner]")] + runner + text[text.index("[[sources]]"):])
    return config, Store(load_config(config).database)


def predictions(store: Store, version: int) -> pd.DataFrame:
    return store.query_df(f"SELECT {COLUMNS} FROM predictions WHERE model_version = ? ORDER BY item_id", [version])


def assert_same(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Exactly the same rows: ids, labels, every probability and measure to the bit."""
    assert frame["item_id"].tolist() == expected["item_id"].tolist()
    assert frame["label"].tolist() == expected["label"].tolist()
    assert np.array_equal(np.stack(frame["proba"].to_numpy()), np.stack(expected["proba"].to_numpy()))
    for column in ("least_confidence", "margin", "entropy"):
        assert np.array_equal(frame[column].to_numpy(), expected[column].to_numpy()), column


@pytest.fixture(scope="module")
def threads_predictions(trained, tmp_path_factory) -> pd.DataFrame:
    """Model v1's pre-label of the pool on the thread runner, on a copy of the project."""
    config, store = copy_project(trained, tmp_path_factory.mktemp("threads") / "p", '[runner]\ntype = "threads"\n\n')
    settings = load_config(config)
    model = modeling.load_model(model_file(settings, store.model_row(1)),
                                modeling.trusted_types(settings.model, settings.labels))
    n, kind = prelabel.prelabel_with_runner(settings, model, 1)
    assert kind == "threads" and n == store.pool_size(settings.holdout_fraction) > 4000
    return predictions(store, 1)


def task_runs(store: Store, batch_id: str, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    run_id = store.batch(batch_id)["flow_run_id"]
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))


def test_a_cycle_on_the_cluster_predicts_what_the_thread_runner_does(trained, threads_predictions, tmp_path,
                                                                     monkeypatch):
    from alflow.flows.cycle import active_learning_cycle

    config, store = copy_project(trained, tmp_path / "p")
    settings = load_config(config)
    connected(settings.runner.dask_address, 2)
    kinds = []
    real_task_runner = prelabel.task_runner
    monkeypatch.setattr(prelabel, "task_runner", lambda s, kind: kinds.append(kind) or real_task_runner(s, kind))
    summary = active_learning_cycle(str(config), auto=True, ingest_sources=False)
    assert summary["cycle"] == 1 and kinds == ["dask", "dask"]  # the pre-label, then the holdout
    assert_same(predictions(store, 1), threads_predictions)
    # The new model's holdout figures, predicted on the workers: what one process computes.
    version = summary["model_version"]
    model = modeling.load_model(model_file(settings, store.model_row(version)),
                                modeling.trusted_types(settings.model, settings.labels))
    gold = store.holdout_set(settings.holdout_fraction)
    expected = modeling.evaluate_holdout(model, gold["doc"].tolist(), gold["label"].tolist())
    assert {k: store.model_row(version)["metrics"][k] for k in expected} == expected
    scored, predicted = (task_runs(store, summary["batch_id"], name) for name in ("score-chunk", "predict-chunk"))
    assert len(scored) >= len(threads_predictions) / 200 and all(r.state.is_completed() for r in scored)
    assert len(predicted) >= len(gold) / 200 and all(r.state.is_completed() for r in predicted)


def test_a_worker_killed_mid_prelabel_costs_the_cycle_nothing(cluster, trained, threads_predictions, tmp_path,
                                                              monkeypatch):
    """SIGKILL to the worker scoring a chunk, after the flow has taken a few chunks back:
    the scheduler gives its work to the other worker, and the cycle completes with every
    pool item scored once, exactly as the thread runner scores it."""
    from distributed import Client

    from alflow.flows.cycle import active_learning_cycle

    address, workers = cluster
    connected(address, 2)
    config, store = copy_project(trained, tmp_path / "p")
    taken: list[int] = []  # rows of each chunk the flow took back from a worker
    real_table = prelabel.predictions_table
    monkeypatch.setattr(prelabel, "predictions_table",
                        lambda ids, scores: taken.append(len(ids)) or real_table(ids, scores))
    killed: list[tuple[str, int]] = []  # (worker, chunks taken back when it was killed)
    stop = threading.Event()

    def kill_one_scoring_worker() -> None:
        with Client(address, timeout=30) as client:
            names = {addr: info["name"] for addr, info in client.scheduler_info(n_workers=-1)["workers"].items()}
            while not stop.is_set():
                if len(taken) >= 3:
                    for addr, keys in client.processing().items():
                        if any("score" in str(key) for key in keys):
                            workers[names[addr]].send_signal(signal.SIGKILL)
                            killed.append((names[addr], len(taken)))
                            return
                time.sleep(0.01)

    killer = threading.Thread(target=kill_one_scoring_worker, daemon=True)
    killer.start()
    try:
        summary = active_learning_cycle(str(config), auto=True, ingest_sources=False)
    finally:
        stop.set()
        killer.join(timeout=30)
    assert killed, "no worker was scoring a chunk after the third came back: the kill never landed"
    name, before = killed[0]
    assert workers[name].wait(timeout=10) == -signal.SIGKILL
    assert before < len(taken)  # chunks came back after the kill: it landed mid-pre-label
    assert summary["cycle"] == 1 and summary["model_version"] is not None
    counts = store.query_df("SELECT item_id, count(*) AS n FROM predictions WHERE model_version = 1 GROUP BY item_id")
    assert len(counts) == len(threads_predictions) and counts["n"].max() == 1
    assert sum(taken) == len(threads_predictions)  # each chunk taken back once, the lost one included
    assert_same(predictions(store, 1), threads_predictions)
    runs = task_runs(store, summary["batch_id"], "score-chunk")
    assert all(r.state.is_completed() for r in runs)  # the lost chunk's task run too: run again, completed
