"""The `alflow` command: errors, status, init, import checks, server bootstrap, deployments."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMS_CSV, copy_repo_config, write_config
from typer.testing import CliRunner

from alflow.flows.cli import app
from alflow.tasks.store import Store

runner = CliRunner()


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_missing_config_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(runner.invoke(app, ["status"]))
    assert "alflow.toml" in line and "not found" in line and "alflow init" in line


def test_bad_config_value_names_the_key(tmp_path):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    config.write_text(config.read_text().replace("batch_size = 20", "batch_size = 0"))
    line = one_line_error(runner.invoke(app, ["run", "--config", str(config), "--auto"]))
    assert "query.batch_size" in line and str(config) in line
    assert not (tmp_path / "state").exists()  # validated before anything was written


@pytest.mark.parametrize("line, key", [
    ("self_training = -1", "model.self_training"),
    ('self_training = "lots"', "model.self_training"),
    ("self_training = true", "model.self_training"),
    ("self_training = 11", "model.self_training"),
    ("self_training_sample = 0", "model.self_training_sample"),
])
def test_bad_self_training_names_the_key(tmp_path, line, key):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV, extra=f"\n[model]\n{line}\n")
    error = one_line_error(runner.invoke(app, ["run", "--config", str(config), "--auto"]))
    assert key in error and str(config) in error
    assert not (tmp_path / "state").exists()  # validated before anything was written


def test_env_override_error_names_the_variable(tmp_path, monkeypatch):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    monkeypatch.setenv("ALFLOW_QUERY__STRATEGY", "smartest")
    line = one_line_error(runner.invoke(app, ["status", "--config", str(config)]))
    assert "ALFLOW_QUERY__STRATEGY" in line and "query.strategy" in line


def test_missing_source_file_is_one_line(tmp_path, prefect_api):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=tmp_path / "nope.csv")
    line = one_line_error(runner.invoke(app, ["ingest", "--config", str(config)]))
    assert "source corpus" in line and "nope.csv" in line and "does not exist" in line


def test_ingest_twice_counts_duplicates(tmp_path, prefect_api):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    first = runner.invoke(app, ["ingest", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert "5574 read, 5160 new, 414 duplicates" in first.output
    second = runner.invoke(app, ["ingest", "--config", str(config)])
    assert "5574 read, 0 new, 5574 duplicates" in second.output
    store = Store(tmp_path / "state" / "alflow.duckdb")
    assert store.scalar("SELECT count(*) FROM items") == 5160
    # the re-run of the unchanged file wrote no item, only its ingests row
    assert store.scalar("SELECT count(DISTINCT ingest_run) FROM items") == 1
    assert store.query_df("SELECT n_read, n_new, n_duplicate FROM ingests ORDER BY started_at").values.tolist() == \
        [[5574, 5160, 414], [5574, 0, 5574]]


def _open_batch(config: Path) -> tuple[Store, str]:
    """A batch recorded by the query step, without a flow run (for file-checking tests)."""
    from alflow.config import load_config
    from alflow.tasks.ingest import ingest_source
    from alflow.tasks.query import query_batch

    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    ingest_source(settings, "corpus", "ingest-1")  # the plain step: `alflow ingest` needs a Prefect API
    return store, query_batch(store, settings, None, flow_run_id=None)


def test_import_rejects_a_bad_file_and_writes_nothing(tmp_path):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    store, batch_id = _open_batch(config)
    items = store.batch_items(batch_id)
    good = items["item_id"].tolist()
    path = tmp_path / "answers.jsonl"
    lines = [f'{{"item_id": "{good[0]}", "label": "ham"}}', f'{{"item_id": "{good[1]}", "label": "eggs"}}']
    path.write_text("\n".join(lines) + "\n")
    line = one_line_error(runner.invoke(app, ["import", str(path), "--config", str(config)]))
    assert "answers.jsonl line 2" in line and "'eggs'" in line
    assert store.scalar("SELECT count(*) FROM labels") == 0  # the good first row was not kept either

    path.write_text(f'{{"item_id": "{good[0]}", "label": "ham"}}\n{{"item_id": "deadbeef", "label": "ham"}}\n')
    line = one_line_error(runner.invoke(app, ["import", str(path), "--config", str(config)]))
    assert "line 2" in line and "deadbeef" in line and batch_id in line

    path.write_text(f'{{"item_id": "{good[0]}", "label": "ham"}}\n{{"item_id": "{good[0]}", "label": "spam"}}\n')
    line = one_line_error(runner.invoke(app, ["import", str(path), "--config", str(config)]))
    assert "answered again" in line and "line 1" in line
    assert store.scalar("SELECT count(*) FROM labels") == 0


def test_export_jsonl_round_trip_and_correction(tmp_path):
    """Export as JSONL, import; a changed answer later is a correction (new row), not an overwrite."""
    import json

    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    store, batch_id = _open_batch(config)
    out = tmp_path / "batch.jsonl"
    result = runner.invoke(app, ["export", str(out), "--config", str(config), "--blank"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rank"] for r in rows] == list(range(1, 21)) and all(r["label"] == "" for r in rows)
    rows[0]["label"], rows[1]["label"] = "spam", "skip"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["import", str(out), "--config", str(config), "-a", "bo"])
    assert "2 new" in result.output and "18 rows had no label" in result.output
    rows[0]["label"] = "ham"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["import", str(out), "--config", str(config), "-a", "bo"])
    assert "0 new, 1 corrections, 1 already recorded" in result.output
    history = store.query_df("SELECT label FROM labels WHERE item_id = ? ORDER BY label_id", [rows[0]["item_id"]])
    assert list(history["label"]) == ["spam", "ham"]
    effective = store.query_df("SELECT label FROM effective_labels WHERE item_id = ?", [rows[0]["item_id"]])
    assert effective["label"].item() == "ham"


def test_status_lists_waiting_batches_and_counts(tmp_path):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    _, batch_id = _open_batch(config)
    result = runner.invoke(app, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "items: 5160" in result.output and "labeled: 0" in result.output
    assert batch_id in result.output and "cycles: none yet" in result.output


def test_status_json_has_the_named_keys(tmp_path):
    """`alflow status --json`: one object with exactly the documented keys (no schedules
    without a Prefect API), a waiting batch and the learning curve as plain values."""
    import json

    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    store, batch_id = _open_batch(config)
    store.record_cycle(None, None, None, "cold-start:coverage", 0, None, False)
    result = runner.invoke(app, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == {"items", "pool", "labeled", "adjudicated", "tied", "skipped", "held_out", "models",
                           "waiting", "cycles",
                           "control", "label_flags", "stopping", "agreement"}
    assert report["agreement"]["items_overlapping"] == 0 and report["agreement"]["kappa"] is None
    assert (report["items"], report["pool"], report["held_out"], report["labeled"]) == (5160, 4128, 1012, 0)
    assert report["waiting"] == [{"batch_id": batch_id, "flow_run_id": None, "size": 20, "answered": 0, "url": None}]
    assert report["cycles"] == [{"cycle": 1, "n_labels": 0, "accuracy": None, "macro_f1": None, "model_version": None,
                                 "promoted": False, "strategy": "cold-start:coverage", "timings": None,
                                 "control_accuracy": None, "control_low": None, "control_high": None,
                                 "stop_kappa": None}]
    assert report["control"] == {"model_version": None, "n": 0, "correct": 0, "accuracy": None, "low": None,
                                 "high": None, "metric": "accuracy", "note": None, "value": None, "value_low": None,
                                 "value_high": None}
    assert report["label_flags"] == {"model_version": None, "count": 0, "open": []}
    assert report["stopping"]["fired"] is None
    assert [r["rule"] for r in report["stopping"]["rules"]] == ["budget", "budget_minutes", "target", "stabilizing"]


def test_init_writes_a_config_that_loads(tmp_path):
    from alflow.config import load_config

    result = runner.invoke(app, ["init", str(tmp_path)])
    assert result.exit_code == 0, result.output
    settings = load_config(tmp_path / "alflow.toml")
    assert settings.labels == ["ham", "spam"] and settings.sources[0].path == SMS_CSV
    assert "exists" in one_line_error(runner.invoke(app, ["init", str(tmp_path)]))


def test_shipped_config_is_valid(tmp_path):
    from alflow.config import load_config

    settings = load_config(copy_repo_config(tmp_path))
    assert settings.query.strategy == "margin" and settings.evaluation.method == "holdout"
    assert load_config(REPO / "alflow.toml").sources[0].path == SMS_CSV


def test_deployment_entrypoints_load():
    """deployments/prefect.yaml names flows that exist, with parameters they accept."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        entry = deployment["entrypoint"]
        assert entry.startswith("flows/")
        flow = load_flow_from_entrypoint(str(REPO / entry.split(":")[0]) + ":" + entry.split(":")[1])
        accepted = set(flow.parameters.properties)
        assert set(deployment["parameters"]) <= accepted, (entry, deployment["parameters"])
        assert deployment["schedules"]


def test_unreachable_remote_api_is_a_clear_error(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    with temporary_settings(updates={PREFECT_API_URL: "http://10.255.255.1:9/api"}):
        line = one_line_error(runner.invoke(app, ["run", "--config", str(config)]))
    assert "PREFECT_API_URL=http://10.255.255.1:9/api does not answer" in line


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_server_start_and_stop(tmp_path):
    """`alflow server start` launches `prefect server start` on 127.0.0.1 when the API does
    not answer (what `alflow run` does first), says where its log is; `stop` ends it."""
    import httpx

    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    command = [sys.executable, "-m", "alflow.flows.cli", "server"]
    try:
        started = subprocess.run(command + ["start", "--config", str(config)], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr
        assert f"Prefect UI: http://127.0.0.1:{port}" in started.stdout
        assert "prefect-server.log" in started.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200
        served = httpx.get(f"http://127.0.0.1:{port}/api/admin/settings", timeout=5).json()["server"]
        # no telemetry heartbeat, no analytics in the UI, no promotional content in it
        assert served["analytics_enabled"] is False and served["ui"]["show_promotional_content"] is False
        again = subprocess.run(command + ["start", "--config", str(config)], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert "already running" in again.stdout
    finally:
        stopped = subprocess.run(command + ["stop", "--config", str(config)], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
    assert "Stopped the Prefect server" in stopped.stdout
    # With analytics on, the server posts its first heartbeat as it starts; offline, that logs
    # "Failed to send telemetry".
    assert "telemetry" not in (tmp_path / "state" / "prefect-server.log").read_text().lower()


def test_the_prefect_server_alflow_starts_and_the_cli_send_no_telemetry(tmp_path, monkeypatch):
    """By Prefect's own reading of the environment: the server `alflow` launches has its
    telemetry heartbeat, the UI's analytics and promotional content off, and the SDK in
    the `alflow` process itself sends no usage events."""
    from alflow.flows import prefect_server

    launched = {}

    class Exited:
        pid, returncode = 0, 1

        def poll(self):
            return 1

    def popen(command, **kwargs):
        launched.update(command=command, env=kwargs["env"])
        return Exited()

    with monkeypatch.context() as patched:
        patched.setattr(prefect_server.subprocess, "Popen", popen)
        with pytest.raises(prefect_server.ServerError, match="exited with code 1"):
            prefect_server.start_server(tmp_path, port=_free_port(), wait_seconds=5, echo=lambda message: None)
    assert launched["command"][-5:-2] == ["start", "--host", "127.0.0.1"]
    untold = {k: v for k, v in os.environ.items() if k not in prefect_server.NO_TELEMETRY}
    read_back = ("from prefect._internal.analytics import is_telemetry_enabled\n"
                 "from prefect.settings import get_current_settings\n"
                 "server = get_current_settings().server\n"
                 "print(server.analytics_enabled, server.ui.show_promotional_content, is_telemetry_enabled())\n")
    server = subprocess.run([sys.executable, "-c", read_back], env=dict(untold, **launched["env"]),
                            capture_output=True, text=True, timeout=120)
    assert server.stdout.split() == ["False", "False", "False"], server.stderr
    cli = subprocess.run([sys.executable, "-c", "import sys\nfrom alflow.flows import cli\nsys.argv = ['alflow', '--help']\n"
                          "try:\n    cli.main()\nexcept SystemExit:\n    pass\n" + read_back],
                         env=untold, capture_output=True, text=True, timeout=120)
    assert cli.stdout.split()[-3:] == ["False", "False", "False"], cli.stderr


def test_ingest_of_gold_labels_outside_labels_is_one_line_and_stores_nothing(tmp_path, prefect_api):
    """`0`/`1` labels against ham/spam: one line with the values and their counts, nothing
    stored; the same file with label_map ingests."""
    source = tmp_path / "binary.csv"
    source.write_text("text,label\n" + "".join(f"message {n},{n % 3 % 2}\n" for n in range(30)))
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=source)
    line = one_line_error(runner.invoke(app, ["ingest", "--config", str(config)]))
    assert line == ("error: source corpus: gold labels not in labels ['ham', 'spam']: '0' (20), '1' (10); "
                    "fix label_column or map them with label_map")
    store = Store(tmp_path / "state" / "alflow.duckdb")
    assert store.scalar("SELECT count(*) FROM items") == 0 and store.scalar("SELECT count(*) FROM ingests") == 0

    config.write_text(config.read_text() + 'label_map = { 0 = "ham", 1 = "spam" }\n')
    result = runner.invoke(app, ["ingest", "--config", str(config)])
    assert result.exit_code == 0 and "30 read, 30 new" in result.output, result.output
    assert store.scalar("SELECT count(*) FROM items WHERE gold_label = 'spam'") == 10


# -- `alflow run` failing: one line; the traceback in the log, or on the terminal with -v --------
def _alflow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `alflow` command in its own process (its stderr is what a user sees, Prefect's
    console logging included), on this session's Prefect test server."""
    from prefect.settings import get_current_settings

    env = dict(os.environ, PREFECT_API_URL=str(get_current_settings().api.url), **(env or {}))
    return subprocess.run([sys.executable, "-m", "alflow.flows.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # ~15 s: two `alflow run` processes
def test_a_failing_run_is_one_stderr_line_and_its_traceback_goes_to_the_log(tmp_path, prefect_api):
    """A source read with the wrong delimiter fails the cycle: stderr is the one line naming
    the cause and the key to set (Prefect's traceback and failure report go to the log
    file); with -v the traceback shows too."""
    source = tmp_path / "semi.csv"
    source.write_text("text;label\nhello;ham\nbye;spam\n", encoding="utf-8")
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=source)
    expected = ("error: source corpus: semi.csv has no column 'text' for text_column (columns: text;label); "
                "its header looks separated by ';', not ',': set delimiter = \";\"")

    quiet = _alflow("run", "--config", str(config), "--auto", "--no-progress")
    assert quiet.returncode == 1 and quiet.stderr.splitlines() == [expected], quiet.stderr
    log = tmp_path / "state" / "logs" / "run.log"
    assert "Traceback (most recent call last)" in log.read_text() and "IngestFailed" in log.read_text()
    assert "logs/run.log" in _alflow("run", "--help").stdout  # where to look, said in --help

    verbose = _alflow("run", "--config", str(config), "--auto", "--no-progress", "-v")
    assert verbose.returncode == 1 and verbose.stderr.strip().splitlines()[-1] == expected
    assert "Traceback (most recent call last)" in verbose.stderr


def _one_error_line(result) -> str:
    """The command failed with one error line, its last (Prefect's own progress and
    warning lines may come before it when they reach this runner)."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0], result.output
    assert "Traceback" not in result.output, result.output
    return errors[0]


def test_an_empty_source_warns_at_ingest_and_the_run_names_it(tmp_path, prefect_api):
    source = tmp_path / "empty.csv"
    source.write_text("", encoding="utf-8")
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=source)
    ingested = runner.invoke(app, ["ingest", "--config", str(config)])
    assert ingested.exit_code == 0, ingested.output
    assert "warning: corpus: 0 read, 0 new, 0 duplicates, 0 failed; the source is empty" in ingested.output
    line = _one_error_line(runner.invoke(app, ["run", "--config", str(config), "--auto", "--no-progress"]))
    assert line == "error: no item is stored, so nothing can be labeled: source corpus gave 0 records at the last ingest"


def test_undecodable_and_oversized_rows_are_counted_naming_their_keys(tmp_path, prefect_api):
    source = tmp_path / "latin.csv"
    source.write_bytes("text,label\nfine,ham\ncaf\u00e9 cr\u00e8me,spam\n".encode("latin-1")
                       + b"x" * 50 + b",ham\n")
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=source)
    config.write_text(config.read_text() + "max_text_chars = 40\n")
    result = runner.invoke(app, ["ingest", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert ("corpus: 1 read, 1 new, 0 duplicates, 2 failed (1 text longer than max_text_chars (40), "
            "1 undecodable as utf-8: set encoding)") in result.output
    config.write_text(config.read_text() + 'encoding = "latin-1"\n')
    result = runner.invoke(app, ["ingest", "--config", str(config)])
    assert "corpus: 2 read, 1 new, 1 duplicates, 1 failed (1 text longer than max_text_chars (40))" in result.output
    assert Store(tmp_path / "state" / "alflow.duckdb").scalar(
        "SELECT count(*) FROM items WHERE text = 'caf\u00e9 cr\u00e8me'") == 1


@pytest.fixture
def immutable():
    """chattr +i: a file even root cannot write (chmod does not stop root); undone after."""
    marked = []

    def mark(path: Path) -> None:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
        marked.append(path)

    yield mark
    for path in marked:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_database_is_one_line(tmp_path, immutable):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    database = tmp_path / "state" / "alflow.duckdb"
    Store(database).migrate()
    immutable(database)
    line = one_line_error(runner.invoke(app, ["run", "--config", str(config), "--auto"]))
    assert line.startswith(f"error: database {database} is read-only (IO Error: Cannot open file ")
    assert line.endswith("make the file and its folder writable, or set database to another path")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1.2 MB tmpfs: room for a new database's schema, not for the SMS corpus."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_nothing_is_half_written(tmp_path, prefect_api, tiny_disk):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    database = tiny_disk / "alflow.duckdb"
    config.write_text(config.read_text().replace('database = "state/alflow.duckdb"', f'database = "{database}"'))
    line = one_line_error(runner.invoke(app, ["ingest", "--config", str(config)]))
    assert line.startswith(f"error: source corpus: database {database}: the disk is full (")
    assert "No space left on device" in line and line.endswith("free some space and run again")
    store = Store(database)
    assert store.scalar("SELECT count(*) FROM items") == 0 and store.scalar("SELECT count(*) FROM ingests") == 0


# -- alflow label and alflow show (issue 22) ------------------------------------------------------
LONG_TEXT = " ".join(f"word{i}" for i in range(500))  # ~58 lines in an 80-column panel: 3 screens of 25


@pytest.fixture
def labeled_project(tmp_path):
    """(config, store, batch_id): three items with a title, a URL and pre-labels in an open
    batch, as a query with a model records them; the first item's text is 500 words long."""
    import csv

    import pandas as pd

    from alflow.config import load_config
    from alflow.tasks.ingest import ingest_source

    source = tmp_path / "messages.csv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("title", "text", "url", "label"),
                                      ("A long letter", LONG_TEXT, "https://example.org/letter", "ham"),
                                      ("", "win a prize now, call 0800 [1] *free*", "", "spam"),
                                      ("", "see you at lunch", "", "ham")])
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=source, title_column="title",
                          evaluation="cv")
    config.write_text(config.read_text() + 'url_column = "url"\n')
    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    ingest_source(settings, "corpus", "ingest-1")  # the plain step: `alflow ingest` needs a Prefect API
    ids = store.query_df("SELECT item_id FROM items ORDER BY length(text) DESC")["item_id"].tolist()
    picks = pd.DataFrame({"item_id": ids, "rank": [1, 2, 3], "score": 0.5, "prelabel": ["ham", "spam", "ham"],
                          "confidence": 0.7, "picked_by": "uncertainty"})
    return config, store, store.create_batch(None, "margin", 1, picks)


def panel_text(output: str) -> str:
    """What `alflow label` printed inside its panels, as one run of words (borders, the
    'more' hints and the panel titles taken out)."""
    kept = [line.strip("│ ") for line in output.splitlines()
            if line.startswith("│") and not line.startswith("-- Space")]
    return " ".join(" ".join(kept).split())


def test_label_shows_the_whole_text_a_screen_at_a_time_and_back_shows_the_answer(labeled_project, monkeypatch):
    """Item 1 (500 words, with a title and a URL) shows whole, wrapped, a screenful per
    Space; Enter accepts its pre-label. b goes back to it and shows that answer, which
    Enter keeps without saving it again; item 2 is corrected; the count is exact."""
    from alflow.flows import cli

    config, store, batch_id = labeled_project
    # an 80x25 terminal, whatever this process's streams are (under pytest-xdist none is one)
    monkeypatch.setattr(cli.console, "_width", 80)
    monkeypatch.setattr(cli.console, "_height", 25)
    keys = "  \r" + "b\r" + "1" + "q"  # more, more, accept; back, keep; item 2: ham; quit
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"], input=keys)
    assert result.exit_code == 0, result.output
    first_screen = result.output.split("-- Space: more", 1)[0]
    assert LONG_TEXT not in panel_text(first_screen)  # longer than the terminal: paged
    assert "-- Space: more (lines 1-21 of 59) --" in result.output
    assert f"A long letter {LONG_TEXT} https://example.org/letter" in panel_text(result.output)
    assert "#1 · corpus · pre-label ham (70%)" in result.output
    assert "Your answer: ham (Enter keeps it" in result.output and "-> ham (unchanged)" in result.output
    assert "win a prize now, call 0800 [1] *free*" in result.output  # markup shown as typed
    assert result.output.rstrip().endswith("Stopped; 2 answers saved.")
    rows = store.query_df("SELECT label, origin, prelabel_shown FROM labels ORDER BY label_id")
    assert rows.values.tolist() == [["ham", "cli", "ham"], ["ham", "cli", "spam"]]


def test_show_lists_every_item_with_its_answers_and_effective_label(labeled_project, monkeypatch):
    """`alflow show` by id, prefix or 'latest': each item, each answer (annotator, origin,
    time, pre-label shown, replaced or not) and the effective label from the store's view;
    --json the same with the whole text; a bad or ambiguous id is one line naming it."""
    import json
    import uuid

    config, store, batch_id = labeled_project
    # item 1: Enter (its pre-label); item 2: '2' (spam), back, '1' (ham: a correction); item 3 left
    runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"], input="\r2b1q")

    text = runner.invoke(app, ["show", batch_id[:5], "--config", str(config)])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].startswith(f"Batch {batch_id}: open, 3 items; margin, model v1; created ")
    assert lines[1] == "2 answers, 1 kept the pre-label, 1 changed it (from the terminal)"
    assert lines[2] == "#1 · corpus · picked by uncertainty · model's pre-label ham (70%) · effective label: ham"
    assert lines[3].startswith("  A long letter — word0 word1") and lines[3].endswith("…")
    assert lines[4].startswith("  ana: ham, from the terminal, ") and lines[4].endswith(" UTC, shown the pre-label ham")
    assert lines[5].endswith("effective label: ham")  # item 2: ana's 'spam' replaced by 'ham'
    assert lines[7].startswith("  ana: spam, from the terminal, ") and lines[7].endswith(
        ", shown the pre-label spam (replaced by a later answer)")
    assert lines[8].startswith("  ana: ham, ") and "replaced" not in lines[8]
    assert lines[9].endswith("effective label: none yet: in a batch waiting for review")  # item 3
    assert lines[11] == "  no answer in this batch"

    shown = json.loads(runner.invoke(app, ["show", "latest", "--config", str(config), "--json"]).output)
    assert shown["batch_id"] == batch_id and shown["size"] == "3 items" and shown["model_version"] == 1
    first, second, third = shown["items"]
    assert first["text"] == LONG_TEXT and first["title"] == "A long letter" and first["url"] == "https://example.org/letter"
    assert [(a["annotator"], a["label"], a["origin"], a["prelabel_shown"], a["current"]) for a in second["answers"]] == [
        ("ana", "spam", "cli", "spam", False), ("ana", "ham", "cli", "spam", True)]
    effective = dict(store.query_df("SELECT item_id, label FROM effective_labels").values.tolist())
    assert [i["effective_label"] for i in shown["items"]] == [effective.get(i["item_id"]) for i in shown["items"]]
    assert third["answers"] == [] and third["effective_label"] is None and third["state"] == "open_batch"

    assert one_line_error(runner.invoke(app, ["show", "nope", "--config", str(config)])) == \
        "error: batch nope does not exist (`alflow show latest` shows the newest batch)"
    store.close_batch(batch_id, "labeled")  # its items may be asked again
    fixed = iter([uuid.UUID("abc10000" + "0" * 24), uuid.UUID("abc20000" + "0" * 24)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(fixed))
    ids = store.query_df("SELECT item_id FROM items")["item_id"].tolist()
    import pandas as pd

    for item_id in ids[:2]:  # two more batches whose ids share the prefix 'abc'
        store.create_batch(None, "margin", 1, pd.DataFrame({"item_id": [item_id], "rank": [1], "score": 0.5,
                                                            "prelabel": "ham", "confidence": 0.7,
                                                            "picked_by": "recheck"}))
    assert one_line_error(runner.invoke(app, ["show", "abc", "--config", str(config)])) == \
        "error: batch abc is ambiguous: 2 batches start with it (abc100000000, abc200000000); give more of the id"
    latest = runner.invoke(app, ["show", "latest", "--config", str(config)])
    assert latest.output.startswith("Batch abc200000000: open, 1 item (1 of them a recheck); margin, model v1")


def test_help_shows_bracketed_config_tables():
    """Rich markup must not eat `[model]` and `[query]` in `alflow simulate --help`."""
    result = runner.invoke(app, ["simulate", "--help"])
    words = [word for word in result.output.split() if word != "│"]  # the box around the options
    assert result.exit_code == 0 and "Take [model] and [query] from this file" in " ".join(words)
