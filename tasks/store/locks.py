"""Named locks held across transactions: one cycle at a time per database.

A lock is a row of ``locks`` (name, owner host:pid, flow_run_id, acquired_at). It is taken
in one transaction that finds the name free, or held by a holder that is gone (its process
ended on this host, or the caller's ``is_stale`` says so, e.g. its flow run has ended), and
released by deleting the row. A holder is one flow run in one process, so two cycles in
the same process (threads) exclude each other too.
"""

from __future__ import annotations

import time
from typing import Callable

from alflow.tasks.store.batches import owner_gone, process_owner
from alflow.tasks.store.database import Database, StoreError, utcnow


class LockHeldError(StoreError):
    """The lock stayed with another holder for longer than the caller would wait."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def describe_holder(holder: dict) -> str:
    """'run 0895bb6b-... (host:1234) since 2026-01-02 06:00:01 UTC'."""
    run = f"run {holder['flow_run_id']}" if holder.get("flow_run_id") else "a run outside Prefect"
    return f"{run} ({holder['owner']}) since {str(holder['acquired_at'])[:19]} UTC"


class LockStore(Database):
    """Named locks (mixed into :class:`alflow.tasks.store.Store`)."""

    def lock_holder(self, name: str) -> dict | None:
        """The holder's row (name, owner, flow_run_id, acquired_at), or None when free."""
        with self.connect() as con:
            row = con.execute("SELECT owner, flow_run_id, acquired_at FROM locks WHERE name = ?", [name]).fetchone()
        return None if row is None else {"name": name, "owner": row[0], "flow_run_id": row[1], "acquired_at": row[2]}

    def try_lock(self, name: str, flow_run_id: str | None,
                 is_stale: Callable[[dict], bool] | None = None) -> dict | None:
        """Take ``name`` for this process and ``flow_run_id``; None when taken, else the
        live holder's row.

        Taking it is one transaction: the row is inserted when the name is free, or
        replaced when its holder is this same holder, its process is gone (:func:`owner_gone`)
        or ``is_stale(row)`` is true. ``is_stale`` runs outside the transaction (it may ask
        a server); the replacement then only happens if the row is still the one judged.
        """
        owner = process_owner()
        holder = self.lock_holder(name)
        mine = holder is not None and holder["owner"] == owner and holder["flow_run_id"] == flow_run_id
        stale = holder is not None and not mine and (owner_gone(holder["owner"])
                                                     or bool(is_stale and is_stale(holder)))
        if holder is not None and not (mine or stale):
            return holder
        judged = None if holder is None else (holder["owner"], holder["flow_run_id"], holder["acquired_at"])
        with self.transaction() as con:
            current = con.execute("SELECT owner, flow_run_id, acquired_at FROM locks WHERE name = ?",
                                  [name]).fetchone()
            taken = current is not None and tuple(current) != judged  # changed since it was judged
            if not taken:
                con.execute("DELETE FROM locks WHERE name = ?", [name])
                con.execute("INSERT INTO locks VALUES (?, ?, ?, ?)", [name, owner, flow_run_id, utcnow()])
        return {"name": name, "owner": current[0], "flow_run_id": current[1], "acquired_at": current[2]} if taken else None

    def release_lock(self, name: str, flow_run_id: str | None) -> bool:
        """Release ``name`` if this process holds it for ``flow_run_id``; True if it did."""
        with self.transaction() as con:
            released = con.execute(
                "DELETE FROM locks WHERE name = ? AND owner = ? AND flow_run_id IS NOT DISTINCT FROM ? "
                "RETURNING name", [name, process_owner(), flow_run_id]
            ).fetchall()
        return bool(released)

    def acquire_lock(self, name: str, flow_run_id: str | None, timeout: float, poll: float = 1.0,
                     is_stale: Callable[[dict], bool] | None = None,
                     on_wait: Callable[[dict], None] | None = None) -> None:
        """:meth:`try_lock` until it is taken, for ``timeout`` seconds at most (``on_wait(holder)``
        is called once when waiting starts); then :class:`LockHeldError` naming the holder.
        The caller releases it (:meth:`release_lock`) on every way out."""
        deadline = time.monotonic() + timeout
        waited = False
        while (holder := self.try_lock(name, flow_run_id, is_stale)) is not None:
            if time.monotonic() >= deadline:
                raise LockHeldError(f"the '{name}' lock is held by {describe_holder(holder)}", holder)
            if not waited and on_wait is not None:
                on_wait(holder)
            waited = True
            time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
