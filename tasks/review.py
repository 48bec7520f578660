"""The review step: the Resume form for a batch, and the other ways answers arrive.

All three ways end in the same ``labels`` rows:

* the Prefect UI's Resume form (:func:`build_review_form`), one dropdown per item with the
  pre-label preselected, so agreeing costs nothing and correcting costs one choice;
* the terminal (`alflow label`, see :func:`record_answer`);
* files (:func:`export_batch` / :func:`import_answers`), then `alflow resume`
  (:func:`resume_batch`), which resumes the paused run with the answers already stored.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Literal
from uuid import UUID

import pandas as pd
from pydantic import ConfigDict, Field, create_model

from alflow.config import SKIP, Settings
from alflow.tasks.report import markdown_text
from alflow.tasks.store import Answer, LabelWrite, Store, document, owner_gone

EXPORT_COLUMNS = ["batch_id", "rank", "item_id", "source", "title", "text", "url",
                  "prelabel", "confidence", "label"]


class ReviewError(ValueError):
    """Answers cannot be taken; the one-line message names the row, item or value."""


def field_name(rank: int) -> str:
    """The form field of the item at ``rank``: item_001, item_002, ..."""
    return f"item_{int(rank):03d}"


def trim(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def item_heading(row) -> str:
    """'#3 · sms_spam · pre-label spam (62%)': rank, source, and how sure the model is."""
    head = f"#{row.rank} · {row.source}"
    if isinstance(row.prelabel, str):
        return f"{head} · pre-label {row.prelabel} ({row.confidence:.0%})"
    return f"{head} · no pre-label (cold start)"


STORED_ANSWERS = "stored_answers"


def _ui_schema(schema: dict) -> None:
    # A field with a default shows as "(Optional)" in the UI; every item needs an answer
    # (the default only makes agreeing free), so the schema marks them all required.
    # `stored_answers` is for `alflow resume` only: the UI neither shows nor sends it.
    schema.get("properties", {}).pop(STORED_ANSWERS, None)
    schema.pop("additionalProperties", None)
    schema["required"] = list(schema.get("properties", {}))


def build_review_form(batch: pd.DataFrame, classes: list[str], text_chars: int, annotator: str,
                      shown: dict[str, str | None] | None = None):
    """A ``RunInput`` subclass for one batch (rows of :meth:`Store.batch_items`).

    One field per item, in rank order: its heading as the title, its text (trimmed to
    ``text_chars``) as the description, the classes plus ``skip`` as the choices and the
    pre-label (or an answer already stored for it) as the default. On a cold start there
    is no pre-label and each field must be chosen. A last field names the annotator.

    The UI shows titles as plain text and renders descriptions as Markdown, so the text
    goes through :func:`~alflow.tasks.report.markdown_text` and the title does not.
    A hidden ``stored_answers`` flag (not in the UI's schema) is set by `alflow resume`:
    its values are the answers already stored, not a reviewer's.

    ``shown`` (field -> default, None for none; see :func:`shown_form_defaults`) rebuilds
    the form a run showed when it stopped for review: a replayed run must judge what was
    untouched against those defaults, not against answers stored since.
    """
    from prefect.input import RunInput

    class ReviewForm(RunInput):
        model_config = ConfigDict(json_schema_extra=_ui_schema)

        stored_answers: bool = False

    choices = Literal[tuple(classes) + (SKIP,)]  # type: ignore[valid-type]
    fields = {}
    for row in batch.itertuples(index=False):
        text = document(row.title, row.text, sep=" — ")
        default = row.answer if isinstance(row.answer, str) else row.prelabel
        if shown is not None:
            default = shown.get(field_name(row.rank))
        fields[field_name(row.rank)] = (
            choices,
            Field(default if isinstance(default, str) else ..., title=item_heading(row),
                  description=markdown_text(trim(text, text_chars))),
        )
    fields["annotator"] = (
        str,
        Field(annotator, title="Annotator", description="Who is answering; stored with every label.",
              min_length=1, max_length=64),
    )
    return create_model("ReviewBatch", __base__=ReviewForm, **fields)


# The key of the one stop for review in a cycle run: a replayed run (resumed after a
# suspension) calls suspend_flow_run with it again and gets the submitted input back.
REVIEW_PAUSE_KEY = "review"


def shown_form_defaults(flow_run_id: str, suspended: bool) -> dict[str, str | None] | None:
    """The defaults (field -> value, None for a required field) of the form the run saved
    when it stopped for review, as the UI showed them; None if it saved none."""
    from prefect.input import keyset_from_base_key
    from prefect.input.actions import read_flow_run_input

    keyset = keyset_from_base_key(f"{'suspended' if suspended else 'paused'}-{REVIEW_PAUSE_KEY}")
    schema = read_flow_run_input(keyset["schema"], flow_run_id=UUID(flow_run_id))
    if not isinstance(schema, dict):
        return None
    return {name: spec.get("default") for name, spec in schema.get("properties", {}).items()}


def _prelabel(row) -> str | None:
    return row.prelabel if isinstance(row.prelabel, str) else None


def answers_from_form(values: dict, batch: pd.DataFrame) -> list[Answer]:
    """The form's values (field -> label) as answers, in rank order, each with the
    pre-label its field showed (in the title, and preselected)."""
    answers = []
    for row in batch.itertuples(index=False):
        name = field_name(row.rank)
        if name not in values:
            raise ReviewError(f"the review input has no field {name} (item {row.item_id})")
        answers.append(Answer(row.item_id, values[name], _prelabel(row)))
    return answers


def form_defaults(form, values: dict, batch: pd.DataFrame) -> dict[str, str | None]:
    """item_id -> what the submitted value counts as untouched against (for
    :meth:`Store.record_labels`): the default its field had when ``form`` (a class from
    :func:`build_review_form`) was built, None for a field without one. When `alflow
    resume` sent the stored answers (``stored_answers``), every value counts as untouched."""
    defaults = {}
    for row in batch.itertuples(index=False):
        name = field_name(row.rank)
        if values.get(STORED_ANSWERS):
            defaults[row.item_id] = values.get(name)
            continue
        field = form.model_fields.get(name)
        default = None if field is None or field.is_required() else field.default
        defaults[row.item_id] = default if isinstance(default, str) else None
    return defaults


def _check_label(label: str, classes: list[str], where: str) -> None:
    if label not in classes and label != SKIP:
        raise ReviewError(f"{where}: label {label!r} is not one of {classes + [SKIP]}")


def record_answer(store: Store, settings: Settings, batch_id: str | None, item_id: str, label: str,
                  annotator: str, origin: str = "cli", prelabel_shown: str | None = None) -> LabelWrite:
    """One answer from the terminal, written at once so quitting never loses it.
    ``prelabel_shown``: the pre-label its heading showed (None: none)."""
    _check_label(label, settings.labels, f"item {item_id}")
    return store.record_labels([Answer(item_id, label, prelabel_shown)], annotator=annotator, origin=origin,
                               batch_id=batch_id)


# -- files ------------------------------------------------------------------------------------
def _format(path: Path, fmt: str | None) -> str:
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix.lower())
    if fmt not in ("csv", "jsonl"):
        raise ReviewError(f"{path}: cannot tell the format; use a .csv or .jsonl name or pass --format")
    return fmt


def export_batch(store: Store, batch_id: str, path: str | Path, fmt: str | None = None,
                 prefill: bool = True) -> int:
    """Write a batch for labeling elsewhere; returns the number of rows.

    The ``label`` column holds the answer already given, else the pre-label (``prefill``),
    so a spreadsheet reviewer only edits what is wrong; ``prefill=False`` leaves it empty.
    """
    path = Path(path)
    fmt = _format(path, fmt)
    batch = store.batch_items(batch_id)
    if batch.empty:
        raise ReviewError(f"batch {batch_id} has no items")
    frame = batch.assign(batch_id=batch_id)
    label = frame["answer"]
    if prefill:
        label = label.where(label.notna(), frame["prelabel"])
    frame = frame.assign(label=label.fillna(""), confidence=frame["confidence"].round(4))
    frame = frame[EXPORT_COLUMNS]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "csv":
        frame.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
    else:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in frame.to_dict("records"):
                clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
                handle.write(json.dumps(clean, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return len(frame)


def _read_answers(path: Path, fmt: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a CSV or JSONL answers file."""
    rows = []
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                rows.append((reader.line_num, row))
    else:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ReviewError(f"{path.name} line {number}: not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ReviewError(f"{path.name} line {number}: not a JSON object")
                rows.append((number, row))
    return rows


def import_answers(store: Store, settings: Settings, path: str | Path, *, annotator: str,
                   batch_id: str | None = None, fmt: str | None = None) -> tuple[LabelWrite, int, str]:
    """Read answers (item_id, label) from a CSV or JSONL file into ``labels``.

    The batch is ``batch_id``, else the file's ``batch_id`` column (one value), else the
    only open batch. Every row is checked before anything is written: an unknown label, an
    item outside the batch or a repeated item stops the import with the line named, and
    nothing is stored. Rows with an empty label are left unanswered. Each answer keeps the
    file's ``prelabel`` value as the pre-label shown (exported files have that column, also
    with ``--blank``; None when the file has no such column or the cell is empty).
    Returns (what was written, rows left unanswered, the batch_id).
    """
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: no such file")
    fmt = _format(path, fmt)
    try:
        rows = _read_answers(path, fmt)
    except UnicodeDecodeError as exc:
        raise ReviewError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    if not rows:
        raise ReviewError(f"{path.name}: no rows")
    for column in ("item_id", "label"):
        if column not in rows[0][1]:
            raise ReviewError(f"{path.name}: no '{column}' column")
    file_batches = {str(r.get("batch_id")).strip() for _, r in rows if r.get("batch_id")}
    if batch_id is None and len(file_batches) > 1:
        raise ReviewError(f"{path.name}: rows from several batches {sorted(file_batches)}; pass --batch")
    batch_id = batch_id or (file_batches.pop() if file_batches else None) or _only_open_batch(store)
    batch = store.batch(batch_id)
    if batch is None:
        raise ReviewError(f"batch {batch_id} does not exist")
    members = set(store.batch_items(batch_id)["item_id"])
    answers, unanswered, seen = [], 0, {}
    for line, row in rows:
        item_id = str(row.get("item_id") or "").strip()
        label = str(row.get("label") or "").strip()
        where = f"{path.name} line {line}"
        if item_id not in members:
            raise ReviewError(f"{where}: item {item_id or '(empty)'} is not in batch {batch_id}")
        if item_id in seen:
            raise ReviewError(f"{where}: item {item_id} is answered again (first on line {seen[item_id]})")
        seen[item_id] = line
        if not label:
            unanswered += 1
            continue
        _check_label(label, settings.labels, where)
        shown = str(row.get("prelabel") or "").strip() or None
        answers.append(Answer(item_id, label, shown))
    written = store.record_labels(answers, annotator=annotator, origin="import", batch_id=batch_id)
    return written, unanswered, batch_id


def _only_open_batch(store: Store) -> str:
    open_batches = store.batches("open")
    if len(open_batches) == 1:
        return str(open_batches["batch_id"].iloc[0])
    if open_batches.empty:
        raise ReviewError("no batch is waiting for review")
    ids = ", ".join(open_batches["batch_id"])
    raise ReviewError(f"{len(open_batches)} batches are waiting ({ids}); pass --batch")


def pick_batch(store: Store, batch_id: str | None) -> dict:
    """The batch named, or the only open one; a clear error otherwise."""
    batch_id = batch_id or _only_open_batch(store)
    batch = store.batch(batch_id)
    if batch is None:
        raise ReviewError(f"batch {batch_id} does not exist")
    return batch


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
    if len(waiting):
        store.record_labels([Answer(i, SKIP) for i in waiting["item_id"]], annotator=annotator,
                            origin="cli", batch_id=batch_id)
        items = store.batch_items(batch_id)
    values = {field_name(r.rank): r.answer for r in items.itertuples(index=False)}
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


def simulated_answers(store: Store, batch: pd.DataFrame, classes: list[str]) -> list[Answer]:
    """The simulated annotator: each item's gold label (``skip`` where it has none)."""
    gold = store.gold_labels(batch["item_id"].tolist())
    return [Answer(i, gold[i] if gold.get(i) in classes else SKIP) for i in batch["item_id"]]


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
