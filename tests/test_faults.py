"""The fault matrix: a cycle stopped dead at each named fault point, then run again until it
is done, leaves exactly what a fault-free run from the same seed leaves (issue 21).

    reference  alflow run --auto (cycle 1) -> the snapshot; alflow run --auto (cycle 2)
    matrix     two chains of `alflow run --auto` runs, each stopped at the next point
               (ALFLOW_FAULT=<point>: status 86) and the last one run to the end:
                 from nothing:       ingest mid-chunk, ingest after the write, pre-label
                                     mid-write, query after the batch, review between rounds
                 from the snapshot:  retrain after the file, promotion, cycle row, quality
                                     row, artifacts
               so each run finishes what the one before left, itself stopped at a later
               point (a fault while recovering); and `alflow import` stopped mid-import
               (of a paused `alflow run`, resumed after)
    serve      every point again, through `alflow serve`: its run stands at the point
    (slow)     (ALFLOW_FAULT_HOLD) and `alflow serve` gets SIGTERM; served again with the
               next point set, the next run finishes what the stopped one left and stands
               there; served without a fault, the last finishes the cycle. A served run is
               one cycle, so three chains:
                 from nothing (cycle 1):     ingest mid-chunk, ingest after the write, query
                                             after the batch, review between rounds
                 from the snapshot (2):      pre-label mid-write, `alflow import` mid-import
                                             (the run suspended for a person, `alflow serve`
                                             stopped while it waits, imported, served again,
                                             `alflow resume`), retrain after the file
                 from the snapshot (2):      promotion, cycle row, quality row, artifacts
               each stopped run ends Cancelled (or Crashed)
    worker     SIGKILL to a process worker and its run standing at a point        (slow)

Each end state is compared with the reference's: the same items, batches and their items,
labels, models, cycles, quality rows, label flags and predictions (ids, run ids, times and
timings aside; who answered, how and in which form round aside after a person's review),
nothing doubled (a model per label watermark, a cycle per batch, an answer per annotator,
item and batch), nothing orphaned (model files and rows, cycles and their quality rows and
reports, no batch left open or expired, no lock held), and each cycle's learning-curve
version and summary in Prefect exactly once.

One Prefect server (the session's test server) for everything; the subprocesses run in
parallel over separate project folders. Each test prints the counts line of the README's
Reliability section.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pytest
from conftest import REPO, SMS_CSV, write_config
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.tasks.faults import FAULT_EXIT, FAULT_POINTS
from alflow.tasks.report import LEARNING_CURVE_KEY, SUMMARY_KEY
from alflow.tasks.store import Store

pytestmark = pytest.mark.usefixtures("prefect_api")
runner = CliRunner()

ROWS = 200  # SMS messages in the corpus: 198 items, 45 held out
BATCH = 10
PARALLEL = 4  # the chains, the human review and the reference's second cycle
# The chains of `alflow run --auto`: (start from the snapshot?, the points in the order the
# runs stop at them). The ingest points stop the first cycle (later ones find the file
# unchanged and read nothing), the others the second, with a model in place.
CHAINS = [(False, ["ingest-mid-chunk", "ingest-after-write", "prelabel-mid-write", "query-after-batch",
                   "review-between-rounds"]),
          (True, ["retrain-after-file", "promotion", "cycle-row", "quality-row", "artifacts"])]
HUMAN_POINTS = ["review-mid-import"]  # `alflow import`, of a run paused for review
# The chains of `alflow serve` stopped with SIGTERM: (start from the snapshot?, points). A
# served run is one cycle: from nothing the chain stops cycle 1 (the only one that ingests),
# from the snapshot cycle 2 (the first with a model to pre-label with). Three chains, not
# two: each step starts `alflow serve` and a run (~8 CPU-s, ~14 s on 2 quiet cores).
SERVE_CHAINS = [(False, ["ingest-mid-chunk", "ingest-after-write", "query-after-batch", "review-between-rounds"]),
                (True, ["prelabel-mid-write", "review-mid-import", "retrain-after-file"]),
                (True, ["promotion", "cycle-row", "quality-row", "artifacts"])]
SERVE_POINTS = [p for _, points in SERVE_CHAINS for p in points]
WORKER_POINTS = ["artifacts"]


def test_every_fault_point_is_in_the_matrix():
    assert sorted([p for _, points in CHAINS for p in points] + HUMAN_POINTS) == sorted(FAULT_POINTS)
    assert sorted(SERVE_POINTS) == sorted(FAULT_POINTS)  # a served run passes them all, `alflow import`'s too
    assert set(WORKER_POINTS) <= set(FAULT_POINTS)


# -- running alflow ----------------------------------------------------------------------------
def api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def environment(**extra: str) -> dict[str, str]:
    """This process's environment for a subprocess on the test server, no ALFLOW_* setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALFLOW_")}
    # Run logs stay off the server: a dozen runs at once keep it busy enough.
    env.update(PREFECT_API_URL=api_url(), PREFECT_LOGGING_LEVEL="WARNING", PREFECT_LOGGING_TO_API_ENABLED="false",
               DO_NOT_TRACK="1", **extra)
    return env


def alflow(config: Path, *args: str, fault: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = environment(**({"ALFLOW_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "alflow.flows.cli", *args, "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def project(directory: Path, corpus: Path, start: Path | None = None) -> Path:
    """A project folder over ``corpus``, its state a copy of ``start``'s (a snapshot) if given."""
    directory.mkdir(parents=True)
    config = write_config(directory, labels=["ham", "spam"], source_path=corpus, batch_size=BATCH)
    if start is not None:
        shutil.copytree(start, directory / "state")
    return config


def store_of(config: Path) -> Store:
    settings = load_config(config, environ={})
    return Store(settings.database, lock_timeout=60)


def finished_cycles(config: Path) -> int:
    store = store_of(config)
    if not store.path.exists():
        return 0
    store.migrate()
    return int(store.scalar("SELECT count(*) FROM cycle_reports WHERE published_at IS NOT NULL"))


def run_cycles(config: Path, cycles: int, fault: str | None = None) -> subprocess.CompletedProcess:
    """`alflow run --auto --cycles N`; only the project's first cycle ingests (the corpus
    does not change: later ingests would read nothing)."""
    ingest = "--ingest" if finished_cycles(config) == 0 else "--no-ingest"
    return alflow(config, "run", "--auto", "--cycles", str(cycles), ingest, "--no-progress", fault=fault)


def run_until_done(config: Path, cycles: int) -> list[str]:
    """`alflow run --auto` until ``cycles`` cycles are finished (twice at most); each run's
    output, for a failure's message."""
    outputs = []
    for _ in range(2):
        left = cycles - finished_cycles(config)
        if left <= 0:
            return outputs
        done = run_cycles(config, left)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, "\n".join(outputs)
    assert finished_cycles(config) == cycles, "\n".join(outputs)
    return outputs


# -- what a store holds ------------------------------------------------------------------------
def _value(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else round(v, 10)
    if isinstance(v, str) and v[:1] in "{[":  # JSON: compared as data
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def content(config: Path, human_batches: int = 0) -> dict[str, list]:
    """Everything a cycle decides, as plain rows: batches by their position (ids are random),
    no times, run ids, timings or reports. ``human_batches``: the last batches were answered
    by people (who, how and what they saw aside)."""
    con = duckdb.connect(str(store_of(config).path), read_only=True)
    try:
        batches = [r[0] for r in con.execute("SELECT batch_id FROM batches ORDER BY created_at, batch_id").fetchall()]
        position = {b: i + 1 for i, b in enumerate(batches)}

        def rows(sql: str, batch_column: int | None = None) -> list[tuple]:
            out = []
            for row in con.execute(sql).fetchall():
                row = [_value(v) for v in row]
                if batch_column is not None:
                    row[batch_column] = position.get(row[batch_column], row[batch_column])
                out.append(tuple(row))
            return out

        labels = "item_id, label, batch_id" if human_batches else \
            "item_id, label, batch_id, annotator, origin, prelabel_shown, seconds"
        found = {
            "items": rows("SELECT item_id, source, external_id, url, title, text, gold_label, meta FROM items "
                          "ORDER BY item_id"),
            "batches": rows("SELECT batch_id, strategy, model_version, size, status FROM batches "
                            "ORDER BY created_at, batch_id", 0),
            "batch_items": sorted(rows("SELECT batch_id, rank, item_id, score, prelabel, confidence, picked_by, "
                                       "overlap FROM batch_items", 0)),
            "labels": rows(f"SELECT {labels} FROM labels ORDER BY label_id", 2),
            "models": rows("SELECT model_version, path, classifier, params, n_labels, label_watermark, metrics, "
                           "promoted, labels FROM models ORDER BY model_version"),
            "cycles": rows("SELECT cycle, batch_id, model_version, strategy, n_labels, accuracy, macro_f1, metrics, "
                           "promoted FROM cycles ORDER BY cycle", 1),
            "cycle_quality": rows("SELECT * EXCLUDE (created_at) FROM cycle_quality ORDER BY cycle"),
            "label_flags": rows("SELECT * EXCLUDE (created_at) FROM label_flags ORDER BY model_version, rank"),
            "predictions": rows("SELECT item_id, model_version, label, proba, margin FROM predictions "
                                "ORDER BY model_version, item_id"),
            "control_predictions": rows("SELECT * FROM control_predictions ORDER BY model_version, item_id"),
            "stop_set": rows("SELECT item_id FROM stop_set ORDER BY item_id"),
            "stop_set_predictions": rows("SELECT * FROM stop_set_predictions ORDER BY model_version, item_id"),
        }
        if not human_batches:  # a simulated review has no form rounds; a human one does
            found["review_rounds"] = rows("SELECT batch_id, round FROM review_rounds ORDER BY batch_id, round", 0)
        return found
    finally:
        con.close()


def defects(config: Path) -> list[str]:
    """What is doubled or orphaned in a finished project; [] when nothing is."""
    settings = load_config(config, environ={})
    con = duckdb.connect(str(settings.database), read_only=True)

    def count(sql: str) -> int:
        return int(con.execute(sql).fetchone()[0])

    checks = {
        "an answer recorded twice": "SELECT count(*) FROM (SELECT batch_id, item_id, annotator, label, count(*) n "
                                    "FROM labels GROUP BY ALL HAVING n > 1)",
        "a model trained twice on the same labels": "SELECT count(*) FROM (SELECT label_watermark, params::VARCHAR, "
                                                    "count(*) n FROM models GROUP BY ALL HAVING n > 1)",
        "a batch with two cycles": "SELECT count(*) FROM (SELECT batch_id, count(*) n FROM cycles GROUP BY ALL "
                                   "HAVING n > 1)",
        "a cycle without its quality row": "SELECT count(*) FROM cycles WHERE cycle NOT IN "
                                           "(SELECT cycle FROM cycle_quality)",
        "a quality row without its cycle": "SELECT count(*) FROM cycle_quality WHERE cycle NOT IN "
                                           "(SELECT cycle FROM cycles)",
        "a cycle not published": "SELECT count(*) FROM cycles WHERE cycle NOT IN (SELECT cycle FROM cycle_reports "
                                 "WHERE published_at IS NOT NULL AND curve_artifact IS NOT NULL "
                                 "AND summary_artifact IS NOT NULL)",
        "a labeled batch without its cycle": "SELECT count(*) FROM batches WHERE status = 'labeled' AND batch_id "
                                             "NOT IN (SELECT batch_id FROM cycles)",
        "a batch left open or expired": "SELECT count(*) FROM batches WHERE status <> 'labeled'",
        "an answer outside any batch": "SELECT count(*) FROM labels WHERE batch_id NOT IN "
                                       "(SELECT batch_id FROM batches)",
        "a model row without a cycle": "SELECT count(*) FROM models WHERE model_version NOT IN "
                                       "(SELECT model_version FROM cycles WHERE model_version IS NOT NULL)",
        "a lock still held": "SELECT count(*) FROM locks",
    }
    try:
        found = [f"{what} ({n})" for what, sql in checks.items() if (n := count(sql))]
        named = {r[0] for r in con.execute("SELECT path FROM models").fetchall()}
    finally:
        con.close()
    files = {p.name for p in settings.models_dir.iterdir()} if settings.models_dir.exists() else set()
    if files - named:
        found.append(f"model files no row names: {sorted(files - named)}")
    if named - files:
        found.append(f"model rows without a file: {sorted(named - files)}")
    return found


def artifacts_of(config: Path, own_cycles: list[int]) -> list[str]:
    """What is wrong with the project's artifacts in Prefect: each cycle's recorded
    learning-curve version and summary must exist there, named for their cycle, and the
    runs of this project must have published ``own_cycles``' once each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    settings = load_config(config, environ={})
    con = duckdb.connect(str(settings.database), read_only=True)
    try:
        recorded = con.execute("SELECT cycle, curve_artifact, summary_artifact FROM cycle_reports "
                               "ORDER BY cycle").fetchall()
    finally:
        con.close()
    problems = []
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[LEARNING_CURVE_KEY, SUMMARY_KEY])))
        by_id = {str(a.id): a for a in found}
        for cycle, curve, summary in recorded:
            for kind, artifact_id, start in (("curve", curve, f"**cycle {cycle}**:"),
                                             ("summary", summary, f"Active-learning cycle {cycle} summary")):
                artifact = by_id.get(str(artifact_id))
                if artifact is None or not (artifact.description or "").startswith(start):
                    problems.append(f"cycle {cycle}: its {kind} artifact {artifact_id} is not in Prefect")
        run_ids = list({a.flow_run_id for a in found if a.flow_run_id})
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))) \
            if run_ids else []
    mine = {r.id for r in runs if r.parameters.get("config_path") == str(config.resolve())}
    for cycle in own_cycles:
        curves = [a for a in found if a.flow_run_id in mine and a.key == LEARNING_CURVE_KEY
                  and (a.description or "").startswith(f"**cycle {cycle}**:")]
        summaries = [a for a in found if a.flow_run_id in mine and a.key == SUMMARY_KEY
                     and a.description == f"Active-learning cycle {cycle} summary"]
        if (len(curves), len(summaries)) != (1, 1):
            problems.append(f"cycle {cycle}: {len(curves)} learning-curve versions and {len(summaries)} summaries "
                            "published, not one of each")
    return problems


def differences(found: dict, expected: dict) -> list[str]:
    """Per table, how the found rows differ from the expected ones (rows lost, rows extra)."""
    out = []
    for table, rows in expected.items():
        have = found[table]
        if have != rows:
            lost = [r for r in rows if r not in have]
            extra = [r for r in have if r not in rows]
            out.append(f"{table}: {len(have)} rows, expected {len(rows)}; lost {lost[:2]}, extra {extra[:2]}")
    return out


# -- the reference -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_api):
    """A fault-free project: its corpus, its state after cycle 1 (the snapshot) and that
    state's content; :func:`second_cycle` adds the content after cycle 2."""
    home = tmp_path_factory.mktemp("faults")
    corpus = home / "sms.csv"
    corpus.write_text("".join(SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:ROWS + 1]),
                      encoding="utf-8")
    config = project(home / "reference", corpus)
    run_until_done(config, 1)
    snapshot = home / "snapshot"
    shutil.copytree(config.parent / "state", snapshot)
    return {"home": home, "corpus": corpus, "config": config, "snapshot": snapshot, "content": {1: content(config)},
            "lock": threading.Lock()}


def second_cycle(reference: dict) -> dict:
    """The reference's content after its fault-free cycle 2 (run once, by whoever asks first)."""
    with reference["lock"]:
        if 2 not in reference["content"]:
            config = reference["config"]
            run_until_done(config, 2)
            assert defects(config) == [] and artifacts_of(config, [1, 2]) == []
            reference["content"][2] = content(config)
    return reference["content"][2]


def stopped_and_rerun(reference: dict, from_snapshot: bool, points: list[str]) -> dict:
    """`alflow run --auto` stopped at each of ``points`` in turn (each run going on from
    where the one before stopped), then run to the end of cycle 2: what it left."""
    config = project(reference["home"] / f"auto-{points[0]}", reference["corpus"],
                     reference["snapshot"] if from_snapshot else None)
    outcome = {"points": points, "stopped": [], "runs": 0}
    for point in points:
        stopped = run_cycles(config, 2 - finished_cycles(config), fault=point)
        outcome["runs"] += 1
        if stopped.returncode != FAULT_EXIT:
            outcome["error"] = f"exit {stopped.returncode}, not stopped at {point}:\n{stopped.stdout}{stopped.stderr}"
            return outcome
        outcome["stopped"].append(point)
    try:
        outcome["runs"] += len(run_until_done(config, 2))
    except AssertionError as exc:
        outcome["error"] = str(exc)
        return outcome
    outcome["differences"] = differences(content(config), second_cycle(reference))
    outcome["defects"] = defects(config) + artifacts_of(config, [2] if from_snapshot else [1, 2])
    return outcome


def import_stopped(reference: dict, point: str) -> dict:
    """A human review: `alflow run` pauses; `alflow import` stopped at ``point``, run again
    (:func:`imported_after_a_stop`); `alflow resume`; the run finishes."""
    from alflow.flows.cli import app

    config = project(reference["home"] / f"human-{point}", reference["corpus"], reference["snapshot"])
    log = config.parent / "run.log"
    with open(log, "wb") as out:
        paused = subprocess.Popen([sys.executable, "-m", "alflow.flows.cli", "run", "--config", str(config),
                                   "--no-ingest", "--no-progress"], cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT)
    outcome = {"points": [point], "stopped": [], "runs": 1}
    try:
        imported_after_a_stop(config, wait_offered(store_of(config), paused, log), point)
        outcome["stopped"].append(point)
        resumed = runner.invoke(app, ["resume", "--config", str(config)])
        assert resumed.exit_code == 0, resumed.output
        assert paused.wait(120) == 0, log.read_text(errors="replace")
    except AssertionError as exc:
        outcome["error"] = str(exc)
        return outcome
    finally:
        if paused.poll() is None:
            paused.kill()
            paused.wait(10)
    return judged(outcome, config, reference, human=True)


def imported_after_a_stop(config: Path, batch: str, point: str) -> None:
    """`alflow export` of ``batch`` (waiting for review), the gold labels filled in;
    `alflow import` stopped at ``point`` stores none of it; run again, all of it."""
    import pandas as pd

    from alflow.flows.cli import app

    store = store_of(config)
    exported = config.parent / "batch.csv"
    done = runner.invoke(app, ["export", str(exported), "--config", str(config), "--batch", batch])
    assert done.exit_code == 0, done.output
    frame = pd.read_csv(exported, keep_default_na=False, dtype=str)
    gold = store.gold_labels(frame["item_id"].tolist())
    frame["label"] = [gold[i] for i in frame["item_id"]]
    frame.to_csv(exported, index=False)
    stopped = alflow(config, "import", str(exported), fault=point)
    assert stopped.returncode == FAULT_EXIT, stopped.stdout + stopped.stderr
    assert store.scalar("SELECT count(*) FROM labels WHERE batch_id = ?", [batch]) == 0  # none half-written
    again = runner.invoke(app, ["import", str(exported), "--config", str(config)])
    assert again.exit_code == 0 and f"{BATCH} new" in again.output, again.output


def content_as_human(reference: dict) -> dict:
    """The reference's content as a human review compares with it (answers by whom aside)."""
    expected = dict(second_cycle(reference))
    expected["labels"] = [r[:3] for r in expected["labels"]]
    expected.pop("review_rounds")
    return expected


def wait_offered(store: Store, process: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """The open batch of a run that stopped for its review (Paused)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            offered = store.query_df("SELECT batch_id, flow_run_id FROM batches WHERE status = 'open' "
                                     "AND offered_at IS NOT NULL")
        except Exception:  # noqa: BLE001 - the run holds the file, or is still creating it
            offered = None
        if offered is not None and len(offered):
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(offered["flow_run_id"].iloc[0])).state
            if state is not None and state.is_paused():
                return offered["batch_id"].iloc[0]
        time.sleep(0.5)
    raise AssertionError(f"no batch was offered for review:\n{log.read_text(errors='replace')}")


def report(outcomes: list[dict], path: str) -> list[str]:
    """The failures among the outcomes; prints the line the README's Reliability section reports."""
    failures = [f"{', '.join(o['points'])}: {o.get('error') or '; '.join(o['differences'] + o['defects'])}"
                for o in outcomes if o.get("error") or o["differences"] or o["defects"]]
    points = len({p for o in outcomes for p in o["stopped"]})  # a point stopped twice (serve, worker) counts once
    print(f"\n{path}: {points} fault points, {sum(o['runs'] for o in outcomes)} runs, "
          f"{len(failures)} end states with rows lost or doubled")
    return failures


# -- the matrix --------------------------------------------------------------------------------
def test_fault_matrix_through_alflow_run(reference):
    """Every fault point: `alflow run --auto` (or `alflow import`) stopped there with
    os._exit, then run again until done, leaves the reference's content, nothing doubled
    or orphaned, every cycle's artifacts in Prefect once."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        pool.submit(second_cycle, reference)  # the fault-free cycle 2, beside the others
        jobs = [pool.submit(stopped_and_rerun, reference, from_snapshot, points) for from_snapshot, points in CHAINS]
        jobs += [pool.submit(import_stopped, reference, point) for point in HUMAN_POINTS]
        outcomes = [job.result() for job in jobs]
    failures = report(outcomes, "alflow run")
    assert sorted(p for o in outcomes for p in o["stopped"]) == sorted(FAULT_POINTS), "\n".join(failures)
    assert failures == [], "\n".join(failures)


# -- a served schedule and a process worker, stopped from outside -------------------------------
def wait_file(path: Path, process: subprocess.Popen, log: Path, timeout: float = 150) -> str:
    """The text of ``path`` once a run wrote it (it stands at its fault point)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, \
            f"no run reached the fault point:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.3)
    return path.read_text()


def wait_run(flow_run_id, timeout: float = 150, final: bool = True):
    """The run's state once it is final (or, ``final`` False, once it is not Scheduled/Pending)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and (state.is_final() if final else not (state.is_scheduled() or state.is_pending())):
                return state
            time.sleep(0.5)
    raise AssertionError(f"run {flow_run_id} is still {state.name if state else 'without a state'}")


def start_cycle(deployment_name: str, config: Path, timeout: float = 60, auto: bool = True):
    """A run of the cycle deployment ``deployment_name`` (registered by then) on ``config``,
    answered by the simulated annotator (``auto``), else suspended for a person."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                deployment = client.read_deployment_by_name(deployment_name)
                break
            except ObjectNotFound:
                assert time.monotonic() < deadline, f"deployment {deployment_name} was not registered"
                time.sleep(0.5)
        return client.create_flow_run_from_deployment(
            deployment.id, parameters={"config_path": str(config.resolve()), "auto": auto}).id


def held_or_ended(hold: Path, flow_run_id, process: subprocess.Popen, log: Path, timeout: float = 150):
    """None once the run stands at its fault point (it wrote ``hold``), else the final state
    it ended in without reaching the point."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        for tick in itertools.count():
            if hold.exists():
                break
            assert process.poll() is None and time.monotonic() < deadline, \
                f"the run neither reached its fault point nor ended:\n{log.read_text(errors='replace')[-3000:]}"
            if tick % 10 == 9:  # every 2 s: the test server has enough to answer
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.is_final() and not hold.exists():
                    return state
            time.sleep(0.2)
    return None


def served_chain(reference: dict, from_snapshot: bool, points: list[str]) -> dict:
    """`alflow serve` stopped with SIGTERM while its run stands at each of ``points`` in
    turn (all in one cycle: the first from nothing, else the second), each time served
    again with the next point set, so that the next run finishes what the stopped one left
    and stands at that point; then served without a fault: that run finishes the cycle.

    With an `alflow import` point the chain's runs wait for a person: `alflow serve` is
    stopped while its run is suspended for review, `alflow import` stopped at the point and
    run again, and `alflow resume` (served again) has that run go on to the next point."""
    from test_browser import Processes, wait_gone

    from alflow.flows.cli import app
    from alflow.flows.serve import project_name

    cycle, human = (2 if from_snapshot else 1), bool(set(points) & set(HUMAN_POINTS))
    config = project(reference["home"] / f"serve-{points[0]}", reference["corpus"],
                     reference["snapshot"] if from_snapshot else None)
    processes = Processes(config.parent, environment(PREFECT_RUNNER_POLL_FREQUENCY="1"))
    command = [sys.executable, "-m", "alflow.flows.cli", "serve", "--config", str(config)]
    name = f"active-learning-cycle/{project_name(load_config(config, environ={}))}"
    outcome = {"points": points, "stopped": [], "runs": 0, "stopped_runs": []}
    suspended = None  # the run waiting for review, resumed when served again
    try:
        for step, point in enumerate([*points, None]):
            hold = config.parent / f"stopped-at-{step}"
            served = point is not None and point not in HUMAN_POINTS  # a point the served run passes
            faults = {"ALFLOW_FAULT": point, "ALFLOW_FAULT_HOLD": str(hold)} if served else {}
            serve, log = processes.start(f"serve-{step}", command, env=dict(processes.env, **faults))
            if suspended is not None:
                resumed = runner.invoke(app, ["resume", "--config", str(config)])
                assert resumed.exit_code == 0, resumed.output
                run, suspended = suspended, None
            else:
                run = start_cycle(name, config, auto=not human)
            outcome["runs"] += 1
            if point in HUMAN_POINTS:  # the run waits for review, no process of it left
                store = store_of(config)
                batch = wait_offered(store, serve, log)
                # Its process exits a few seconds after it suspends: a SIGTERM before that, and
                # Prefect's runner cancels the run with the rest of its processes.
                owner = store.batch(batch)["owner"]
                assert wait_gone(owner), f"the suspended run's process {owner} still runs"
                stop_serving(serve, log)
                imported_after_a_stop(config, batch, point)
                outcome["stopped"].append(point)
                suspended = run
                continue
            if point is None:
                state = wait_run(run)
                assert state.is_completed(), f"{state.name}: {state.message}\n{log.read_text(errors='replace')[-3000:]}"
                break
            ended = held_or_ended(hold, run, serve, log)
            assert ended is None, f"the run ended {ended.name}, not stopped at {point}: {ended.message}"
            stop_serving(serve, log)  # while its run stands at the point
            outcome["stopped"].append(point)
            outcome["stopped_runs"].append(wait_run(run, timeout=60).name)  # Prefect's runner ended it
    except AssertionError as exc:
        outcome["error"] = str(exc)
        return outcome
    finally:
        processes.stop_all()
    return judged(outcome, config, reference, cycle, human)


def stop_serving(serve: subprocess.Popen, log: Path) -> None:
    """SIGTERM to `alflow serve` (as a service manager stops it); it has stopped on return."""
    serve.send_signal(signal.SIGTERM)
    try:
        serve.wait(90)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`alflow serve` did not stop:\n{log.read_text(errors='replace')[-3000:]}") from None


def judged(outcome: dict, config: Path, reference: dict, cycle: int = 2, human: bool = False) -> dict:
    """``outcome`` with the store of ``config``, whose runs began from the snapshot (cycle 2)
    or from nothing (cycle 1), compared with the fault-free run after ``cycle`` (as a
    person's review compares, ``human``), and its defects (the artifacts of the cycle its
    runs published included)."""
    if human:
        expected = content_as_human(reference)
    else:
        expected = second_cycle(reference) if cycle == 2 else reference["content"][1]
    outcome["differences"] = differences(content(config, human_batches=int(human)), expected)
    outcome["defects"] = defects(config) + artifacts_of(config, [cycle])
    return outcome


def worker_killed(reference: dict, point: str) -> dict:
    """A process worker, its run standing at ``point``: both killed (SIGKILL); a new worker's
    next run finishes the cycle. The killed run stays Running in Prefect: nobody is left to
    say otherwise."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.types.entrypoint import EntrypointType
    from test_browser import Processes

    from alflow.flows.cycle import active_learning_cycle

    config = project(reference["home"] / f"worker-{point}", reference["corpus"], reference["snapshot"])
    hold = config.parent / "stopped-at"
    pool = f"faults-{point}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    deployment = active_learning_cycle.to_deployment(name=f"worker-{point}", entrypoint_type=EntrypointType.MODULE_PATH)
    deployment.apply(work_pool_name=pool)
    name = f"active-learning-cycle/worker-{point}"
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "worker", "start", "--pool", pool]
    processes = Processes(config.parent, environment(PREFECT_WORKER_QUERY_SECONDS="1"))
    outcome = {"points": [point], "stopped": [], "runs": 2}
    try:
        worker, log = processes.start("worker", command, env=dict(processes.env, ALFLOW_FAULT=point,
                                                                  ALFLOW_FAULT_HOLD=str(hold)))
        start_cycle(name, config)
        flow_pid = int(wait_file(hold, worker, log).split()[1])
        os.killpg(worker.pid, signal.SIGKILL)  # the worker, and its run wherever it is
        os.kill(flow_pid, signal.SIGKILL)
        worker.wait(30)
        outcome["stopped"].append(point)
        again, log = processes.start("worker-again", command)
        state = wait_run(start_cycle(name, config))
        assert state.is_completed(), f"{state.name}: {state.message}\n{log.read_text(errors='replace')[-3000:]}"
    except AssertionError as exc:
        outcome["error"] = str(exc)
        return outcome
    finally:
        processes.stop_all()
    return judged(outcome, config, reference)


@pytest.mark.slow
def test_fault_matrix_through_serve_and_a_worker(reference):
    """SIGTERM to `alflow serve` while its run stands at each fault point (finding 1: right
    after the retrain and the cycle row, the run ended Cancelled with its cycle half
    recorded), in the chains of SERVE_CHAINS, and while its run waits for a person whose
    `alflow import` is stopped mid-import; a process worker killed with its run between
    publishing the learning curve and recording it. Each stopped run ends Cancelled or
    Crashed; served again (a new worker), the next run finishes what it left: the
    reference's content, nothing doubled or orphaned, the artifacts once. Slow: 13
    `alflow serve` and 16 runs, ~140 CPU-s; 127 s alone on 2 cores shared with other jobs."""
    with ThreadPoolExecutor(len(SERVE_CHAINS) + len(WORKER_POINTS) + 1) as pool:
        pool.submit(second_cycle, reference)  # the fault-free cycle 2, beside the others
        jobs = [pool.submit(served_chain, reference, from_snapshot, points) for from_snapshot, points in SERVE_CHAINS]
        jobs += [pool.submit(worker_killed, reference, point) for point in WORKER_POINTS]
        outcomes = [job.result() for job in jobs]
    failures = report(outcomes, "alflow serve and a worker")
    assert sorted(p for o in outcomes for p in o["stopped"]) == sorted(SERVE_POINTS + WORKER_POINTS), \
        "\n".join(failures)
    assert failures == [], "\n".join(failures)
    ended = [state for o in outcomes for state in o.get("stopped_runs", [])]
    assert set(ended) <= {"Cancelled", "Crashed"}, ended
