"""The Prefect Resume form of a review round: building it, and reading what came back."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

import pandas as pd
from pydantic import AfterValidator, AliasChoices, ConfigDict, Field, create_model

from alflow.config import SKIP
from alflow.tasks.report import markdown_text
from alflow.tasks.review.items import (
    ADJUDICATION,
    ReviewError,
    batch_count_text,
    field_name,
    field_rank,
    item_heading,
    legacy_field_name,
    plural,
    prelabel_seen,
    probabilities_text,
    reasked_note,
    shown_prelabel,
    trim,
)
from alflow.tasks.store import RECHECK, Answer, document

STORED_ANSWERS = "stored_answers"


# -- a multi-label field: a list of tags, or [skip] ---------------------------------------
# The JSON schema the server checks a submitted multi-select against (the UI shows its
# message): each choice once, and skip only alone.
_SELECTION_SCHEMA = {"uniqueItems": True, "if": {"contains": {"const": SKIP}}, "then": {"maxItems": 1}}


def _check_selection(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError(f"a tag is chosen twice in {value}")
    if SKIP in value and len(value) > 1:
        raise ValueError(f"{SKIP!r} must be chosen alone (it skips the item), not with tags {value}")
    return value


def selection_answer(value) -> str:
    """A submitted field value as an answer: a multi-select's list (``[]``: "none of these
    tags apply", ``["skip"]``: skip) as its text form (:func:`format_tags`); a single
    choice (a string) as it is."""
    from alflow.tasks.multilabel.tags import format_tags

    if isinstance(value, (list, tuple)):
        _check_selection(list(value))
        return SKIP if list(value) == [SKIP] else format_tags(value)
    return value


def answer_selection(answer: str) -> list[str]:
    """The multi-select value of a stored answer: its tags in sorted order, ``["skip"]``
    for a skip, ``[]`` for "none apply" (the inverse of :func:`selection_answer`)."""
    from alflow.tasks.multilabel.tags import parse_tags

    return [SKIP] if answer == SKIP else sorted(parse_tags(answer))


def _ui_schema(schema: dict) -> None:
    # A field with a default shows as "(Optional)" in the UI; every item needs an answer
    # (the default only makes agreeing free), so the schema marks them all required.
    # `stored_answers` is for `alflow resume` only: the UI neither shows nor sends it.
    schema.get("properties", {}).pop(STORED_ANSWERS, None)
    schema.pop("additionalProperties", None)
    schema["required"] = list(schema.get("properties", {}))


def form_description(batch_id: str, batch: pd.DataFrame, cold_start: bool, independent: bool = False,
                     task: str = "single_label") -> str:
    """What the Resume form says above its fields (Markdown): the batch and its size
    (:func:`batch_count_text`), why an item has nothing preselected (a cold start: no model
    yet) or, on a cold start pre-labeled by the LLM, that the preselected classes are its
    suggestions, the items asked again, and for a later overlap round who must answer.

    ``batch``: the round's rows (:meth:`Store.batch_items`); ``cold_start``: the batch was
    queried without a model. ``task = "multi_label"``: each item is a multi-select of tags."""
    lines = [f"**Batch {markdown_text(batch_id)}: {batch_count_text(batch)}.**"]
    one = len(batch) == 1
    llm = cold_start and "prelabel_by" in batch and (batch["prelabel_by"] == "llm").any()
    if task == "multi_label":
        lines.append("Choose every tag that applies to each item; an item with none selected is answered "
                     "\"none of these tags apply\". Choose skip alone to skip an item. "
                     + ("No model yet (cold start): each item's preselected tags are the LLM's suggestion (a tag "
                        "set comes with no confidence): leave them to agree, add or remove tags to correct them. "
                        "An item shown without one starts with none selected." if llm else
                        "No model yet (cold start): nothing is preselected." if cold_start else
                        "The model's tags are preselected where it may show them: leave them to agree, add or "
                        "remove tags to correct them. An item shown without a pre-label starts with none "
                        "selected.")
                     + (" These items need an independent answer, from someone who has not answered them yet."
                        if independent else ""))
    elif independent:
        lines.append(f"{plural(len(batch), 'item')} of this batch still {'needs' if one else 'need'} an independent "
                     f"answer, from someone who has not answered {'it' if one else 'them'} yet. A field is preset "
                     "to the model's pre-label where there is one, never to another annotator's answer.")
    elif llm:
        lines.append("No model yet (cold start): each item's pre-label is the LLM's suggestion, preselected, with "
                     "its confidence in the item's heading (or \"no confidence given\"): leave it to agree, choose "
                     "another class to correct it, or skip. An item shown without one needs a choice.")
    elif cold_start:
        lines.append("No model yet (cold start): nothing is preselected, so choose a class (or skip) for every "
                     "item. From the next batch on, the model's pre-label is preselected and agreeing costs "
                     "nothing.")
    else:
        lines.append("Each item's pre-label is preselected: leave it to agree, choose another class to correct "
                     "it, or skip. An item shown without one needs a choice.")
    reasked = int(batch["picked_by"].isin([ADJUDICATION, RECHECK]).sum())
    if reasked:
        lines.append(f"{plural(reasked, 'item')} marked ADJUDICATE or RECHECK {'is' if reasked == 1 else 'are'} "
                     "asked again: the answers given so far are shown, and yours decides.")
    return "\n\n".join(lines)


def build_review_form(batch: pd.DataFrame, classes: list[str], text_chars: int, annotator: str | None,
                      shown: dict[str, str | None] | None = None,
                      given: dict[str, list[tuple[str, str]]] | None = None, independent: bool = False,
                      description: str | None = None, task: str = "single_label"):
    """A ``RunInput`` subclass for one batch (rows of :meth:`Store.batch_items`).

    One field per item, in rank order, named '#1', '#2', ... (:func:`field_name`; a
    submission with the legacy names item_001, ... is read too): its heading as the title,
    its text (trimmed to ``text_chars``) as the description, the classes plus ``skip`` as the choices and the
    pre-label (or an answer already stored for it) as the default. An item without a
    pre-label (a cold start, a control item: :func:`shown_prelabel`) has no default and
    must be chosen. A last field names the annotator.

    The UI shows titles as plain text and renders descriptions as Markdown, so the text
    goes through :func:`~alflow.tasks.report.markdown_text` and the title does not.
    A hidden ``stored_answers`` flag (not in the UI's schema) is set by `alflow resume`:
    its values are the answers already stored, not a reviewer's.

    ``shown`` (field -> default, None for none; see :func:`shown_form_defaults`) rebuilds
    the form a run showed when it stopped for review: a replayed run must judge what was
    untouched against those defaults, not against answers stored since.

    Items asked again (adjudications, first in the batch, and rechecks) show every answer
    given and who gave it (``given``: item_id -> [(annotator, answer)]) and, for a recheck,
    the model's suggestion; they have no default.
    ``independent``: a later round of an overlap review, asking a further annotator for
    items others answered: defaults are the pre-labels, never others' answers, and the
    annotator (``None``: no default) must be someone new.
    ``description``: Markdown the UI shows above the fields (:func:`form_description`).

    ``task = "multi_label"``: ``classes`` are the tags, and each field is a multi-select
    (a JSON-schema array of the tags plus ``skip``, each once, ``skip`` only alone) whose
    default is the offered pre-label's tags (accepting it as is answers that set), else
    nothing selected; an empty selection is the answer "none of these tags apply". The
    description starts with the model's probability of each tag where a pre-label is
    offered (the batch's ``tag_proba`` column, :func:`review_round_items`).
    """
    from prefect.input import RunInput

    class ReviewForm(RunInput):
        model_config = ConfigDict(json_schema_extra=_ui_schema)

        stored_answers: bool = False

    choices = Literal[tuple(classes) + (SKIP,)]  # type: ignore[valid-type]
    multi = task == "multi_label"
    fields = {}
    for row in batch.itertuples(index=False):
        text = document(row.title, row.text, sep=" — ")
        default = row.answer if isinstance(row.answer, str) and not independent else shown_prelabel(row)
        text_markdown = markdown_text(trim(text, text_chars))
        note = reasked_note(row, (given or {}).get(row.item_id, []))
        if note is not None:  # no default but an answer given in this batch: the reviewer chooses
            head, _, rest = note.partition(". ")
            text_markdown = f"**{markdown_text(head)}.** {markdown_text(rest)}\n\n{text_markdown}"
            default = row.answer if isinstance(row.answer, str) else None
        if shown is not None:
            default = shown.get(field_name(row.rank))
        if multi:
            fields[field_name(row.rank)] = _tags_field(row, default, text_markdown, classes)
            continue
        fields[field_name(row.rank)] = (
            choices,
            Field(default if isinstance(default, str) else ..., title=item_heading(row), description=text_markdown,
                  validation_alias=AliasChoices(field_name(row.rank), legacy_field_name(row.rank))),
        )
    who = ("Who is answering; stored with every label." if not independent else
           "Who is answering: these items need an independent answer from someone who has not answered them yet.")
    fields["annotator"] = (
        str,
        Field(annotator if annotator else ..., title="Annotator", description=who, min_length=1, max_length=64),
    )
    form = create_model("ReviewBatch", __base__=ReviewForm, **fields)
    if description:
        form._description = description  # saved with the form; the UI shows it above the fields
    return form


def _tags_field(row, default, text_markdown: str, tags: list[str]) -> tuple:
    """The multi-select field of one item (see :func:`build_review_form`): ``default`` is a
    text form (an answer or the offered pre-label), a list (a saved form's default when
    replaying) or None (nothing selected)."""
    choice = Literal[tuple(tags) + (SKIP,)]  # type: ignore[valid-type]
    selected = answer_selection(default) if isinstance(default, str) else list(default or [])
    proba = getattr(row, "tag_proba", None)
    if shown_prelabel(row) is not None and isinstance(proba, (list, tuple)) and len(proba) == len(tags):
        text_markdown = f"Model: {markdown_text(probabilities_text(tags, proba))}\n\n{text_markdown}"
    hint = ("Choose every tag that applies; none selected means none of them applies; "
            f"choose {SKIP} alone to skip the item.")
    return (Annotated[list[choice], AfterValidator(_check_selection)],  # type: ignore[valid-type]
            Field(selected, title=item_heading(row, multi_label=True), description=f"{text_markdown}\n\n*{hint}*",
                  validation_alias=AliasChoices(field_name(row.rank), legacy_field_name(row.rank)),
                  json_schema_extra=dict(_SELECTION_SCHEMA)))


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
    return {field_name(rank) if (rank := field_rank(name)) is not None else name: spec.get("default")
            for name, spec in schema.get("properties", {}).items()}


def answers_from_form(values: dict, batch: pd.DataFrame, form_seconds: float | None = None) -> list[Answer]:
    """The form's values (field -> label) as answers, in rank order, each with the model's
    label its field showed (:func:`prelabel_seen`); adjudication items' answers have origin
    'adjudication'. ``form_seconds``: each answer's share of the form's wait (not labeling
    time: the form may have sat open)."""
    answers = []
    for row in batch.itertuples(index=False):
        name = field_name(row.rank)
        if name not in values:
            raise ReviewError(f"the review input has no field {name} (item {row.item_id})")
        origin = ADJUDICATION if row.picked_by == ADJUDICATION else None
        answers.append(Answer(row.item_id, selection_answer(values[name]), prelabel_seen(row), origin=origin,
                              form_seconds=form_seconds))
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
            value = values.get(name)
            defaults[row.item_id] = None if value is None else selection_answer(value)
            continue
        field = form.model_fields.get(name)
        default = None if field is None or field.is_required() else field.default
        if isinstance(default, list):
            # A multi-select always has a default ([]: nothing preselected), and an untouched
            # [] must keep an answer given meanwhile, as any untouched default does.
            default = selection_answer(default)
        defaults[row.item_id] = default if isinstance(default, str) else None
    return defaults
