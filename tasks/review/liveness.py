"""Batch liveness: whether anybody still waits on an open batch, and expiring those nobody does."""

from __future__ import annotations

from uuid import UUID

from alflow.tasks.store import Store, owner_gone


def _read_run(client, flow_run_id: str | None):
    from prefect.exceptions import ObjectNotFound

    if not isinstance(flow_run_id, str):
        return None
    try:
        return client.read_flow_run(UUID(flow_run_id))
    except ObjectNotFound:  # the run lives on another Prefect server
        return None


def _expire_if_abandoned(store: Store, client, batch: dict) -> str | None:
    """Close an open batch nobody waits for any more; returns why, or None if it is alive.

    Alive: its run waits in a pause whose process still runs, or is *suspended* (a deployed
    run: its process exits by design and resuming reschedules it), or is scheduled or
    running again. Abandoned: its run has ended (crashed, failed, cancelled), its review
    time is up (the run is marked Failed here if the server has not done it yet), or the
    process that waited in a blocking pause is gone (killed: the run still says Paused, so
    it is marked Crashed here), or a run without a deployment (nothing can replay it) is
    running with its process gone. Stored answers stay; unanswered items return to the pool.
    """
    from datetime import datetime, timezone

    from prefect.states import Crashed, Failed

    run = _read_run(client, batch.get("flow_run_id"))
    state = run.state if run is not None else None
    gone = owner_gone(batch.get("owner"))
    gone_why = f"the process that waited for it ({batch.get('owner')}) is gone"
    mark = None
    if state is None:
        if not gone:
            return None
        why = gone_why
    elif state.is_final():
        why = f"its run ended {state.type.value.lower()}"
    elif state.is_paused():
        deadline = state.state_details.pause_timeout
        if deadline is not None and deadline < datetime.now(timezone.utc):
            why, mark = f"its review timed out at {str(deadline)[:19]} UTC", Failed
        elif state.state_details.pause_reschedule or not gone:
            return None
        else:
            why, mark = gone_why, Crashed
    elif run.deployment_id is None and gone and not (state.is_scheduled() or state.is_pending()):
        why, mark = gone_why, Crashed
    else:
        return None
    if mark is not None:
        client.set_flow_run_state(UUID(batch["flow_run_id"]), mark(message=f"batch {batch['batch_id']}: {why}"),
                                  force=True)
    store.close_batch(batch["batch_id"], "expired")
    return why


def expire_stale_batches(store: Store, current_run_id: str | None = None) -> list[str]:
    """Close the open batches nobody waits for any more (see :func:`_expire_if_abandoned`)."""
    from prefect.client.orchestration import get_client

    expired = []
    open_batches = store.batches("open")
    if open_batches.empty:
        return expired
    with get_client(sync_client=True) as client:
        for batch in open_batches.to_dict("records"):
            if batch["flow_run_id"] == current_run_id:
                continue
            if _expire_if_abandoned(store, client, batch):
                expired.append(batch["batch_id"])
    return expired
