"""What a run shows in the Prefect UI: the batch, the review link, the cycle summary."""

from __future__ import annotations

import base64
import json
import math
import os
import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd

_MARKDOWN_ESCAPES = str.maketrans({c: "\\" + c for c in string.punctuation})

# The keyed artifact every cycle adds a version to: the UI's Artifacts page shows the latest.
LEARNING_CURVE_KEY = "alflow-learning-curve"
# The same picture as a file, beside the database, rewritten every cycle.
LEARNING_CURVE_PNG = "learning-curve.png"


def markdown_text(text) -> str:
    """``text`` for a place the Prefect UI renders as Markdown, so that it shows as typed.

    The UI renders Resume-form field descriptions, every cell of a table artifact and
    markdown artifacts with its Markdown renderer, which passes raw HTML through (``<img
    src=x>`` becomes an image) and makes links of ``[a](javascript:...)``. CommonMark lets
    any ASCII punctuation character be backslash-escaped and shows it literally (without
    the backslash), so every one is: no markup, link, entity (``&amp;``), autolink, or HTML
    survives. Whitespace runs, newlines included, become one space, so that the text stays
    one paragraph (a line can start no heading, list, quote or table row). Field *titles*
    are plain text in the UI and must not go through this (the backslashes would show).
    """
    return " ".join(str(text).split()).translate(_MARKDOWN_ESCAPES)


def run_url(flow_run_id: str, ui_url: str | None = None) -> str | None:
    """The flow run's page in the Prefect UI at ``ui_url`` (default: the configured UI),
    or None when there is no UI."""
    from prefect.settings import get_current_settings

    ui = ui_url or get_current_settings().ui_url
    return f"{str(ui).rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def batch_rows(batch: pd.DataFrame, text_chars: int = 160, answers: bool = False) -> list[dict]:
    """The batch as table rows for the UI (rank, pre-label, confidence, score, text), as a
    reviewer may see them: no pre-label for a control item (blind) or an item asked again,
    and ``picked_by`` only for the latter (see :func:`~alflow.tasks.review.reviewer_reason`).
    ``answers``: with an ``answer`` column (the latest answer in the batch, '' for none),
    for a batch whose review is over.

    The UI renders each cell as Markdown: text cells go through :func:`markdown_text`.
    """
    from alflow.tasks.review import reviewer_reason, shown_prelabel, trim

    rows = []
    for r in batch.itertuples(index=False):
        row = {
            "rank": int(r.rank),
            "source": markdown_text(r.source),
            "prelabel": markdown_text(shown_prelabel(r) or ""),
            "confidence": _fmt(r.confidence if shown_prelabel(r) else None),
            "score": _fmt(r.score),
            "picked_by": reviewer_reason(r.picked_by),
        }
        if answers:
            row["answer"] = markdown_text(r.answer if isinstance(r.answer, str) else "")
        rows.append(dict(row, text=markdown_text(trim(r.text, text_chars)), item_id=r.item_id))
    return rows


# The run's artifacts of its review: the batch as a table, and a link to the Resume form.
BATCH_KEY = "review-batch"
FORM_KEY = "review-form"


def batch_description_start(batch_id: str) -> str:
    """How the descriptions of a batch's review artifacts begin (how they are found again)."""
    return f"Batch {batch_id}:"


def publish_batch(batch_id: str, batch: pd.DataFrame, flow_run_id: str) -> str | None:
    """Table artifact of the queried batch and a link artifact to the Resume form."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    from alflow.tasks.review import batch_count_text

    start = batch_description_start(batch_id)
    create_table_artifact(
        key=BATCH_KEY, table=batch_rows(batch),
        description=f"{start} {batch_count_text(batch)} waiting for review, most informative first.",
    )
    url = run_url(flow_run_id)
    if url:
        create_link_artifact(
            key=FORM_KEY, link=url, link_text=f"Review batch {batch_id} (Resume form)",
            description=f"{start} open the paused run and press Resume: one field per item, pre-label "
                        "preselected.",
        )
    return url


def finish_batch_artifacts(batch_id: str, batch: pd.DataFrame, flow_run_id: str | None, status: str,
                           outcome: str) -> int:
    """Say on the run's review artifacts (:func:`publish_batch`) that the batch's review is
    over: the table gets each item's answer and a description naming ``status`` ('labeled',
    'expired') and ``outcome`` (:func:`review_outcome`); the link says there is nothing to
    resume. Updated in place, so the run and the keys' latest versions show one finished
    batch. Returns how many artifacts were updated (0 when the run published none)."""
    import json
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    from alflow.tasks.review import batch_count_text

    start = batch_description_start(batch_id)
    updates = {
        BATCH_KEY: ArtifactUpdate(data=json.dumps(batch_rows(batch, answers=True)),
                                  description=f"{start} {batch_count_text(batch)}, {status}: {outcome}."),
        FORM_KEY: ArtifactUpdate(description=f"{start} {status}; its review is over, nothing waits to be "
                                             "resumed."),
    }
    updated = 0
    for key, update in updates.items():
        artifact_id = find_artifact(flow_run_id, key, start)
        if artifact_id is None:
            continue
        with get_client(sync_client=True) as client:
            client.update_artifact(UUID(artifact_id), update)
        updated += 1
    return updated


# How each ``labels.origin`` came in, as the summary lines say it.
ORIGIN_WORDS = {"ui": "from the Resume form", "cli": "from the terminal", "import": "from a file",
                "simulated": "from the simulated annotator"}


def arrival_text(origins: dict[str, int]) -> str:
    """'from the terminal'; '12 from the Resume form, 8 from the terminal, 1 adjudication':
    how a batch's answers arrived, from the count of each origin (most first); '' for none."""
    if not origins:
        return ""
    ordered = sorted(origins.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ordered) == 1:
        origin, n = ordered[0]
        if origin in ORIGIN_WORDS:
            return ORIGIN_WORDS[origin]
        return "adjudications" if n > 1 else "an adjudication"  # origin 'adjudication', whichever way it came
    from alflow.tasks.review import plural

    return ", ".join(f"{n} {ORIGIN_WORDS[o]}" if o in ORIGIN_WORDS else plural(n, o) for o, n in ordered)


def answers_line(agreement: dict) -> str:
    """'20 answers, 13 kept the pre-label, 6 changed it, 1 skipped': a batch's answers
    against the pre-labels shown with them (:meth:`Store.prelabel_agreement`); the answers
    given without one are counted apart ('none shown a pre-label' on a cold start)."""
    from alflow.tasks.review import plural

    if not agreement.get("answers"):
        return "no answers"
    parts = [plural(agreement["answers"], "answer")]
    if agreement.get("shown"):
        parts += [f"{agreement['kept']} kept the pre-label", f"{agreement['changed']} changed it"]
        if agreement.get("skipped"):
            parts.append(f"{agreement['skipped']} skipped")
        if agreement.get("not_shown"):
            parts.append(f"{agreement['not_shown']} given without a pre-label")
    else:
        parts.append("none shown a pre-label")
    return ", ".join(parts)


def outcome_line(answers: str, arrival: str) -> str:
    """'20 answers, 13 kept the pre-label, 6 changed it, 1 skipped (from the terminal)'."""
    return f"{answers} ({arrival})" if arrival else answers


def review_outcome(store, batch_id: str) -> tuple[str, str]:
    """A batch as stored, each annotator's answer that holds in it (``batch_answers``):
    its :func:`outcome_line` and, apart, its :func:`arrival_text`."""
    history = store.batch_answer_history(batch_id)
    current = history[history["current"]]
    origins = {str(k): int(v) for k, v in current["origin"].value_counts().items()}
    arrival = arrival_text(origins)
    return outcome_line(answers_line(store.prelabel_agreement(batch_id)), arrival), arrival


def llm_report(store, batch_id: str | None) -> dict | None:
    """The LLM's part in a cycle, for its report: ``prelabels`` (how the batch's answers
    took the pre-labels shown, apart by who suggested them: :meth:`Store.prelabel_kept`)
    and ``usage`` (what the run that queried the batch asked the LLM, summed over its
    steps: :meth:`Store.llm_usage`); None when the LLM had no part (nothing asked, no LLM
    pre-label shown)."""
    if batch_id is None:
        return None
    batch = store.batch(batch_id)
    run = batch["flow_run_id"] if batch is not None and isinstance(batch["flow_run_id"], str) else None
    usage = store.llm_usage(run) if run is not None else None
    kept = store.prelabel_kept(batch_id)
    if usage is None and not kept["llm"]["shown"]:
        return None
    return {"usage": usage, "prelabels": kept}


def kept_text(counts: dict) -> str:
    """'14 of 20 kept (5 changed, 1 skipped)': answers against the pre-labels shown
    (:meth:`Store.prelabel_kept`'s counts of one suggester)."""
    text = f"{counts['kept']} of {counts['shown']} kept"
    more = [f"{counts[key]} {key}" for key in ("changed", "skipped") if counts.get(key)]
    return text + (f" ({', '.join(more)})" if more else "")


def llm_usage_text(usage: dict) -> str:
    """'203 requests (3 retried), 2 failed, 1 outside the classes, 9,100 prompt + 400
    completion tokens, 8.2 s' (tokens: 'no token counts' when the server gave none), and
    why the endpoint could not be used, if it could not."""
    parts = [f"{usage['requests']} requests" + (f" ({usage['retried']} retried)" if usage.get("retried") else "")]
    parts += [f"{usage[key]} {words}" for key, words in (("failed", "failed"), ("outside", "outside the classes"),
                                                          ("malformed", "malformed")) if usage.get(key)]
    if usage.get("prompt_tokens") is None and usage.get("completion_tokens") is None:
        parts.append("no token counts")
    else:
        parts.append(f"{usage.get('prompt_tokens') or 0:,} prompt + {usage.get('completion_tokens') or 0:,} "
                     "completion tokens")
    parts.append(f"{usage.get('seconds') or 0:.1f} s")
    text = ", ".join(parts)
    return text + (f"; could not be used: {usage['error']}" if usage.get("error") else "")


def llm_lines(llm: dict) -> list[str]:
    """Markdown lines: the humans' agreement with the LLM's pre-labels, apart from the
    model's ('LLM pre-labels: 14 of 20 kept'), and what the run asked the LLM."""
    lines = []
    kept = llm.get("prelabels") or {}
    if (kept.get("llm") or {}).get("shown"):
        lines.append(f"- LLM pre-labels: **{kept_text(kept['llm'])}**")
        if (kept.get("model") or {}).get("shown"):
            lines.append(f"- model pre-labels: **{kept_text(kept['model'])}**")
    if llm.get("usage"):
        lines.append(f"- LLM: {markdown_text(llm_usage_text(llm['usage']))}")
    return lines


def cycle_markdown(counts: dict, cycles: pd.DataFrame, train: dict | None, batch_id: str | None,
                   label_summary: str, metric: str, agreement: dict | None = None,
                   curve_url: str | None = None, quality: dict | None = None,
                   annotators: dict | None = None, timings: dict | None = None, llm: dict | None = None) -> str:
    """The run summary: pool, labels, the batch (its answers against the pre-labels shown,
    :func:`answers_line`, and ``label_summary``: how they arrived, :func:`arrival_text`),
    this cycle's metrics vs the previous, learning curve (the picture at
    ``curve_url``, when given, above the table); with ``quality``
    (:func:`alflow.tasks.stopping.assess_cycle`) the control-slice estimate beside them,
    the label flags and every stopping rule's state; with ``timings`` (seconds by step,
    :mod:`alflow.tasks.timings`) where the cycle's time went; with ``llm``
    (:func:`llm_report`) the LLM's pre-labels kept and what it was asked."""
    import pandas as pd

    lines = ["# Active-learning cycle", ""]
    lines.append(f"- pool: **{counts['pool']}** items waiting of {counts['items']} stored"
                 + (f" ({counts['holdout']} held out for evaluation)" if counts.get("holdout") else ""))
    lines.append(f"- labeled: **{counts['labeled']}** items ({counts['skipped']} skipped)")
    if batch_id:  # '20 answers, 13 kept the pre-label, 6 changed it, 1 skipped (from the terminal)'
        line = label_summary if agreement is None else outcome_line(answers_line(agreement), label_summary)
        lines.append(f"- batch `{batch_id}`: {markdown_text(line)}")
    if llm is not None:
        lines += llm_lines(llm)
    if annotators is not None:  # alflow.tasks.agreement.agreement_report
        lines += annotator_lines(annotators)
    if train:
        decision = (train.get("metrics") or {}).get("self_training") or {}
        pseudo = decision.get("pseudo_labels")
        lines.append(f"- model: v{train['model_version']} — "
                     f"{'promoted' if train['promoted'] else 'not promoted'} ({train['reason']})"
                     + (f"; trained on {train['n_labels']} labels + {pseudo} self-training pseudo-labels"
                        if pseudo else ""))
        if decision.get("mode") == "auto":  # which it chose and why (alflow.tasks.modeling.self_train)
            lines.append(f"- self-training (auto): {'on' if decision.get('used') else 'off'}"
                         + (f" — {markdown_text(decision['reason'])}" if decision.get("reason") else ""))
    else:
        lines.append("- model: none yet")
    cycles = with_tag_metrics(cycles)
    if len(cycles):
        last = cycles.iloc[-1]
        previous = cycles.iloc[-2] if len(cycles) > 1 else None
        for name in shown_metrics(cycles):
            now = last[name]
            delta = ""
            if previous is not None and pd.notna(previous[name]) and pd.notna(now):
                delta = f" ({now - previous[name]:+.3f} vs cycle {int(previous['cycle'])})"
            lines.append(f"- {name}: **{_fmt(now)}**{delta}")
    if timings is not None:
        from alflow.tasks.timings import timings_line

        lines.append(f"- time: {timings_line(timings)}")
    if quality is not None:
        lines += quality_lines(quality)
    if len(cycles):
        lines += ["", f"## Learning curve ({metric})", ""]
        if curve_url:
            lines += [curve_image(curve_url, cycles), ""]
        lines += curve_table(cycles)
    return "\n".join(lines)


def annotator_lines(report: dict) -> list[str]:
    """Markdown lines: inter-annotator agreement overall and in this batch, each annotator's
    agreement with the consensus, and the items waiting for adjudication."""
    from alflow.tasks.agreement import agreement_line

    lines = [f"- {markdown_text(agreement_line(report))}"]
    if report.get("batch") and report["batch"]["items_overlapping"]:
        lines.append(f"  - this batch: {markdown_text(agreement_line(report['batch']))}")
    for name, figures in report["per_annotator"].items():
        if figures["compared"]:
            lines.append(f"  - {markdown_text(name)}: agrees with the consensus on {figures['agreement']:.0%} of "
                         f"{figures['compared']} shared items ({figures['answers']} answers)")
    return lines


def quality_lines(quality: dict) -> list[str]:
    """Markdown lines: the control-slice accuracy with its interval, the flagged labels
    (most likely wrong first) and each stopping rule's state."""
    from alflow.tasks.control import estimate_line

    lines = [f"- honest estimate (blind random control slice): **{estimate_line(quality['control'])}**"]
    flagged = quality.get("flagged") or []
    lines.append(f"- label check: **{quality['flags']}** likely label errors flagged"
                 + (f"; {len(flagged)} offered for re-review next:" if flagged else ""))
    for flag in flagged:
        lines.append(f"  - `{flag['item_id']}` labeled {markdown_text(flag['given_label'])}, model suggests "
                     f"{markdown_text(flag['suggested_label'])} (self-confidence {flag['score']:.3f})")
    stop = quality.get("stop")
    lines.append(f"- stopping: **{markdown_text(stop) + ' (fired)' if stop else 'no rule fired'}**")
    for rule in quality["rules"]:
        state = "fired" if rule["fired"] else ("on" if rule["configured"] else "reported only")
        lines.append(f"  - {rule['rule']} ({state}): {markdown_text(rule['detail'])}")
    return lines


def with_tag_metrics(cycles: pd.DataFrame) -> pd.DataFrame:
    """``cycles`` with a ``micro_f1`` column when they are a multi-label project's (their
    metrics JSON holds it; the table's ``accuracy`` column is then empty), else as is."""
    if "micro_f1" in cycles or "metrics" not in cycles or cycles.empty:
        return cycles
    parsed = [json.loads(m) if isinstance(m, str) else (m if isinstance(m, dict) else {}) for m in cycles["metrics"]]
    if not any("micro_f1" in m for m in parsed):
        return cycles
    return cycles.assign(micro_f1=[m.get("micro_f1") for m in parsed])


def shown_metrics(cycles: pd.DataFrame) -> tuple[str, str]:
    """The two metrics a summary shows: micro and macro F1 for tag sets, else accuracy and macro F1."""
    return ("micro_f1", "macro_f1") if "micro_f1" in cycles else ("accuracy", "macro_f1")


def curve_table(cycles: pd.DataFrame) -> list[str]:
    """The learning curve as Markdown table lines, one row per cycle."""
    import pandas as pd

    cycles = with_tag_metrics(cycles)
    first, second = shown_metrics(cycles)
    heading = {"accuracy": "accuracy", "micro_f1": "micro F1", "macro_f1": "macro F1"}
    lines = [f"| cycle | labels | {heading[first]} | {heading[second]} | model | promoted |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for row in cycles.itertuples(index=False):
        model = f"v{int(row.model_version)}" if pd.notna(row.model_version) else "–"
        lines.append(f"| {row.cycle} | {row.n_labels} | {_fmt(getattr(row, first))} | {_fmt(getattr(row, second))} | "
                     f"{model} | {'yes' if row.promoted else 'no'} |")
    return lines


def data_url(png: bytes) -> str:
    """``png`` inline, as a ``data:`` URL: the Prefect UI shows it offline, with no file
    server and nothing fetched from elsewhere."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def curve_image(url: str, cycles: pd.DataFrame | None = None) -> str:
    """The picture at ``url`` as Markdown, its alt text naming the two metrics drawn."""
    first = "micro F1" if cycles is not None and "micro_f1" in with_tag_metrics(cycles) else "accuracy"
    return f"![Learning curve: {first} and macro F1 against labels]({url})"


def curve_caption(cycles: pd.DataFrame) -> str:
    """One line on the latest cycle: labels, both metrics, its model."""
    import pandas as pd

    cycles = with_tag_metrics(cycles)
    last = cycles.iloc[-1]
    model = (f"model v{int(last['model_version'])} ({'promoted' if last['promoted'] else 'not promoted'})"
             if pd.notna(last["model_version"]) else "no model")
    first = "micro F1" if "micro_f1" in cycles else "accuracy"
    return (f"**cycle {int(last['cycle'])}**: {int(last['n_labels'])} labels · {first} "
            f"{_fmt(last[shown_metrics(cycles)[0]])} · macro F1 {_fmt(last['macro_f1'])} · {model}")


def learning_curve_markdown(cycles: pd.DataFrame, png_path: Path | None = None) -> str:
    """The keyed learning-curve artifact's body: the numbers behind the picture (which is
    in its description) and where the PNG file is."""
    lines = ["# Learning curve", "", curve_caption(cycles), "", *curve_table(cycles)]
    if png_path is not None:
        lines += ["", f"PNG: {markdown_text(png_path)}"]
    return "\n".join(lines)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Whoever has ``path`` open sees the old picture or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def curve_picture(cycles: pd.DataFrame, metric: str | None, database: Path) -> tuple[str, Path]:
    """Draw the learning curve of ``cycles``, write it beside ``database``
    (:data:`LEARNING_CURVE_PNG`) and return it as a ``data:`` URL, with the file's path."""
    from alflow.tasks.plots import learning_curve_png

    png = learning_curve_png(with_tag_metrics(cycles), metric)
    path = Path(database).parent / LEARNING_CURVE_PNG
    write_file_atomically(path, png)
    return data_url(png), path


def publish_learning_curve(cycles: pd.DataFrame, url: str, png_path: Path | None = None) -> str:
    """Add a version of the keyed artifact :data:`LEARNING_CURVE_KEY` for the last of
    ``cycles``, showing the picture at ``url`` (:func:`curve_picture`); returns its id.

    The picture is in the artifact's *description*, on its first line: the UI shows the
    first line of a description (as Markdown, images included) on the cards of the
    Artifacts page and of a run's Artifacts tab, and all of it on top of the key's page,
    while a body shows only on the artifact's own page. The description starts with
    :func:`curve_caption` ("**cycle N**: ..."), which tells whose cycle it is.
    """
    from prefect.artifacts import create_markdown_artifact

    artifact_id = create_markdown_artifact(key=LEARNING_CURVE_KEY, markdown=learning_curve_markdown(cycles, png_path),
                                           description=f"{curve_caption(cycles)} {curve_image(url, cycles)}")
    return str(artifact_id)


# The cycle-summary artifact's key, and its description (which names the cycle).
SUMMARY_KEY = "cycle-summary"


def summary_description(cycle: int) -> str:
    return f"Active-learning cycle {cycle} summary"


def publish_cycle(markdown: str, cycle: int) -> str:
    """The cycle summary as a markdown artifact; returns its id."""
    from prefect.artifacts import create_markdown_artifact

    return str(create_markdown_artifact(key=SUMMARY_KEY, markdown=markdown, description=summary_description(cycle)))


def find_artifact(flow_run_id: str | None, key: str, description_start: str) -> str | None:
    """The id of an artifact ``flow_run_id`` created under ``key`` whose description starts
    with ``description_start``, or None: how a run finds out whether an earlier attempt
    (stopped before it could record the id) had already published it."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    if not flow_run_id:
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return next((str(a.id) for a in found if (a.description or "").startswith(description_start)), None)
