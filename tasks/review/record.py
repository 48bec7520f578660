"""Recording answers: a submitted form round, a terminal answer, the simulated annotator."""

from __future__ import annotations

from uuid import UUID

import pandas as pd

from alflow.config import SKIP, Settings
from alflow.tasks.review.forms import STORED_ANSWERS, answers_from_form, form_defaults
from alflow.tasks.review.items import ADJUDICATION, _check_label
from alflow.tasks.store import Answer, LabelWrite, Store


def record_review_form(store: Store, form, values: dict, batch: pd.DataFrame, batch_id: str,
                       flow_run_id: str | None, round_: int = 1, form_seconds: float | None = None) -> LabelWrite:
    """Record review round ``round_`` of a batch from its submitted form (a class from
    :func:`build_review_form`, its values, the round's items) in one transaction, once:
    a round already recorded (a replayed run) writes nothing and returns ``replayed``, so
    answers that arrived another way since (`alflow import`, `alflow label`) stay. The
    batch is closed when every item has the answers it needs, or with whatever it has when
    `alflow resume` sent it (``stored_answers``). Items taken out of the batch while the
    form waited (answered late in another batch) are not recorded from it.

    In a later round (``round_`` > 1) a value left at its default is the new annotator's
    independent answer; only items that annotator had already answered keep their answer.
    ``form_seconds``: each answer's share of the form's wait (already capped).
    """
    annotator = str(values["annotator"]).strip()
    batch = batch[batch["item_id"].isin(set(store.batch_items(batch_id)["item_id"]))]
    defaults = form_defaults(form, values, batch)
    if round_ > 1 and not values.get(STORED_ANSWERS):
        own = set(store.query_df("SELECT DISTINCT item_id FROM labels WHERE batch_id = ? AND annotator = ?",
                                 [batch_id, annotator])["item_id"])
        defaults = {i: d for i, d in defaults.items() if i in own}
    stored = bool(values.get(STORED_ANSWERS))
    return store.record_labels(
        answers_from_form(values, batch, None if stored else form_seconds), annotator=annotator, origin="ui",
        batch_id=batch_id, flow_run_id=flow_run_id, form_defaults=defaults, review_round=round_,
        close_batch="labeled" if stored else None, close_if_complete=not stored,
    )


def form_seconds_per_item(wait: float | None, n_items: int, cap: float) -> float | None:
    """A form's wall-clock wait (seconds) divided over its ``n_items``, at most ``cap`` each;
    None when the wait is unknown."""
    if wait is None:
        return None
    return min(float(cap), max(0.0, float(wait)) / max(1, int(n_items)))


def review_wait_seconds(flow_run_id: str, key: str) -> float | None:
    """Seconds between the run stopping for review round ``key`` (Paused or Suspended)
    and leaving that state (resumed), from the run's state history; None if not found or
    the history cannot be read (the answers matter more than their timing)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            states = sorted(client.read_flow_run_states(UUID(flow_run_id)), key=lambda st: st.timestamp)
    except Exception:  # noqa: BLE001 - timing is best effort; never lose a submitted form over it
        return None
    for i, state in enumerate(states):
        if state.is_paused() and state.state_details.pause_key == key and i + 1 < len(states):
            return max(0.0, (states[i + 1].timestamp - state.timestamp).total_seconds())
    return None


def record_answer(store: Store, settings: Settings, batch_id: str | None, item_id: str, label: str,
                  annotator: str, origin: str = "cli", prelabel_shown: str | None = None,
                  seconds: float | None = None, late: bool = False) -> LabelWrite:
    """One answer from the terminal, written at once so quitting never loses it.
    ``prelabel_shown``: the model's label shown with it (None: none); ``seconds``: time
    from the item shown to the answer; ``late``: the batch may be closed (see
    :meth:`Store.record_labels`). A multi-label answer is a tag set's text form ("": none
    of the tags applies)."""
    _check_label(label, settings.labels, f"item {item_id}", settings.task)
    return store.record_labels([Answer(item_id, label, prelabel_shown, seconds=seconds)], annotator=annotator,
                               origin=origin, batch_id=batch_id, late=late)


def simulated_answers(store: Store, batch: pd.DataFrame, classes: list[str]) -> list[Answer]:
    """The simulated annotator: each item's gold label (``skip`` where it has none); its
    answers to adjudication items are adjudications."""
    gold = store.gold_labels(batch["item_id"].tolist())
    return [Answer(i, gold[i] if gold.get(i) in classes else SKIP, origin=ADJUDICATION if p == ADJUDICATION else None)
            for i, p in zip(batch["item_id"], batch["picked_by"])]
