"""Named locks held across transactions: one cycle at a time per database.

A lock is a row of ``locks`` (name, owner host:pid, flow_run_id, acquired_at, expires_at)
and a lease: its holder moves ``expires_at`` forward while it works (a daemon thread, every
third of the lease, started by :meth:`LockStore.acquire_lock` and stopped by
:meth:`LockStore.release_lock`), so a holder that stops renewing (killed, its host down,
frozen) loses it when the lease runs out, wherever it ran. A holder whose process ended on
this host, or that the caller's ``is_stale`` says has ended, is taken over at once.

Taking a lock is one transaction that finds the name free, or its holder's row unchanged
since it was judged gone. A holder is one flow run in one process, so two cycles in the
same process (threads) exclude each other too.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from alflow.tasks.store.batches import owner_gone, process_owner
from alflow.tasks.store.database import Database, StoreError, utcnow

# Long enough to ride out a renewal that waits on another process holding the database
# file (store.lock_timeout_seconds, 30 s by default), short enough that a dead holder
# delays the next cycle by minutes, not forever.
DEFAULT_LEASE_SECONDS = 120.0
_COLUMNS = "owner, flow_run_id, acquired_at, expires_at"

_log = logging.getLogger(__name__)


class LockHeldError(StoreError):
    """The lock stayed with another holder for longer than the caller would wait."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def describe_holder(holder: dict) -> str:
    """'run 0895bb6b-... (host:1234) since 2026-01-02 06:00:01 UTC, lease until 06:02:01 UTC'."""
    run = f"run {holder['flow_run_id']}" if holder.get("flow_run_id") else "a run outside Prefect"
    lease = f", lease until {holder['expires_at']:%H:%M:%S} UTC" if holder.get("expires_at") else ""
    return f"{run} ({holder['owner']}) since {str(holder['acquired_at'])[:19]} UTC{lease}"


def lease_end(holder: dict, lease_seconds: float) -> datetime:
    """When ``holder``'s lease runs out; a row from before leases counts from acquired_at."""
    return holder.get("expires_at") or holder["acquired_at"] + timedelta(seconds=lease_seconds)


def _holder(name: str, row) -> dict | None:
    if row is None:
        return None
    return {"name": name, "owner": row[0], "flow_run_id": row[1], "acquired_at": row[2], "expires_at": row[3]}


def _judged(holder: dict) -> tuple:
    """What must not have changed between judging a holder gone and replacing it: a renewal
    moves expires_at, so a holder that renewed meanwhile keeps its lock."""
    return holder["owner"], holder["flow_run_id"], holder["acquired_at"], holder["expires_at"]


class LockStore(Database):
    """Named locks (mixed into :class:`alflow.tasks.store.Store`)."""

    def lock_holder(self, name: str) -> dict | None:
        """The holder's row (name, owner, flow_run_id, acquired_at, expires_at), or None when free."""
        with self.connect() as con:
            row = con.execute(f"SELECT {_COLUMNS} FROM locks WHERE name = ?", [name]).fetchone()
        return _holder(name, row)

    def try_lock(self, name: str, flow_run_id: str | None,
                 is_stale: Callable[[dict], bool] | None = None,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 on_takeover: Callable[[dict, str], None] | None = None) -> dict | None:
        """Take ``name`` for this process and ``flow_run_id`` for ``lease_seconds``; None
        when taken, else the live holder's row.

        The row is inserted when the name is free, or replaced when its holder is this same
        holder, its lease has run out, its process is gone (:func:`owner_gone`) or
        ``is_stale(row)`` says its flow run has ended; ``on_takeover(row, why)`` is then
        called with the holder replaced. ``is_stale`` runs outside the transaction (it may
        ask a server); the replacement only happens if the row is still the one judged.
        """
        owner = process_owner()
        holder = self.lock_holder(name)
        mine = holder is not None and holder["owner"] == owner and holder["flow_run_id"] == flow_run_id
        why = None if holder is None or mine else _takeover_reason(holder, lease_seconds, is_stale)
        if holder is not None and not mine and why is None:
            return holder
        with self.transaction() as con:
            current = _holder(name, con.execute(f"SELECT {_COLUMNS} FROM locks WHERE name = ?", [name]).fetchone())
            ours = current is not None and current["owner"] == owner and current["flow_run_id"] == flow_run_id
            if current is not None and not ours and (holder is None or _judged(current) != _judged(holder)):
                return current  # taken, or renewed, since it was judged
            now = utcnow()
            con.execute("DELETE FROM locks WHERE name = ?", [name])
            con.execute("INSERT INTO locks (name, owner, flow_run_id, acquired_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                        [name, owner, flow_run_id, now, now + timedelta(seconds=lease_seconds)])
        if why is not None and on_takeover is not None:
            on_takeover(holder, why)
        return None

    def renew_lock(self, name: str, flow_run_id: str | None, lease_seconds: float) -> bool:
        """Move this holder's lease to ``lease_seconds`` from now; False if it no longer holds ``name``."""
        with self.transaction() as con:
            renewed = con.execute(
                "UPDATE locks SET expires_at = ? WHERE name = ? AND owner = ? "
                "AND flow_run_id IS NOT DISTINCT FROM ? RETURNING name",
                [utcnow() + timedelta(seconds=lease_seconds), name, process_owner(), flow_run_id],
            ).fetchall()
        return bool(renewed)

    def release_lock(self, name: str, flow_run_id: str | None) -> bool:
        """Stop renewing ``name`` and release it if this process holds it for
        ``flow_run_id``; True if it did."""
        with _renewers_guard:
            renewer = _renewers.pop(self._renewer_key(name, flow_run_id), None)
        if renewer is not None:
            renewer.stopped.set()
        with self.transaction() as con:
            released = con.execute(
                "DELETE FROM locks WHERE name = ? AND owner = ? AND flow_run_id IS NOT DISTINCT FROM ? "
                "RETURNING name", [name, process_owner(), flow_run_id]
            ).fetchall()
        return bool(released)

    def acquire_lock(self, name: str, flow_run_id: str | None, timeout: float, poll: float = 1.0,
                     is_stale: Callable[[dict], bool] | None = None,
                     on_wait: Callable[[dict], None] | None = None,
                     lease_seconds: float = DEFAULT_LEASE_SECONDS,
                     on_takeover: Callable[[dict, str], None] | None = None) -> None:
        """:meth:`try_lock` until it is taken, for ``timeout`` seconds at most (``on_wait(holder)``
        is called once when waiting starts); then :class:`LockHeldError` naming the holder.
        Once taken, the lease is renewed every ``lease_seconds / 3`` in a daemon thread
        until :meth:`release_lock`, which the caller calls on every way out."""
        deadline = time.monotonic() + timeout
        waited = False
        while (holder := self.try_lock(name, flow_run_id, is_stale, lease_seconds, on_takeover)) is not None:
            if time.monotonic() >= deadline:
                raise LockHeldError(f"the '{name}' lock is held by {describe_holder(holder)}", holder)
            if not waited and on_wait is not None:
                on_wait(holder)
            waited = True
            time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
        self._keep_renewing(name, flow_run_id, lease_seconds)

    def _renewer_key(self, name: str, flow_run_id: str | None) -> tuple:
        return str(Path(self.path).resolve()), name, flow_run_id

    def _keep_renewing(self, name: str, flow_run_id: str | None, lease_seconds: float) -> None:
        key = self._renewer_key(name, flow_run_id)
        with _renewers_guard:
            running = _renewers.get(key)
            if running is None or not running.is_alive():  # taken again by its holder: one renewer
                _renewers[key] = _Renewer(self, name, flow_run_id, lease_seconds)
                _renewers[key].start()


def _takeover_reason(holder: dict, lease_seconds: float, is_stale: Callable[[dict], bool] | None) -> str | None:
    """Why another holder's lock may be taken over, or None while it holds it."""
    if lease_end(holder, lease_seconds) <= utcnow():
        return "its lease ran out without being renewed"
    if owner_gone(holder["owner"]):
        return "its process is gone"
    if is_stale is not None and is_stale(holder):
        return "its flow run has ended"
    return None


class _Renewer(threading.Thread):
    """Moves one held lock's lease forward every third of it, until ``stopped``."""

    def __init__(self, store: LockStore, name: str, flow_run_id: str | None, lease_seconds: float):
        super().__init__(name=f"lease-{name}-{flow_run_id}", daemon=True)
        self.store = store
        self.lock_name = name
        self.flow_run_id = flow_run_id
        self.lease_seconds = lease_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3):
            try:
                renewed = self.store.renew_lock(self.lock_name, self.flow_run_id, self.lease_seconds)
            except Exception as exc:  # noqa: BLE001 - e.g. the file held by another process: retry next time
                _log.warning(f"could not renew the '{self.lock_name}' lock lease: {exc}")
                continue
            if not renewed and not self.stopped.is_set():
                now = self.store.lock_holder(self.lock_name)
                _log.error(f"lost the '{self.lock_name}' lock of run {self.flow_run_id}: its lease ran out before "
                           f"it was renewed; now {'held by ' + describe_holder(now) if now else 'free'}")
                return


# The renewing threads of the locks this process holds, by (database, name, flow run).
_renewers: dict[tuple, _Renewer] = {}
_renewers_guard = threading.Lock()
