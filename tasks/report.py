"""What a run shows in the Prefect UI: the batch, the review link, the cycle summary."""

from __future__ import annotations

import math

import pandas as pd


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


def batch_rows(batch: pd.DataFrame, text_chars: int = 160) -> list[dict]:
    """The batch as table rows for the UI (rank, pre-label, confidence, score, text)."""
    from alflow.tasks.review import trim

    return [
        {
            "rank": int(r.rank),
            "source": r.source,
            "prelabel": r.prelabel if isinstance(r.prelabel, str) else "",
            "confidence": _fmt(r.confidence),
            "score": _fmt(r.score),
            "picked_by": r.picked_by,
            "text": trim(r.text, text_chars),
            "item_id": r.item_id,
        }
        for r in batch.itertuples(index=False)
    ]


def publish_batch(batch_id: str, batch: pd.DataFrame, flow_run_id: str) -> str | None:
    """Table artifact of the queried batch and a link artifact to the Resume form."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    create_table_artifact(
        key="review-batch", table=batch_rows(batch),
        description=f"Batch {batch_id}: {len(batch)} items waiting for review, most informative first.",
    )
    url = run_url(flow_run_id)
    if url:
        create_link_artifact(
            key="review-form", link=url, link_text=f"Review batch {batch_id} (Resume form)",
            description="Open the paused run and press Resume: one field per item, pre-label preselected.",
        )
    return url


def cycle_markdown(counts: dict, cycles: pd.DataFrame, train: dict | None, batch_id: str | None,
                   label_summary: str, metric: str) -> str:
    """The run summary: pool, labels, this cycle's metrics vs the previous, learning curve."""
    lines = ["# Active-learning cycle", ""]
    lines.append(f"- pool: **{counts['pool']}** items waiting of {counts['items']} stored"
                 + (f" ({counts['holdout']} held out for evaluation)" if counts.get("holdout") else ""))
    lines.append(f"- labeled: **{counts['labeled']}** items ({counts['skipped']} skipped)")
    if batch_id:
        lines.append(f"- batch `{batch_id}`: {label_summary}")
    if train:
        lines.append(f"- model: v{train['model_version']} — "
                     f"{'promoted' if train['promoted'] else 'not promoted'} ({train['reason']})")
    else:
        lines.append("- model: none yet")
    if len(cycles):
        last = cycles.iloc[-1]
        previous = cycles.iloc[-2] if len(cycles) > 1 else None
        for name in ("accuracy", "macro_f1"):
            now = last[name]
            delta = ""
            if previous is not None and pd.notna(previous[name]) and pd.notna(now):
                delta = f" ({now - previous[name]:+.3f} vs cycle {int(previous['cycle'])})"
            lines.append(f"- {name}: **{_fmt(now)}**{delta}")
        lines += ["", f"## Learning curve ({metric})", "", "| cycle | labels | accuracy | macro F1 | model | promoted |",
                  "|---:|---:|---:|---:|---:|:---:|"]
        for row in cycles.itertuples(index=False):
            model = f"v{int(row.model_version)}" if pd.notna(row.model_version) else "–"
            lines.append(f"| {row.cycle} | {row.n_labels} | {_fmt(row.accuracy)} | {_fmt(row.macro_f1)} | "
                         f"{model} | {'yes' if row.promoted else 'no'} |")
    return "\n".join(lines)


def publish_cycle(markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key="cycle-summary", markdown=markdown, description="Active-learning cycle summary")
