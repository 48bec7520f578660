"""The cycle lock is a lease: a holder that stops renewing it is taken over once it runs out,
on whatever host it ran; a holder that renews keeps it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
from conftest import REPO, write_config
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app, run_log_path
from alflow.tasks.store import Store, process_owner, utcnow

runner = CliRunner()


def other_host_row(store: Store, flow_run_id: str, expires_in: float | None, acquired_ago: float = 0.0) -> None:
    """The row a process on another host writes when it takes the cycle lock (expires_in
    None: a row written before leases existed)."""
    now = utcnow()
    expires = None if expires_in is None else now + timedelta(seconds=expires_in)
    with store.transaction() as con:
        con.execute("INSERT INTO locks (name, owner, flow_run_id, acquired_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                    ["cycle", "elsewhere:4242", flow_run_id, now - timedelta(seconds=acquired_ago), expires])


def test_a_lease_that_ran_out_is_taken_over_whoever_held_it(tmp_path):
    """A PID on another host cannot be checked: its lock goes once its lease runs out, not
    before; a row from before leases counts its lease from acquired_at."""
    store = Store(tmp_path / "a.duckdb")
    store.migrate()
    taken = []
    other_host_row(store, "far-run", expires_in=30)
    assert store.try_lock("cycle", "mine", on_takeover=lambda *a: taken.append(a))["owner"] == "elsewhere:4242"
    with store.transaction() as con:
        con.execute("UPDATE locks SET expires_at = ? WHERE name = 'cycle'", [utcnow() - timedelta(seconds=1)])
    assert store.try_lock("cycle", "mine", on_takeover=lambda *a: taken.append(a)) is None
    [(holder, why)] = taken
    assert holder["owner"] == "elsewhere:4242" and holder["flow_run_id"] == "far-run"
    assert why == "its lease ran out without being renewed"
    mine = store.lock_holder("cycle")
    assert mine["owner"] == process_owner() and mine["expires_at"] > utcnow() + timedelta(seconds=100)
    assert store.release_lock("cycle", "mine")

    other_host_row(store, "old-run", expires_in=None, acquired_ago=60)  # written before leases
    assert store.try_lock("cycle", "mine", lease_seconds=120)["flow_run_id"] == "old-run"
    assert store.try_lock("cycle", "mine", lease_seconds=30) is None  # 60 s ago + 30 s: ran out
    store.release_lock("cycle", "mine")


def test_the_holder_renews_its_lease_until_it_releases(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    store.migrate()
    store.acquire_lock("cycle", "run-1", timeout=1, lease_seconds=0.6)
    first = store.lock_holder("cycle")["expires_at"]
    time.sleep(1.5)  # two and a half leases: held only if it was renewed
    holder = store.lock_holder("cycle")
    assert holder["flow_run_id"] == "run-1" and holder["expires_at"] > first
    assert store.try_lock("cycle", "run-2", lease_seconds=0.6)["flow_run_id"] == "run-1"
    assert store.release_lock("cycle", "run-1") and store.lock_holder("cycle") is None
    time.sleep(0.5)  # its renewer stopped: it does not bring the row back
    assert store.lock_holder("cycle") is None


# A process on another host (its hostname faked) that takes the cycle lock the way a cycle
# does and keeps renewing it until it is killed.
HOLDER = textwrap.dedent("""
    import socket, sys, time
    socket.gethostname = lambda: "other-host"
    from alflow.tasks.store import Store
    store = Store(sys.argv[1])
    store.acquire_lock("cycle", "far-run", timeout=30, lease_seconds=float(sys.argv[2]))
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow  # ~15 s: two cycles and the waits
@pytest.mark.usefixtures("prefect_api")
def test_alflow_run_waits_for_a_renewing_holder_and_takes_over_once_it_stops(tmp_path, small_csv):
    """A cycle on another host that renews its 1 s lease keeps the lock past 3 s of waiting
    (`alflow run` ends busy naming it); killed, it stops renewing, and the next `alflow run`
    takes the lock over once the lease runs out and logs whose it was."""
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=small_csv, batch_size=5,
                          extra="\n[store]\nlease_seconds = 1\ncycle_lock_timeout_seconds = 3\n")
    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(settings.database), "1"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = runner.invoke(app, ["run", "--config", str(config), "--auto", "--no-progress"])
        assert busy.exit_code == 1, busy.output
        assert f"run far-run (other-host:{holder.pid})" in busy.output and "busy for 3 s" in busy.output
        assert store.lock_holder("cycle")["owner"] == f"other-host:{holder.pid}"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)

    done = runner.invoke(app, ["run", "--config", str(config), "--auto", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert store.scalar("SELECT count(*) FROM labels") == 5 and store.lock_holder("cycle") is None
    log = run_log_path(settings).read_text()
    assert f"took over the cycle lock from run far-run (other-host:{holder.pid}) since " in log
    assert "its lease ran out without being renewed" in log
