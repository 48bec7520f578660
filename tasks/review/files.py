"""Files: export a batch (CSV, JSONL, Label Studio tasks) and import the answers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd

from alflow.config import SKIP, Settings
from alflow.tasks.faults import fault_point
from alflow.tasks.multilabel.tags import format_tags, parse_tags
from alflow.tasks.review.items import (
    ADJUDICATION,
    ReviewError,
    _check_label,
    check_tag_answer,
    closed_batch_check,
    _only_open_batch,
    given_text,
    prelabel_seen,
    reasked_note,
    reviewer_reason,
    shown_prelabel,
)
from alflow.tasks.store import Answer, LabelWrite, Store, document

# -- files ------------------------------------------------------------------------------------
EXPORT_COLUMNS = ["batch_id", "rank", "item_id", "source", "title", "text", "url",
                  "prelabel", "confidence", "prelabel_by", "picked_by", "overlap", "answers", "annotator", "label"]
FORMATS = ("csv", "jsonl", "label-studio")
# A multi-label file's answer column, and how a CSV cell says "none of these tags apply"
# (an empty cell is an item left for later, as in a single-label file).
TAGS_COLUMN = "labels"
NO_TAGS = "none"


def file_format(path: Path, fmt: str | None) -> str:
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "label-studio"}.get(
        path.suffix.lower())
    if fmt not in FORMATS:
        raise ReviewError(f"{path}: cannot tell the format; use a .csv, .jsonl or .json (Label Studio) name "
                          f"or pass --format ({', '.join(FORMATS)})")
    return fmt


def export_batch(store: Store, batch_id: str, path: str | Path, fmt: str | None = None,
                 prefill: bool = True, tags: list[str] | None = None) -> int:
    """Write a batch for labeling elsewhere; returns the number of rows (tasks).

    CSV / JSONL: one row per item. The ``label`` column holds the answer already given,
    else the pre-label (``prefill``), so a spreadsheet reviewer only edits what is wrong;
    ``prefill=False`` leaves it empty. An item asking for independent answers (``overlap``
    above 1) is pre-filled with the pre-label only, never another annotator's answer.
    ``prelabel_by`` says who suggested an offered pre-label: ``model`` or ``llm`` (the
    LLM's zero-shot suggestion on a cold start; its confidence is empty when it gave none).
    Items without an offered pre-label (:func:`shown_prelabel`: a control item, blind, and
    items asked again) are never pre-filled, and show no confidence; ``picked_by`` says
    only why an item is asked again (so a control item looks like any other). ``answers``
    lists every answer given to the item and who gave it (for a recheck, with the
    model's suggestion); ``annotator`` is empty (filled in, it names who answered that row
    on import).

    ``label-studio``: Label Studio's JSON tasks (see :func:`label_studio_tasks`).

    ``tags``: a multi-label batch's tags (task = "multi_label"; None: single-label). The
    answer column is then ``labels``: in CSV the tags joined by ``;``, ``none`` for "none
    of these tags apply", ``skip``, empty for an item left for later; in JSONL a list of
    tags (``[]``: none apply), ``"skip"`` or null. ``prelabel`` is written the same way.
    """
    path = Path(path)
    fmt = file_format(path, fmt)
    if tags is not None and fmt == "csv":
        _check_no_tags_spelling(tags)
    batch = store.batch_items(batch_id)
    if batch.empty:
        raise ReviewError(f"batch {batch_id} has no items")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "label-studio":
        tasks = label_studio_tasks(store, batch_id, batch, multiple=tags is not None)
        tmp.write_text(json.dumps(tasks, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
        tmp.replace(path)
        return len(tasks)
    given = store.answers_given(batch["item_id"].tolist())
    rows = list(batch.itertuples(index=False))
    offered = pd.Series([shown_prelabel(r) for r in rows], index=batch.index, dtype=object)
    frame = batch.assign(batch_id=batch_id)
    label = frame["answer"].where(frame["overlap"] <= 1)
    if prefill:
        label = label.where(label.notna(), offered)
    frame = frame.assign(label=label.fillna(""), prelabel=[prelabel_seen(r) for r in rows],
                         confidence=frame["confidence"].where(offered.notna()).round(4),
                         prelabel_by=[r.prelabel_by if isinstance(o, str) else "" for r, o in zip(rows, offered)],
                         picked_by=[reviewer_reason(r.picked_by) for r in rows],
                         answers=[reasked_note(r, given.get(r.item_id, [])) or given_text(given.get(r.item_id, []))
                                  for r in rows], annotator="")
    frame = frame[EXPORT_COLUMNS]
    if tags is not None:  # the answer text forms spelled for the file ("" is none apply, not empty)
        spell = _tags_cell if fmt == "csv" else _tags_json
        frame = frame.assign(label=[spell(v) for v in label], prelabel=[spell(v) for v in frame["prelabel"]])
        frame = frame.rename(columns={"label": TAGS_COLUMN})
    if fmt == "csv":
        frame.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
    else:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in frame.to_dict("records"):
                clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
                handle.write(json.dumps(clean, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return len(frame)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _tags_cell(answer) -> str:
    """A multi-label answer's CSV cell: the text form, ``none`` for the empty set, ``skip``,
    "" for no answer."""
    if _missing(answer):
        return ""
    return NO_TAGS if answer == "" else answer


def _tags_json(answer):
    """A multi-label answer's JSONL value: a list of tags ([] for none apply), "skip", or
    None for no answer."""
    if _missing(answer):
        return None
    return SKIP if answer == SKIP else sorted(parse_tags(answer))


def _check_no_tags_spelling(tags: list[str]) -> None:
    if NO_TAGS in tags:
        raise ReviewError(f"a tag is named {NO_TAGS!r}, which a CSV file spells as 'none of these tags apply'; "
                          "use JSONL (.jsonl) or Label Studio (.json) for this project")


def tag_answer(value, tags: list[str], where: str) -> str | None:
    """A multi-label file's answer cell as an answer: None (left for later) for an empty cell
    or null; ``skip``; "" for ``none`` or an empty list (none of these tags apply); else the
    tags' text form (a ``;``-separated cell or a JSON list). A tag outside ``tags`` is a
    one-line :class:`ReviewError` naming ``where``."""
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, list):
        if not all(isinstance(tag, str) for tag in value):
            raise ReviewError(f"{where}: labels must be a list of tag names, got {value!r}")
        if value == [SKIP]:
            return SKIP
        try:
            value = format_tags(value)
        except ValueError as exc:
            raise ReviewError(f"{where}: {exc}") from None
        return check_tag_answer(value, tags, where)
    if not isinstance(value, str):
        raise ReviewError(f"{where}: labels must be tags separated by ';', {NO_TAGS!r}, {SKIP!r} or empty, "
                          f"got {value!r}")
    value = value.strip()
    if value.lower() == NO_TAGS:
        return ""
    return check_tag_answer(value, tags, where)


# Label Studio's names in the labeling config the exported tasks fit:
#   <View><Text name="text" value="$text"/>
#     <Choices name="label" toName="text" choice="single"><Choice value="ham"/>...</Choices></View>
LS_FROM, LS_TO = "label", "text"


def _ls_choice(label: str, multiple: bool = False) -> list[dict]:
    if multiple:  # a tag set: its tags as the choices; none apply is a result without choices
        chosen = sorted(parse_tags(label))
        if not chosen:  # Label Studio results choose something; none apply is no result at all
            return []
        return [{"from_name": LS_FROM, "to_name": LS_TO, "type": "choices", "value": {"choices": chosen}}]
    return [{"from_name": LS_FROM, "to_name": LS_TO, "type": "choices", "value": {"choices": [label]}}]


def label_studio_config(classes: list[str], multiple: bool = False) -> str:
    """The Label Studio labeling config (XML) that exported tasks are shown with;
    ``multiple``: a multi-label project's tags, any number of them chosen."""
    choices = "".join(f'<Choice value="{c}"/>' for c in classes)
    return (f'<View><Text name="{LS_TO}" value="${LS_TO}"/><Choices name="{LS_FROM}" toName="{LS_TO}" '
            f'choice="{"multiple" if multiple else "single"}">{choices}</Choices></View>')


def label_studio_tasks(store: Store, batch_id: str, batch: pd.DataFrame, multiple: bool = False) -> list[dict]:
    """A batch as Label Studio tasks (its JSON import/export format), one per item:
    ``data`` (``text``, and alflow's ``item_id``, ``batch_id``, ``rank``, ``overlap``,
    ``answers``: every answer given to the item and who gave it), ``predictions`` (the
    offered pre-label as a Choices result with the model's confidence as ``score``; none
    for a control item or an item asked again, which Label Studio would preselect) and
    ``annotations`` (each annotator's latest answer in this batch: a Choices result, a skip
    as ``was_cancelled``, ``lead_time`` the labeling seconds, ``created_username`` the
    annotator). ``multiple``: a multi-label batch, each result choosing its tags (an
    empty choices list: none of these tags apply)."""
    answers = store.query_df(
        "SELECT item_id, annotator, label, seconds, created_at FROM batch_answers WHERE batch_id = ? ORDER BY label_id",
        [batch_id])
    model = store.batch(batch_id).get("model_version")
    given = store.answers_given(batch["item_id"].tolist())
    tasks = []
    for row in batch.itertuples(index=False):
        data = {"text": document(row.title, row.text), "item_id": row.item_id, "batch_id": batch_id,
                "rank": int(row.rank), "source": row.source, "picked_by": reviewer_reason(row.picked_by),
                "overlap": int(row.overlap),
                "answers": reasked_note(row, given.get(row.item_id, [])) or given_text(given.get(row.item_id, []))}
        predictions = []
        offered = shown_prelabel(row)
        if offered is not None:  # Label Studio preselects a prediction: none for blind or re-asked items
            version = ("alflow-llm" if getattr(row, "prelabel_by", None) == "llm" else
                       f"alflow-v{int(model)}" if model is not None and not pd.isna(model) else "alflow")
            predictions.append({"model_version": version,
                                "score": None if pd.isna(row.confidence) else round(float(row.confidence), 4),
                                "result": _ls_choice(offered, multiple)})
        annotations = []
        for answer in answers[answers["item_id"] == row.item_id].itertuples(index=False):
            cancelled = answer.label == SKIP
            annotations.append({
                "result": [] if cancelled else _ls_choice(answer.label, multiple), "was_cancelled": cancelled,
                "ground_truth": False, "created_username": answer.annotator,
                "created_at": pd.Timestamp(answer.created_at).isoformat() + "Z",
                "lead_time": None if pd.isna(answer.seconds) else float(answer.seconds),
            })
        tasks.append({"id": int(row.rank), "data": data, "predictions": predictions, "annotations": annotations})
    return tasks


def _read_answers(path: Path, fmt: str, multiple: bool = False) -> list[tuple[str, dict]]:
    """(where, row) pairs from a CSV or JSONL answers file ('line 3'), or from Label Studio
    tasks ('task 2': one row per annotation; see :func:`_label_studio_rows`)."""
    rows = []
    if fmt == "csv":  # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte order mark
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                rows.append((f"line {reader.line_num}", row))
    elif fmt == "label-studio":
        return _label_studio_rows(path, multiple)
    else:
        with open(path, encoding="utf-8-sig") as handle:
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


def _ls_label(results, where: str, multiple: bool = False):
    """The label of a Label Studio result list: its one choice, or with ``multiple`` the
    list of chosen tags ([] when the result chooses none or there is no Choices result:
    none apply); None when a single-label result has no Choices result."""
    for result in results or []:
        if isinstance(result, dict) and result.get("type") == "choices":
            choices = (result.get("value") or {}).get("choices") or []
            if multiple:
                return [str(c) for c in choices]
            if len(choices) != 1:
                raise ReviewError(f"{where}: a Choices result must hold one choice, not {choices!r}")
            return str(choices[0])
    return [] if multiple else None


def _label_studio_rows(path: Path, multiple: bool = False) -> list[tuple[str, dict]]:
    """One row per annotation of each Label Studio task: item_id (``data.item_id``), label
    (the Choices result; ``skip`` for a cancelled annotation), annotator, prelabel (the
    first prediction's choice), seconds (``lead_time``), batch_id (``data.batch_id``). A
    task without annotations is a row with an empty label (unanswered). ``multiple``: a
    multi-label batch, labels are lists of tags (a submitted annotation choosing none: [],
    none apply)."""
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
        shown = (_ls_label(predictions[0].get("result"), where, multiple)
                 if predictions and isinstance(predictions[0], dict) else None)
        if multiple and shown is not None:
            shown = format_tags(shown) if isinstance(shown, list) else shown
        base = {"item_id": data["item_id"], "batch_id": data.get("batch_id"), "prelabel": shown}
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
        if not annotations:
            rows.append((f"task {number}", dict(base, label="")))
        for annotation in annotations:
            label = SKIP if annotation.get("was_cancelled") else _ls_label(annotation.get("result"), where, multiple)
            if not multiple:
                label = label or ""
            rows.append((f"task {number}", dict(base, label=label, annotator=_ls_username(annotation),
                                                seconds=annotation.get("lead_time"))))
    return rows


def import_answers(store: Store, settings: Settings, path: str | Path, *, annotator: str,
                   batch_id: str | None = None, fmt: str | None = None,
                   late: bool = False) -> tuple[LabelWrite, int, str]:
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
    A batch that is no longer open (labeled, expired) takes no answers unless ``late``
    (:meth:`Store.record_labels`: then items answered here leave any open batch).
    Returns (what was written, rows left unanswered, the batch_id).

    With task = "multi_label" the answers are the ``labels`` column (see
    :func:`export_batch` and :func:`tag_answer`: an empty cell or null is left for later,
    ``none`` or ``[]`` is "none of these tags apply"); Label Studio annotations choose any
    number of tags (none chosen: none apply).
    """
    path = Path(path)
    if not path.is_file():
        raise ReviewError(f"{path}: no such file")
    fmt = file_format(path, fmt)
    multi = settings.task == "multi_label"
    try:
        rows = _read_answers(path, fmt, multi)
    except UnicodeDecodeError as exc:
        raise ReviewError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    if not rows:
        raise ReviewError(f"{path.name}: no rows")
    answer_column = TAGS_COLUMN if multi and fmt != "label-studio" else "label"
    if multi and fmt == "csv":
        _check_no_tags_spelling(list(settings.labels))
    for column in ("item_id", answer_column):
        if column not in rows[0][1]:
            raise ReviewError(f"{path.name}: no '{column}' column")
    file_batches = {str(r.get("batch_id")).strip() for _, r in rows if r.get("batch_id")}
    if batch_id is None and len(file_batches) > 1:
        raise ReviewError(f"{path.name}: rows from several batches {sorted(file_batches)}; pass --batch")
    batch_id = batch_id or (file_batches.pop() if file_batches else None) or _only_open_batch(store)
    batch = store.batch(batch_id)
    if batch is None:
        raise ReviewError(f"batch {batch_id} does not exist")
    closed_batch_check(batch, late)
    items = store.batch_items(batch_id)
    members = set(items["item_id"])
    adjudicated = set(items.loc[items["picked_by"] == ADJUDICATION, "item_id"])
    answers, unanswered, seen = [], 0, {}
    for at, row in rows:
        item_id = str(row.get("item_id") or "").strip()
        who = str(row.get("annotator") or "").strip() or annotator
        where = f"{path.name} {at}"
        if multi:  # None: left for later; "" is an answer (none of the tags applies)
            label = tag_answer(row.get(answer_column), list(settings.labels), where)
        else:
            label = str(row.get("label") or "").strip()
        if item_id not in members:
            raise ReviewError(f"{where}: item {item_id or '(empty)'} is not in batch {batch_id}")
        if label is None or (not multi and not label):
            unanswered += 1
            continue
        if (item_id, who) in seen:
            by = "" if who == annotator else f" by {who}"
            raise ReviewError(f"{where}: item {item_id} is answered again{by} (first on {seen[item_id, who]})")
        seen[item_id, who] = at
        if len(who) > 64:
            raise ReviewError(f"{where}: annotator {who[:20]!r}... is longer than 64 characters")
        if not multi:
            _check_label(label, settings.labels, where)
        seconds = row.get("seconds")
        if seconds in (None, ""):
            seconds = None
        else:
            try:
                seconds = float(seconds)
            except (TypeError, ValueError):
                raise ReviewError(f"{where}: seconds {seconds!r} is not a number") from None
        if multi:  # the pre-label shown, spelled as the answers are
            shown = (row.get("prelabel") if fmt == "label-studio" else  # already a text form, or None
                     tag_answer(row.get("prelabel"), list(settings.labels), f"{where} prelabel"))
        else:
            shown = str(row.get("prelabel") or "").strip() or None
        origin = ADJUDICATION if item_id in adjudicated else None
        answers.append(Answer(item_id, label, shown, annotator=who, origin=origin, seconds=seconds))
    fault_point("review-mid-import")  # every row checked; the one write below stores them all or none
    written = store.record_labels(answers, annotator=annotator, origin="import", batch_id=batch_id, late=late)
    return written, unanswered, batch_id
