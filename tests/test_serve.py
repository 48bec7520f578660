"""Recurring runs against a real `prefect server` (no mocks of Prefect), and the store's lock.

    prefect server start (own PREFECT_HOME, free port; one for this file)
    alflow serve, ALFLOW_SCHEDULES__CYCLE="* * * * *"  (started with the server, so the
                 minute schedule ticks while the work-pool test runs)
    work pool:   prefect work-pool create / prefect deploy --all / prefect worker start,
                 ALFLOW_REPO exported: ingest completes, the cycle suspends, `alflow label`
                 resumes it, the worker replays it to the end
    serve:       a scheduled cycle suspends with a batch; a later scheduled cycle opens no
                 batch and ends Completed naming it; export -> import -> resume completes it
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SMS_CSV, write_config
from test_browser import REPO, Processes, api_call, free_port, tail, wait_gone, wait_healthy
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app
from alflow.flows.serve import project_name
from alflow.tasks.store import LockHeldError, Store, process_owner

runner = CliRunner()
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


# -- the store's lock (no server) --------------------------------------------------------------
def test_cycle_lock_is_one_holder_at_a_time(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    store.migrate()
    assert store.try_lock("cycle", "run-1") is None
    assert store.try_lock("cycle", "run-1") is None  # the holder itself: still its
    holder = store.try_lock("cycle", "run-2")  # another run, even in this process, waits
    assert (holder["owner"], holder["flow_run_id"]) == (process_owner(), "run-1")
    assert store.release_lock("cycle", "run-2") is False  # only the holder releases
    with pytest.raises(LockHeldError, match=rf"the 'cycle' lock is held by run run-1 \({process_owner()}\) since "):
        store.acquire_lock("cycle", "run-2", timeout=0.3, poll=0.1)
    assert store.try_lock("cycle", "run-2", is_stale=lambda row: row["flow_run_id"] == "run-1") is None
    assert store.lock_holder("cycle")["flow_run_id"] == "run-2"  # a stale holder is taken over
    assert store.release_lock("cycle", "run-2") is True and store.lock_holder("cycle") is None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with store.transaction() as con:
        con.execute("INSERT INTO locks (name, owner, flow_run_id, acquired_at) VALUES ('cycle', ?, 'run-9', now())",
                    [f"{process_owner().rpartition(':')[0]}:{dead.pid}"])
    assert store.try_lock("cycle", "run-3") is None  # its process is gone: taken over

    store.release_lock("cycle", "run-3")
    winners, barrier = [], threading.Barrier(4)

    def contend(run: str) -> None:
        barrier.wait()
        with contextlib.suppress(LockHeldError):
            store.acquire_lock("cycle", run, timeout=0)
            winners.append(run)

    threads = [threading.Thread(target=contend, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) == 1 and store.lock_holder("cycle")["flow_run_id"] == winners[0]


# -- a real Prefect server -----------------------------------------------------------------------
class Stack:
    """The server, the environment its clients use, and `alflow serve` of one project."""

    def __init__(self, home: Path):
        self.home = home
        self.port = port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.ui_url = f"http://127.0.0.1:{port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALFLOW_"))}
        base.update(PREFECT_HOME=str(home / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(REPO))
        self.server_env = dict(base, PREFECT_SERVER_UI_API_URL=self.api_url, PREFECT_UI_API_URL=self.api_url,
                               # schedule runs of a new deployment within a second, not a minute
                               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1")
        self.env = dict(base, PREFECT_API_URL=self.api_url, PREFECT_RUNNER_POLL_FREQUENCY="1",
                        PREFECT_WORKER_QUERY_SECONDS="1")
        self.processes = Processes(home, self.env)
        prefect = Path(sys.executable).with_name("prefect")
        self.prefect = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]

    def get(self, path: str, **params):
        response = api_call("GET", f"{self.api_url}{path}", params=params, timeout=10.0)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict):
        response = api_call("POST", f"{self.api_url}{path}", json=body, timeout=10.0)
        response.raise_for_status()
        return response.json()

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/{name}")

    def runs_of(self, deployment_id: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                               "sort": "EXPECTED_START_TIME_ASC"})

    def run(self, flow_run_id: str) -> dict:
        return self.get(f"/flow_runs/{flow_run_id}")

    def wait_state(self, flow_run_id: str, names: tuple[str, ...], log: Path, timeout: float = 120.0) -> dict:
        """The run once its state's name is one of ``names``; a failure if it ends otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run(flow_run_id)["state"]
            if state and state["name"] in names:
                return state
            if state and state["type"] in FINAL:
                pytest.fail(f"run {flow_run_id} ended {state['name']} ({state.get('message')}):\n{tail(log, 40)}",
                            pytrace=False)
            time.sleep(0.5)
        pytest.fail(f"run {flow_run_id} did not reach {names} within {timeout:.0f} s:\n{tail(log, 40)}", pytrace=False)

    @contextlib.contextmanager
    def client_settings(self):
        """This process's Prefect client (the CLI commands run in-process) on this server."""
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url, PREFECT_UI_URL: self.ui_url}):
            yield


def project(directory: Path) -> Path:
    """A project over the first 300 SMS messages, batches of 5."""
    directory.mkdir(parents=True)
    lines = SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:301]
    corpus = directory / "sms_300.csv"
    corpus.write_text("".join(lines), encoding="utf-8")
    return write_config(directory, labels=["ham", "spam"], source_path=corpus, batch_size=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The server, then `alflow serve` of a project with a one-minute cycle schedule."""
    home = tmp_path_factory.mktemp("recurring")
    stack = Stack(home)
    try:
        server, log = stack.processes.start(
            "prefect-server", stack.prefect + ["server", "start", "--host", "127.0.0.1", "--port", str(stack.port)],
            env=stack.server_env)
        wait_healthy(stack.api_url, server, log)
        stack.served_config = project(home / "served")
        stack.serve, stack.serve_log = stack.processes.start(
            "serve", [sys.executable, "-m", "alflow.flows.cli", "serve", "--config", str(stack.served_config)],
            env=dict(stack.env, ALFLOW_SCHEDULES__CYCLE="* * * * *"))
        yield stack
    finally:
        stack.processes.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prefect_yaml_on_a_process_work_pool(stack, tmp_path):
    """deployments/prefect.yaml as the README says, ALFLOW_REPO exported: the ingest
    deployment completes; the cycle deployment suspends (its process exits), `alflow label`
    answers and resumes it, and the worker replays it to Completed."""
    env = dict(stack.env, ALFLOW_REPO=str(REPO))

    def prefect(*args: str) -> str:
        done = subprocess.run(stack.prefect + list(args), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    prefect("work-pool", "create", "alflow-local", "--type", "process")
    deployed = prefect("deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    assert "active-learning-cycle/nightly-cycle" in deployed and "ingest/hourly-ingest" in deployed
    cycle, ingest = stack.deployment("active-learning-cycle/nightly-cycle"), stack.deployment("ingest/hourly-ingest")
    assert cycle["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    assert [s["schedule"]["cron"] for s in cycle["schedules"]] == ["0 6 * * *"]
    from prefect.client.orchestration import get_client

    with stack.client_settings(), get_client(sync_client=True) as client:
        for deployment in (cycle, ingest):  # their schedules would run the repository's own config
            client.pause_deployment(deployment["id"])
    worker, worker_log = stack.processes.start("worker", stack.prefect + ["worker", "start", "--pool", "alflow-local"],
                                               env=env)

    config = project(tmp_path / "pooled")
    params = {"parameters": {"config_path": str(config)}}
    ingest_run = stack.post(f"/deployments/{ingest['id']}/create_flow_run", params)["id"]
    stack.wait_state(ingest_run, ("Completed",), worker_log)
    store = Store(load_config(config, environ={}).database)
    assert store.scalar("SELECT count(*) FROM items") == 296  # 300 rows, 4 exact duplicates

    cycle_run = stack.post(f"/deployments/{cycle['id']}/create_flow_run", params)["id"]
    stack.wait_state(cycle_run, ("Suspended",), worker_log)
    batch = store.batch_for_run(cycle_run)
    assert batch["status"] == "open" and batch["size"] == 5
    assert wait_gone(batch["owner"]), f"the suspended run's process {batch['owner']} still runs"
    with stack.client_settings():
        labeled = runner.invoke(app, ["label", "--config", str(config), "--annotator", "pat"], input="12121")
    assert labeled.exit_code == 0, labeled.output
    assert "Resumed run" in labeled.output and "worker picks it up" in labeled.output
    stack.wait_state(cycle_run, ("Completed",), worker_log)
    states = [s["name"] for s in sorted(stack.get("/flow_run_states/", flow_run_id=cycle_run),
                                        key=lambda s: s["timestamp"])]
    assert states.count("Running") == 2 and "Resuming" in states, states  # replayed after the resume
    labels = store.labels()
    assert len(labels) == 5 and set(labels["origin"]) == {"cli"} and set(labels["annotator"]) == {"pat"}
    [row] = store.cycles().to_dict("records")
    # 5 answers, one of them the control slice's: it tests the model and never trains it
    assert (row["flow_run_id"], row["batch_id"], row["n_labels"]) == (cycle_run, batch["batch_id"], 4)
    # The cycle's time spans both processes: the first one's query (not redone by the
    # replay), the wait until the resume, then the retrain in the second.
    from alflow.tasks.timings import STEPS

    [timings] = store.cycle_timings().values()
    assert timings["query"] > 0 and timings["review_wait"] > 0 and timings["train"] > 0
    assert min(timings.values()) >= 0 and sum(timings[step] for step in STEPS) <= timings["wall"]
    assert worker.poll() is None, tail(worker_log)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_alflow_serve_one_cycle_at_a_time_with_a_minute_schedule(stack, tmp_path):
    """A scheduled cycle suspends with a batch; a later scheduled cycle opens none and ends
    Completed naming it; export -> fill -> import -> resume completes the first, whose
    cycle row has exactly the batch's labels. `status --json` shows the batch and the
    schedule; Ctrl-C stops serving and pauses the schedules."""
    import pandas as pd

    config, log = stack.served_config, stack.serve_log
    name = f"active-learning-cycle/{project_name(load_config(config, environ={}))}"
    deadline = time.monotonic() + 60
    while "Prefect UI:" not in log.read_text(errors="replace"):
        assert stack.serve.poll() is None and time.monotonic() < deadline, tail(log)
        time.sleep(0.5)
    printed = log.read_text(errors="replace")
    assert f'{name}: cron "* * * * *" (UTC), next run ' in printed
    assert "ingest/" in printed and "no schedule" in printed and f"Prefect UI: {stack.ui_url}" in printed
    deployment = stack.deployment(name)

    store = Store(load_config(config, environ={}).database)
    deadline = time.monotonic() + 150
    suspended = None
    while suspended is None:
        assert stack.serve.poll() is None and time.monotonic() < deadline, f"no run suspended:\n{tail(log, 40)}"
        suspended = next((r for r in stack.runs_of(deployment["id"]) if r["state"]["name"] == "Suspended"), None)
        time.sleep(0.5)
    assert suspended["auto_scheduled"]
    batch = store.batch_for_run(suspended["id"])
    assert batch["status"] == "open"
    url = f"{stack.ui_url}/runs/flow-run/{suspended['id']}"

    deadline = time.monotonic() + 100  # the next minute's run, at most
    later = None
    while later is None:
        assert stack.serve.poll() is None and time.monotonic() < deadline, f"no second run ended:\n{tail(log, 40)}"
        later = next((r for r in stack.runs_of(deployment["id"]) if r["id"] != suspended["id"]
                      and r["state"]["type"] in FINAL), None)
        time.sleep(0.5)
    assert later["auto_scheduled"] and later["state"]["name"] == "Completed", later["state"]
    assert f"batch {batch['batch_id']} (0/5 answered) at {url} is still waiting" in later["state"]["message"]
    assert store.scalar("SELECT count(*) FROM batches") == 1

    with stack.client_settings():
        status = runner.invoke(app, ["status", "--config", str(config), "--json"])
        assert status.exit_code == 0, status.output
        report = __import__("json").loads(status.output)
        assert report["waiting"] == [{"batch_id": batch["batch_id"], "flow_run_id": suspended["id"], "size": 5,
                                      "answered": 0, "url": url}]
        [served] = [s for s in report["schedules"] if s["deployment"] == name]
        assert served["schedule"] == "* * * * *" and served["active"] and served["next_run"]

        out = tmp_path / "batch.csv"
        assert runner.invoke(app, ["export", str(out), "--config", str(config)]).exit_code == 0
        frame = pd.read_csv(out, keep_default_na=False)
        gold = store.gold_labels(frame["item_id"].tolist())
        frame["label"] = [gold[i] for i in frame["item_id"]]
        frame.to_csv(out, index=False)
        imported = runner.invoke(app, ["import", str(out), "--config", str(config), "--annotator", "ana"])
        assert imported.exit_code == 0 and "5 new" in imported.output, imported.output
        resumed = runner.invoke(app, ["resume", "--config", str(config), "--annotator", "ana"])
        assert resumed.exit_code == 0, resumed.output
    stack.wait_state(suspended["id"], ("Completed",), log)
    labels = store.query_df("SELECT * FROM labels WHERE batch_id = ?", [batch["batch_id"]])
    assert len(labels) == 5 and set(labels["origin"]) == {"import"}  # the replay recorded none again
    cycles = store.cycles()
    [row] = cycles[cycles["flow_run_id"] == suspended["id"]].to_dict("records")
    effective = set(store.query_df("SELECT item_id FROM effective_labels")["item_id"])
    control = set(store.query_df("SELECT item_id FROM control_answers")["item_id"])
    assert row["batch_id"] == batch["batch_id"] and row["n_labels"] == 4 == len(effective - control)
    assert effective == set(labels["item_id"]) and len(control) == 1

    stack.serve.send_signal(signal.SIGINT)  # Ctrl-C
    assert stack.serve.wait(60) == 0, tail(log)
    assert "Stopped serving; the schedules are paused." in log.read_text(errors="replace")
    assert stack.deployment(name)["paused"] is True
