"""What a review asks: the items of a batch and of each round, their headings, and its errors."""

from __future__ import annotations

import math
import re

import pandas as pd

from alflow.config import SKIP, Settings
from alflow.tasks.store import CONTROL, RECHECK, Store

# picked_by of an item whose answers tie or disagree: its answer is an adjudication.
ADJUDICATION = "adjudication"


class ReviewError(ValueError):
    """Answers cannot be taken; the one-line message names the row, item or value."""


def field_name(rank: int) -> str:
    """The Resume form's field of the item at ``rank``: '#1', '#2', ... as the reviewer
    numbers items, so that the form's own messages ("'#15' is a required property") name
    the item as the reviewer sees it."""
    return f"#{int(rank)}"


def legacy_field_name(rank: int) -> str:
    """The field's name in forms saved before fields were named '#N': item_001, ... (a run
    suspended then and resumed now still sends it)."""
    return f"item_{int(rank):03d}"


_FIELD = re.compile(r"#(\d+)|item_(\d+)")


def field_rank(name: str) -> int | None:
    """The rank a form field asks about ('#15' or the legacy 'item_015' -> 15), or None for
    any other field (the annotator)."""
    match = _FIELD.fullmatch(name)
    return None if match is None else int(match.group(1) or match.group(2))


def batch_count_text(batch: pd.DataFrame) -> str:
    """'20 items + 1 adjudication', '20 items (2 of them rechecks)': a batch's size as
    asked. Adjudications come on top of query.batch_size; rechecks are part of it."""
    adjudications = int((batch["picked_by"] == ADJUDICATION).sum())
    rechecks = int((batch["picked_by"] == RECHECK).sum())
    text = plural(len(batch) - adjudications, "item")
    if rechecks:
        text += f" ({rechecks} of them {'rechecks' if rechecks > 1 else 'a recheck'})"
    if adjudications:
        text += f" + {plural(adjudications, 'adjudication')}"
    return text


def plural(n: int, noun: str) -> str:
    """'1 item', '3 items'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def trim(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def given_text(given: list[tuple[str, str]]) -> str:
    """'alice: spam, bob: ham': every answer given to an item and who gave it."""
    return ", ".join(f"{who}: {label}" for who, label in given)


def shown_prelabel(row) -> str | None:
    """The pre-label a reviewer is offered for ``row`` (a batch item) as the default answer,
    or None. Never for an item asked again (an adjudication or a recheck: the earlier
    answers and the model's suggestion are shown beside it, and the reviewer chooses) nor
    for a control item (blind: its answer judges the model, so nothing of the model's is
    shown with it)."""
    if getattr(row, "picked_by", None) in (ADJUDICATION, RECHECK, CONTROL):
        return None
    return row.prelabel if isinstance(row.prelabel, str) else None


def prelabel_seen(row) -> str | None:
    """The model's label a reviewer saw with ``row``, recorded as the answer's
    ``prelabel_shown``: the offered pre-label (:func:`shown_prelabel`), or for a recheck the
    model's suggestion shown beside it."""
    if getattr(row, "picked_by", None) == RECHECK:
        return row.prelabel if isinstance(row.prelabel, str) else None
    return shown_prelabel(row)


def suggested_by_llm(row) -> bool:
    """True when ``row``'s pre-label is the LLM's suggestion (``prelabel_by`` 'llm'), not
    the trained model's."""
    return getattr(row, "prelabel_by", None) == "llm"


def confidence_text(confidence) -> str:
    """'62%', or 'no confidence given' (an LLM whose server returns no log-probabilities)."""
    if confidence is None or pd.isna(confidence):
        return "no confidence given"
    return f"{float(confidence):.0%}"


def item_heading(row, multi_label: bool = False) -> str:
    """'#3 · sms_spam · pre-label spam (62%)': rank, source, and how sure the model is;
    "#3 · sms_spam · LLM's pre-label spam (90%)" when the LLM suggested it (with 'no
    confidence given' when it gave none); '#4 · sms_spam · no pre-label' (a cold start
    without an LLM, a control item: the two look alike); 'ADJUDICATE #1 · sms_spam' for an
    item whose answers tie or disagree; 'RECHECK #2 · sms_spam' for a label the label
    check doubts. ``multi_label``: the pre-label is a tag set, shown by :func:`tags_text`."""
    if getattr(row, "picked_by", None) == ADJUDICATION:
        return f"ADJUDICATE #{row.rank} · {row.source}"
    if getattr(row, "picked_by", None) == RECHECK:
        return f"RECHECK #{row.rank} · {row.source}"
    head = f"#{row.rank} · {row.source}"
    prelabel = shown_prelabel(row)
    if prelabel is not None:
        who = "LLM's pre-label" if suggested_by_llm(row) else "pre-label"
        shown = tags_text(prelabel) if multi_label else prelabel
        return f"{head} · {who} {shown} ({confidence_text(row.confidence)})"
    return f"{head} · no pre-label"


def reasked_note(row, given: list[tuple[str, str]]) -> str | None:
    """For an item asked again, what the reviewer is told beside it (plain text): the
    answers given and who gave them, and for a recheck the model's suggestion; None for
    any other item."""
    answers = given_text(given) or "none"
    if getattr(row, "picked_by", None) == ADJUDICATION:
        return f"Answers disagree, your answer decides. Given: {answers}"
    if getattr(row, "picked_by", None) == RECHECK:
        suggestion = f"; the model suggests {row.prelabel}" if isinstance(row.prelabel, str) else ""
        return f"Asked again: the label check doubts the answer given. Given: {answers}{suggestion}"
    return None


def reviewer_reason(picked_by: str | None) -> str:
    """``picked_by`` as a reviewer may see it: why an item is asked again ('adjudication',
    'recheck'), else '' (so a control item cannot be told from an active pick)."""
    return picked_by if picked_by in (ADJUDICATION, RECHECK) else ""


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
    columns = ["item_id", "score", "prelabel", "confidence", "picked_by", "prelabel_by"]
    picks = picks.copy() if len(picks) else pd.DataFrame(columns=columns)
    pending = store.needs_adjudication(r.adjudication_threshold,
                                       r.adjudication_distance if settings.task == "multi_label" else None)
    pending = pending[~pending["item_id"].isin(set(picks["item_id"]))].head(settings.query.batch_size)
    adjudicate = pd.DataFrame({"item_id": pending["item_id"].to_numpy(dtype=object),
                               "score": pending["disagreement"].to_numpy(dtype=float),
                               "prelabel": None, "confidence": np.nan, "picked_by": ADJUDICATION,
                               "prelabel_by": None, "overlap": 1})
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
    replaying (``shown``: the form the run saved), exactly the fields that form had.
    ``tag_proba``: each item's per-tag probabilities from the batch's model (a list in
    ``labels`` order, None without one; :func:`tag_probabilities`), which a multi-label
    form shows beside an offered pre-label."""
    batch = store.batch_items(batch_id)
    proba = tag_probabilities(store, batch_id, batch["item_id"].tolist())
    batch["tag_proba"] = [proba.get(i) for i in batch["item_id"]]
    if round_ == 1:
        return batch
    if shown is not None:
        keep = [field_name(r) in shown for r in batch["rank"]]
    else:
        keep = batch["item_id"].isin(set(store.batch_needs(batch_id)["item_id"])).to_numpy()
    return batch[keep].reset_index(drop=True)


def _check_label(label: str, classes: list[str], where: str, task: str = "single_label") -> None:
    if task == "multi_label":
        check_tag_answer(label, classes, where)
    elif label not in classes and label != SKIP:
        raise ReviewError(f"{where}: label {label!r} is not one of {classes + [SKIP]}")


# -- multi-label answers (task = "multi_label"): a tag set's text form, or skip ----------------
def check_tag_answer(answer: str, tags: list[str], where: str) -> str:
    """``answer`` (``skip``, or a tag set's text form: "" is "none of these tags apply"),
    after checking every tag is one of ``tags``; one-line :class:`ReviewError` naming
    ``where`` and the tag otherwise."""
    from alflow.tasks.multilabel.tags import format_tags, parse_tags

    if answer == SKIP:
        return answer
    chosen = parse_tags(answer)
    if SKIP in chosen:
        raise ReviewError(f"{where}: {SKIP!r} is an answer of its own, not a tag; give it alone")
    outside = sorted(chosen - set(tags))
    if outside:
        raise ReviewError(f"{where}: tag {outside[0]!r} is not one of {list(tags)}")
    return format_tags(chosen)


def tags_text(answer: str | None) -> str:
    """A multi-label answer as a reader sees it: 'business + world', 'no tag (none apply)'
    for the empty set, 'skip', or '' for None (no answer)."""
    from alflow.tasks.multilabel.tags import parse_tags

    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return ""
    if answer == SKIP:
        return SKIP
    chosen = sorted(parse_tags(answer))
    return " + ".join(chosen) if chosen else "no tag (none apply)"


def tag_probabilities(store: Store, batch_id: str, item_ids: list[str]) -> dict[str, list[float]]:
    """item_id -> the per-tag probabilities (in ``labels`` order) the batch's model stored
    for it in ``predictions``; empty for a batch without a model (a cold start)."""
    version = store.batch(batch_id).get("model_version")
    if version is None or pd.isna(version) or not item_ids:
        return {}
    frame = store.query_df("SELECT item_id, proba FROM predictions WHERE model_version = ? AND item_id IN "
                           f"({', '.join('?' * len(item_ids))})", [int(version), *item_ids])
    return {i: [float(p) for p in proba] for i, proba in zip(frame["item_id"], frame["proba"])}


def probabilities_text(tags: list[str], proba) -> str:
    """'business 81% · scitech 4% · ...': one model probability per tag, in ``tags`` order."""
    return " · ".join(f"{tag} {float(p):.0%}" for tag, p in zip(tags, proba))


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


def find_batch(store: Store, ref: str) -> dict:
    """The batch ``ref`` names: its id, a prefix of exactly one batch id, or 'latest' (the
    one created last); a one-line :class:`ReviewError` naming ``ref`` otherwise."""
    batches = store.batches()
    if ref == "latest":
        if batches.empty:
            raise ReviewError("no batch has been queried yet (`alflow run` queries one)")
        return batches.iloc[-1].to_dict()
    exact = store.batch(ref)
    if exact is not None:
        return exact
    matches = batches[batches["batch_id"].str.startswith(ref)] if ref else batches.iloc[0:0]
    if len(matches) == 1:
        return matches.iloc[0].to_dict()
    if len(matches) > 1:
        raise ReviewError(f"batch {ref} is ambiguous: {len(matches)} batches start with it "
                          f"({', '.join(matches['batch_id'].head(5))}); give more of the id")
    raise ReviewError(f"batch {ref} does not exist (`alflow show latest` shows the newest batch)")


def closed_batch_check(batch: dict, late: bool) -> None:
    """One line when answers are offered to a batch that is no longer open, unless ``late``:
    the store's own refusal (:meth:`Store.record_labels`), said before a file is read or a
    terminal session starts."""
    from alflow.tasks.store.labels import closed_batch_line

    if batch["status"] != "open" and not late:
        raise ReviewError(closed_batch_line(batch["batch_id"], batch["status"], batch.get("closed_at")))
