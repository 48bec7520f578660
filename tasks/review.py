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
from alflow.tasks.store import RECHECK, Answer, LabelWrite, Store, document, owner_gone

EXPORT_COLUMNS = ["batch_id", "rank", "item_id", "source", "title", "text", "url",
                  "prelabel", "confidence", "picked_by", "overlap", "answers", "annotator", "label"]
# picked_by of an item whose answers tie or disagree: its answer is an adjudication.
ADJUDICATION = "adjudication"


class ReviewError(ValueError):
    """Answers cannot be taken; the one-line message names the row, item or value."""


def field_name(rank: int) -> str:
    """The form field of the item at ``rank``: item_001, item_002, ..."""
    return f"item_{int(rank):03d}"


def trim(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def given_text(given: list[tuple[str, str]]) -> str:
    """'alice: spam, bob: ham': every answer given to an item and who gave it."""
    return ", ".join(f"{who}: {label}" for who, label in given)


def item_heading(row) -> str:
    """'#3 · sms_spam · pre-label spam (62%)': rank, source, and how sure the model is;
    'ADJUDICATE #1 · sms_spam' for an item whose answers tie or disagree; 'RECHECK #2 ·
    sms_spam · the model suggests spam' for a label the label check doubts."""
    if getattr(row, "picked_by", None) == ADJUDICATION:
        return f"ADJUDICATE #{row.rank} · {row.source}"
    if getattr(row, "picked_by", None) == RECHECK:
        return f"RECHECK #{row.rank} · {row.source} · the model suggests {row.prelabel}"
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


def build_review_form(batch: pd.DataFrame, classes: list[str], text_chars: int, annotator: str | None,
                      shown: dict[str, str | None] | None = None,
                      given: dict[str, list[tuple[str, str]]] | None = None, independent: bool = False):
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

    Adjudication items (``picked_by`` 'adjudication', first in the batch) show every answer
    given and who gave it (``given``: item_id -> [(annotator, answer)]) and have no default.
    ``independent``: a later round of an overlap review, asking a further annotator for
    items others answered: defaults are the pre-labels, never others' answers, and the
    annotator (``None``: no default) must be someone new.
    """
    from prefect.input import RunInput

    class ReviewForm(RunInput):
        model_config = ConfigDict(json_schema_extra=_ui_schema)

        stored_answers: bool = False

    choices = Literal[tuple(classes) + (SKIP,)]  # type: ignore[valid-type]
    fields = {}
    for row in batch.itertuples(index=False):
        text = document(row.title, row.text, sep=" — ")
        default = row.answer if isinstance(row.answer, str) and not independent else row.prelabel
        description = markdown_text(trim(text, text_chars))
        if row.picked_by == ADJUDICATION:
            answers = given_text((given or {}).get(row.item_id, []))
            description = (f"**Answers disagree, your answer decides.** Given: "
                           f"{markdown_text(answers) or 'none'}\n\n{description}")
            default = row.answer if isinstance(row.answer, str) else None
        if shown is not None:
            default = shown.get(field_name(row.rank))
        fields[field_name(row.rank)] = (
            choices,
            Field(default if isinstance(default, str) else ..., title=item_heading(row), description=description),
        )
    who = ("Who is answering; stored with every label." if not independent else
           "Who is answering: these items need an independent answer from someone who has not answered them yet.")
    fields["annotator"] = (
        str,
        Field(annotator if annotator else ..., title="Annotator", description=who, min_length=1, max_length=64),
    )
    return create_model("ReviewBatch", __base__=ReviewForm, **fields)


# The key of the one stop for review in a cycle run: a replayed run (resumed after a
# suspension) calls suspend_flow_run with it again and gets the submitted input back.
REVIEW_PAUSE_KEY = "review"


def review_key(round_: int) -> str:
    """The pause key of a review round: 'review', then 'review-2', 'review-3', ... (a batch
    with review.overlap stops again until the further annotators' answers are in)."""
    return REVIEW_PAUSE_KEY if round_ == 1 else f"{REVIEW_PAUSE_KEY}-{round_}"


def shown_form_defaults(flow_run_id: str, suspended: bool,
                        key: str = REVIEW_PAUSE_KEY) -> dict[str, str | None] | None:
    """The defaults (field -> value, None for a required field) of the form the run saved
    when it stopped for review (round ``key``), as the UI showed them; None if it saved none."""
    from prefect.input import keyset_from_base_key
    from prefect.input.actions import read_flow_run_input

    keyset = keyset_from_base_key(f"{'suspended' if suspended else 'paused'}-{key}")
    schema = read_flow_run_input(keyset["schema"], flow_run_id=UUID(flow_run_id))
    if not isinstance(schema, dict):
        return None
    return {name: spec.get("default") for name, spec in schema.get("properties", {}).items()}


def _prelabel(row) -> str | None:
    return row.prelabel if isinstance(row.prelabel, str) else None


def answers_from_form(values: dict, batch: pd.DataFrame, seconds: float | None = None) -> list[Answer]:
    """The form's values (field -> label) as answers, in rank order, each with the
    pre-label its field showed (in the title, and preselected); adjudication items' answers
    have origin 'adjudication'. ``seconds``: labeling time of each answer, if measured."""
    answers = []
    for row in batch.itertuples(index=False):
        name = field_name(row.rank)
        if name not in values:
            raise ReviewError(f"the review input has no field {name} (item {row.item_id})")
        origin = ADJUDICATION if row.picked_by == ADJUDICATION else None
        answers.append(Answer(row.item_id, values[name], _prelabel(row), origin=origin, seconds=seconds))
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


# -- overlap rounds and adjudication -------------------------------------------------------
def plan_review(store: Store, settings: Settings, picks: pd.DataFrame, rng) -> pd.DataFrame:
    """The batch as it is reviewed, ranked: first the items waiting for adjudication
    (answers tied, or disagreeing above review.adjudication_threshold; at most
    query.batch_size of them, picked_by 'adjudication', no pre-label: the adjudicator
    chooses), then ``picks``; review.overlap independent answers are asked for a
    review.overlap_share of the picks (at least one when the share is above 0), drawn with
    ``rng`` (a numpy Generator). Returns the rows with ``rank`` and ``overlap`` added."""
    import numpy as np

    from alflow.tasks.store.batches import REASKED_PICKS

    r = settings.review
    columns = ["item_id", "score", "prelabel", "confidence", "picked_by"]
    picks = picks.copy() if len(picks) else pd.DataFrame(columns=columns)
    pending = store.needs_adjudication(r.adjudication_threshold)
    pending = pending[~pending["item_id"].isin(set(picks["item_id"]))].head(settings.query.batch_size)
    adjudicate = pd.DataFrame({"item_id": pending["item_id"].to_numpy(dtype=object),
                               "score": pending["disagreement"].to_numpy(dtype=float),
                               "prelabel": None, "confidence": np.nan, "picked_by": ADJUDICATION, "overlap": 1})
    overlap = np.ones(len(picks), dtype=int)
    eligible = np.flatnonzero(~picks["picked_by"].isin(REASKED_PICKS).to_numpy())
    if r.overlap > 1 and r.overlap_share > 0 and len(eligible):
        n = min(len(eligible), max(1, math.ceil(r.overlap_share * len(eligible) - 1e-9)))
        overlap[rng.choice(eligible, size=n, replace=False)] = r.overlap
    picks["overlap"] = overlap
    parts = [p for p in (adjudicate, picks) if len(p)]
    if not parts:
        return pd.DataFrame(columns=columns + ["overlap", "rank"])
    planned = pd.concat(parts, ignore_index=True)
    return planned.assign(rank=np.arange(1, len(planned) + 1))


def review_round_items(store: Store, batch_id: str, round_: int,
                       shown: dict[str, str | None] | None = None) -> pd.DataFrame:
    """The items a review round asks about: round 1 the whole batch; a later round the
    items still short of their review.overlap answers (:meth:`Store.batch_needs`), or, when
    replaying (``shown``: the form the run saved), exactly the fields that form had."""
    batch = store.batch_items(batch_id)
    if round_ == 1:
        return batch
    if shown is not None:
        keep = [field_name(r) in shown for r in batch["rank"]]
    else:
        keep = batch["item_id"].isin(set(store.batch_needs(batch_id)["item_id"])).to_numpy()
    return batch[keep].reset_index(drop=True)


def record_review_form(store: Store, form, values: dict, batch: pd.DataFrame, batch_id: str,
                       flow_run_id: str | None, round_: int = 1, seconds: float | None = None) -> LabelWrite:
    """Record one submitted review form (a class from :func:`build_review_form`, its values,
    the round's items) in one transaction, closing the batch when every item has the
    answers it needs, or whatever it has when `alflow resume` sent it (``stored_answers``).

    In a later round (``round_`` > 1) a value left at its default is the new annotator's
    independent answer; only items that annotator had already answered keep their answer.
    ``seconds``: the form's wait divided over its items (each answer's labeling time).
    """
    annotator = str(values["annotator"]).strip()
    defaults = form_defaults(form, values, batch)
    if round_ > 1 and not values.get(STORED_ANSWERS):
        own = set(store.query_df("SELECT DISTINCT item_id FROM labels WHERE batch_id = ? AND annotator = ?",
                                 [batch_id, annotator])["item_id"])
        defaults = {i: d for i, d in defaults.items() if i in own}
    stored = bool(values.get(STORED_ANSWERS))
    return store.record_labels(
        answers_from_form(values, batch, None if stored else seconds), annotator=annotator, origin="ui",
        batch_id=batch_id, flow_run_id=flow_run_id, form_defaults=defaults,
        close_batch="labeled" if stored else None, close_if_complete=not stored,
    )


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


def _check_label(label: str, classes: list[str], where: str) -> None:
    if label not in classes and label != SKIP:
        raise ReviewError(f"{where}: label {label!r} is not one of {classes + [SKIP]}")


def record_answer(store: Store, settings: Settings, batch_id: str | None, item_id: str, label: str,
                  annotator: str, origin: str = "cli", prelabel_shown: str | None = None,
                  seconds: float | None = None) -> LabelWrite:
    """One answer from the terminal, written at once so quitting never loses it.
    ``prelabel_shown``: the pre-label its heading showed (None: none); ``seconds``: time
    from the item shown to the answer."""
    _check_label(label, settings.labels, f"item {item_id}")
    return store.record_labels([Answer(item_id, label, prelabel_shown, seconds=seconds)], annotator=annotator,
                               origin=origin, batch_id=batch_id)


# -- files ------------------------------------------------------------------------------------
FORMATS = ("csv", "jsonl", "label-studio")


def file_format(path: Path, fmt: str | None) -> str:
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "label-studio"}.get(
        path.suffix.lower())
    if fmt not in FORMATS:
        raise ReviewError(f"{path}: cannot tell the format; use a .csv, .jsonl or .json (Label Studio) name "
                          f"or pass --format ({', '.join(FORMATS)})")
    return fmt


def export_batch(store: Store, batch_id: str, path: str | Path, fmt: str | None = None,
                 prefill: bool = True) -> int:
    """Write a batch for labeling elsewhere; returns the number of rows (tasks).

    CSV / JSONL: one row per item. The ``label`` column holds the answer already given,
    else the pre-label (``prefill``), so a spreadsheet reviewer only edits what is wrong;
    ``prefill=False`` leaves it empty. An item asking for independent answers (``overlap``
    above 1) is pre-filled with the pre-label only, never another annotator's answer.
    ``answers`` lists every answer given to the item and who gave it; ``annotator`` is
    empty (filled in, it names who answered that row on import).

    ``label-studio``: Label Studio's JSON tasks (see :func:`label_studio_tasks`).
    """
    path = Path(path)
    fmt = file_format(path, fmt)
    batch = store.batch_items(batch_id)
    if batch.empty:
        raise ReviewError(f"batch {batch_id} has no items")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "label-studio":
        tasks = label_studio_tasks(store, batch_id, batch)
        tmp.write_text(json.dumps(tasks, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
        tmp.replace(path)
        return len(tasks)
    given = store.answers_given(batch["item_id"].tolist())
    frame = batch.assign(batch_id=batch_id)
    label = frame["answer"].where(frame["overlap"] <= 1)
    if prefill:
        label = label.where(label.notna(), frame["prelabel"])
    frame = frame.assign(label=label.fillna(""), confidence=frame["confidence"].round(4),
                         answers=[given_text(given.get(i, [])) for i in frame["item_id"]], annotator="")
    frame = frame[EXPORT_COLUMNS]
    if fmt == "csv":
        frame.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
    else:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in frame.to_dict("records"):
                clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
                handle.write(json.dumps(clean, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return len(frame)


# Label Studio's names in the labeling config the exported tasks fit:
#   <View><Text name="text" value="$text"/>
#     <Choices name="label" toName="text" choice="single"><Choice value="ham"/>...</Choices></View>
LS_FROM, LS_TO = "label", "text"


def _ls_choice(label: str) -> list[dict]:
    return [{"from_name": LS_FROM, "to_name": LS_TO, "type": "choices", "value": {"choices": [label]}}]


def label_studio_config(classes: list[str]) -> str:
    """The Label Studio labeling config (XML) that exported tasks are shown with."""
    choices = "".join(f'<Choice value="{c}"/>' for c in classes)
    return (f'<View><Text name="{LS_TO}" value="${LS_TO}"/><Choices name="{LS_FROM}" toName="{LS_TO}" '
            f'choice="single">{choices}</Choices></View>')


def label_studio_tasks(store: Store, batch_id: str, batch: pd.DataFrame) -> list[dict]:
    """A batch as Label Studio tasks (its JSON import/export format), one per item:
    ``data`` (``text``, and alflow's ``item_id``, ``batch_id``, ``rank``, ``overlap``,
    ``answers``: every answer given to the item and who gave it), ``predictions`` (the
    pre-label as a Choices result with the model's confidence as ``score``) and
    ``annotations`` (each annotator's latest answer in this batch: a Choices result, a skip
    as ``was_cancelled``, ``lead_time`` the labeling seconds, ``created_username`` the
    annotator)."""
    answers = store.query_df(
        """SELECT item_id, annotator, label, seconds, created_at FROM labels WHERE batch_id = ?
        QUALIFY row_number() OVER (PARTITION BY item_id, annotator ORDER BY label_id DESC) = 1
        ORDER BY label_id""", [batch_id])
    model = store.batch(batch_id).get("model_version")
    given = store.answers_given(batch["item_id"].tolist())
    tasks = []
    for row in batch.itertuples(index=False):
        data = {"text": document(row.title, row.text), "item_id": row.item_id, "batch_id": batch_id,
                "rank": int(row.rank), "source": row.source, "picked_by": row.picked_by,
                "overlap": int(row.overlap), "answers": given_text(given.get(row.item_id, []))}
        predictions = []
        if isinstance(row.prelabel, str):
            predictions.append({"model_version": f"alflow-v{int(model)}" if model is not None and not pd.isna(model)
                                else "alflow", "score": None if pd.isna(row.confidence) else round(float(row.confidence), 4),
                                "result": _ls_choice(row.prelabel)})
        annotations = []
        for answer in answers[answers["item_id"] == row.item_id].itertuples(index=False):
            cancelled = answer.label == SKIP
            annotations.append({
                "result": [] if cancelled else _ls_choice(answer.label), "was_cancelled": cancelled,
                "ground_truth": False, "created_username": answer.annotator,
                "created_at": pd.Timestamp(answer.created_at).isoformat() + "Z",
                "lead_time": None if pd.isna(answer.seconds) else float(answer.seconds),
            })
        tasks.append({"id": int(row.rank), "data": data, "predictions": predictions, "annotations": annotations})
    return tasks


def _read_answers(path: Path, fmt: str) -> list[tuple[str, dict]]:
    """(where, row) pairs from a CSV or JSONL answers file ('line 3'), or from Label Studio
    tasks ('task 2': one row per annotation; see :func:`_label_studio_rows`)."""
    rows = []
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                rows.append((f"line {reader.line_num}", row))
    elif fmt == "label-studio":
        return _label_studio_rows(path)
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
                rows.append((f"line {number}", row))
    return rows


def _ls_username(annotation: dict) -> str | None:
    """Who gave a Label Studio annotation: ``created_username`` ('ana@x.org, 3' -> 'ana@x.org'),
    else ``completed_by`` (its email or username, or 'ls-user-<id>'); None if neither."""
    name = annotation.get("created_username")
    if isinstance(name, str) and name.strip():
        return name.split(",")[0].strip()
    by = annotation.get("completed_by")
    if isinstance(by, dict):
        by = by.get("email") or by.get("username") or by.get("id")
    if isinstance(by, str) and by.strip():
        return by.strip()
    if isinstance(by, int):
        return f"ls-user-{by}"
    return None


def _ls_label(results, where: str) -> str | None:
    for result in results or []:
        if isinstance(result, dict) and result.get("type") == "choices":
            choices = (result.get("value") or {}).get("choices") or []
            if len(choices) != 1:
                raise ReviewError(f"{where}: a Choices result must hold one choice, not {choices!r}")
            return str(choices[0])
    return None


def _label_studio_rows(path: Path) -> list[tuple[str, dict]]:
    """One row per annotation of each Label Studio task: item_id (``data.item_id``), label
    (the Choices result; ``skip`` for a cancelled annotation), annotator, prelabel (the
    first prediction's choice), seconds (``lead_time``), batch_id (``data.batch_id``). A
    task without annotations is a row with an empty label (unanswered)."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReviewError(f"{path.name}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict)
                                               for t in tasks):
        raise ReviewError(f"{path.name}: not Label Studio tasks (a JSON list of objects with 'data')")
    rows = []
    for number, task in enumerate(tasks, start=1):
        where = f"{path.name} task {number}"
        data = task["data"]
        if not data.get("item_id"):
            raise ReviewError(f"{where}: no data.item_id (export the batch with `alflow export --format label-studio`)")
        predictions = task.get("predictions") or []
        shown = _ls_label(predictions[0].get("result"), where) if predictions and isinstance(predictions[0], dict) else None
        base = {"item_id": data["item_id"], "batch_id": data.get("batch_id"), "prelabel": shown}
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
        if not annotations:
            rows.append((f"task {number}", dict(base, label="")))
        for annotation in annotations:
            label = SKIP if annotation.get("was_cancelled") else _ls_label(annotation.get("result"), where)
            rows.append((f"task {number}", dict(base, label=label or "", annotator=_ls_username(annotation),
                                                seconds=annotation.get("lead_time"))))
    return rows


def import_answers(store: Store, settings: Settings, path: str | Path, *, annotator: str,
                   batch_id: str | None = None, fmt: str | None = None) -> tuple[LabelWrite, int, str]:
    """Read answers (item_id, label) from a CSV or JSONL file, or Label Studio JSON tasks,
    into ``labels``.

    The batch is ``batch_id``, else the file's ``batch_id`` column (one value), else the
    only open batch. Every row is checked before anything is written: an unknown label, an
    item outside the batch or an item answered twice by one annotator stops the import
    with the line named, and nothing is stored. Rows with an empty label are left
    unanswered. A row's ``annotator`` column (Label Studio: the annotation's user) names
    who answered it, else ``annotator``; ``seconds`` (Label Studio: ``lead_time``) is its
    labeling time. Each answer keeps the file's ``prelabel`` value as the pre-label shown
    (exported files have that column, also with ``--blank``; Label Studio: the task's
    prediction; None when absent). Answers to adjudication items are adjudications.
    Returns (what was written, rows left unanswered, the batch_id).
    """
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: no such file")
    fmt = file_format(path, fmt)
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
    items = store.batch_items(batch_id)
    members = set(items["item_id"])
    adjudicated = set(items.loc[items["picked_by"] == ADJUDICATION, "item_id"])
    answers, unanswered, seen = [], 0, {}
    for at, row in rows:
        item_id = str(row.get("item_id") or "").strip()
        label = str(row.get("label") or "").strip()
        who = str(row.get("annotator") or "").strip() or annotator
        where = f"{path.name} {at}"
        if item_id not in members:
            raise ReviewError(f"{where}: item {item_id or '(empty)'} is not in batch {batch_id}")
        if not label:
            unanswered += 1
            continue
        if (item_id, who) in seen:
            by = "" if who == annotator else f" by {who}"
            raise ReviewError(f"{where}: item {item_id} is answered again{by} (first on {seen[item_id, who]})")
        seen[item_id, who] = at
        if len(who) > 64:
            raise ReviewError(f"{where}: annotator {who[:20]!r}... is longer than 64 characters")
        _check_label(label, settings.labels, where)
        seconds = row.get("seconds")
        if seconds in (None, ""):
            seconds = None
        else:
            try:
                seconds = float(seconds)
            except (TypeError, ValueError):
                raise ReviewError(f"{where}: seconds {seconds!r} is not a number") from None
        shown = str(row.get("prelabel") or "").strip() or None
        origin = ADJUDICATION if item_id in adjudicated else None
        answers.append(Answer(item_id, label, shown, annotator=who, origin=origin, seconds=seconds))
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
    short = store.batch_needs(batch_id)
    if len(short) and not skip_rest:
        raise ReviewError(
            f"{len(short)} items in batch {batch_id} still need an independent answer from another annotator "
            f"(review.overlap = {int(short['overlap'].max())}); answer them with `alflow label --annotator NAME` "
            "or pass --skip-rest"
        )
    if len(waiting):
        store.record_labels([Answer(i, SKIP, origin=ADJUDICATION if p == ADJUDICATION else None)
                             for i, p in zip(waiting["item_id"], waiting["picked_by"])],
                            annotator=annotator, origin="cli", batch_id=batch_id)
        items = store.batch_items(batch_id)
    # The form the run waits with (a later overlap round asks about some items only, and
    # a run input may hold no field its form lacks).
    fields = _waiting_form_fields(run)
    values = {field_name(r.rank): r.answer for r in items.itertuples(index=False)
              if fields is None or field_name(r.rank) in fields}
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


def _waiting_form_fields(run) -> set[str] | None:
    """The item fields of the form a paused run waits with (None: unknown, e.g. no run)."""
    from prefect.input.actions import read_flow_run_input

    keyset = getattr(getattr(run, "state", None), "state_details", None)
    keyset = getattr(keyset, "run_input_keyset", None) if keyset is not None else None
    if not keyset:
        return None
    schema = read_flow_run_input(keyset["schema"], flow_run_id=run.id)
    if not isinstance(schema, dict):
        return None
    return {name for name in schema.get("properties", {}) if name.startswith("item_")}


def simulated_answers(store: Store, batch: pd.DataFrame, classes: list[str]) -> list[Answer]:
    """The simulated annotator: each item's gold label (``skip`` where it has none); its
    answers to adjudication items are adjudications."""
    gold = store.gold_labels(batch["item_id"].tolist())
    return [Answer(i, gold[i] if gold.get(i) in classes else SKIP, origin=ADJUDICATION if p == ADJUDICATION else None)
            for i, p in zip(batch["item_id"], batch["picked_by"])]


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
