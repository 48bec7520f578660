"""Resuming a paused run through the Prefect API with the answers already stored."""

from __future__ import annotations

from uuid import UUID

from alflow.config import SKIP
from alflow.tasks.review.forms import STORED_ANSWERS, answer_selection
from alflow.tasks.review.items import (
    ADJUDICATION,
    ReviewError,
    field_name,
    field_rank,
    legacy_field_name,
    pick_batch,
)
from alflow.tasks.review.liveness import _expire_if_abandoned, _read_run
from alflow.tasks.store import Answer, LabelWrite, Store


def resume_batch(store: Store, batch_id: str | None, *, annotator: str, skip_rest: bool = False) -> dict:
    """Resume the paused run of a batch with the answers already stored for it.

    Every item must be answered first, or ``skip_rest`` answers the rest ``skip``
    (recorded as this annotator's answers, with no pre-label shown: nobody saw those
    items). The run gets the stored answers flagged ``stored_answers``, so it records
    none of them again. Returns the batch row, with the run's ``deployment_id`` (None for
    a run without a deployment, which goes on in the process that paused it).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import NotPausedError, resume_flow_run

    batch = pick_batch(store, batch_id)
    batch_id = batch["batch_id"]
    if batch["status"] != "open":
        raise ReviewError(f"batch {batch_id} is {batch['status']}, not waiting for review")
    if not isinstance(batch["flow_run_id"], str):
        raise ReviewError(f"batch {batch_id} has no flow run to resume")
    with get_client(sync_client=True) as client:
        why = _expire_if_abandoned(store, client, batch)
        run = _read_run(client, batch["flow_run_id"])
    if why:
        raise ReviewError(f"batch {batch_id} cannot be resumed: {why}; its stored answers are kept "
                          "and train the next cycle (`alflow run`)")
    items = store.batch_items(batch_id)
    waiting = items[items["answer"].isna()]
    if len(waiting) and not skip_rest:
        raise ReviewError(
            f"{len(waiting)} of {len(items)} items in batch {batch_id} have no answer yet; "
            "answer them (`alflow label`) or pass --skip-rest"
        )
    short = store.batch_needs(batch_id)
    if len(short) and not skip_rest:
        raise ReviewError(
            f"{len(short)} items in batch {batch_id} still need an independent answer from another annotator "
            f"(review.overlap = {int(short['overlap'].max())}); answer them with `alflow label --annotator NAME` "
            "or pass --skip-rest"
        )
    if len(waiting):
        skip_unanswered(store, batch_id, annotator)
        items = store.batch_items(batch_id)
    # The form the run waits with (a later overlap round asks about some items only, and
    # a run input may hold no field its form lacks).
    properties = _waiting_form_properties(run)
    fields = None if properties is None else {
        name: rank for name in properties if (rank := field_rank(name)) is not None}
    values = {}
    for r in items.itertuples(index=False):
        if fields is None or r.rank in fields.values():
            key = _form_key(r.rank, fields)
            multi = (properties or {}).get(key, {}).get("type") == "array"  # a multi-label form's multi-select
            values[key] = answer_selection(r.answer) if multi else r.answer
    values["annotator"] = annotator
    values[STORED_ANSWERS] = True
    try:
        resume_flow_run(UUID(batch["flow_run_id"]), run_input=values)
    except NotPausedError:
        raise ReviewError(
            f"run {batch['flow_run_id']} of batch {batch_id} is not paused; its stored answers "
            "will train the next cycle"
        ) from None
    except FlowPauseTimeout:
        raise ReviewError(
            f"run {batch['flow_run_id']} of batch {batch_id} timed out; its stored answers will "
            "train the next cycle"
        ) from None
    # A suspended (deployed) run is rescheduled: its deployment's process replays it.
    return dict(batch, deployment_id=str(run.deployment_id) if run and run.deployment_id else None)


def skip_unanswered(store: Store, batch_id: str, annotator: str) -> LabelWrite:
    """Answer ``skip`` for the batch's items without an answer yet, as ``annotator`` (origin
    cli, no pre-label shown: nobody saw them). A skipped adjudication decides nothing: the
    item goes back to adjudication."""
    items = store.batch_items(batch_id)
    waiting = items[items["answer"].isna()]
    return store.record_labels([Answer(i, SKIP, origin=ADJUDICATION if p == ADJUDICATION else None)
                                for i, p in zip(waiting["item_id"], waiting["picked_by"])],
                               annotator=annotator, origin="cli", batch_id=batch_id)


def _form_key(rank: int, fields: dict[str, int] | None) -> str:
    """The key the waiting form has for the item at ``rank``: its field name, or the legacy
    one of a form saved before fields were named '#N'."""
    if fields is not None and field_name(rank) not in fields and legacy_field_name(rank) in fields:
        return legacy_field_name(rank)
    return field_name(rank)


def _waiting_form_properties(run) -> dict[str, dict] | None:
    """The fields of the form a paused run waits with, name -> its JSON schema (None:
    unknown, e.g. no run)."""
    from prefect.input.actions import read_flow_run_input

    keyset = getattr(getattr(run, "state", None), "state_details", None)
    keyset = getattr(keyset, "run_input_keyset", None) if keyset is not None else None
    if not keyset:
        return None
    schema = read_flow_run_input(keyset["schema"], flow_run_id=run.id)
    if not isinstance(schema, dict):
        return None
    return dict(schema.get("properties", {}))
