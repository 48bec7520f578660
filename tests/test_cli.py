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
    assert set(report) == {"items", "pool", "labeled", "skipped", "held_out", "models", "waiting", "cycles",
                           "control", "label_flags", "stopping", "agreement"}
    assert report["agreement"]["items_overlapping"] == 0 and report["agreement"]["kappa"] is None
    assert (report["items"], report["pool"], report["held_out"], report["labeled"]) == (5160, 4128, 1012, 0)
    assert report["waiting"] == [{"batch_id": batch_id, "flow_run_id": None, "size": 20, "answered": 0, "url": None}]
    assert report["cycles"] == [{"cycle": 1, "n_labels": 0, "accuracy": None, "macro_f1": None, "model_version": None,
                                 "promoted": False, "strategy": "cold-start:coverage", "timings": None,
                                 "control_accuracy": None, "control_low": None, "control_high": None,
                                 "stop_kappa": None}]
    assert report["control"] == {"n": 0, "correct": 0, "accuracy": None, "low": None, "high": None, "models": []}
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
        again = subprocess.run(command + ["start", "--config", str(config)], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert "already running" in again.stdout
    finally:
        stopped = subprocess.run(command + ["stop", "--config", str(config)], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
    assert "Stopped the Prefect server" in stopped.stdout


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
