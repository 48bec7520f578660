"""Stopping rules: when asking for more labels stops paying, and which rule said so.

Every rule is evaluated and reported each cycle; a rule whose threshold is set in
``[stopping]`` *fires* and stops the loop (`alflow run` ends, a served schedule opens no
more batches and `alflow status` says why):

* ``budget``: answers given (labeled + skipped items) reach ``stopping.budget``;
* ``budget_minutes``: labeling time (the seconds recorded with each answer) reaches it;
* ``target``: the control slice's accuracy (:mod:`alflow.tasks.control`) reaches
  ``stopping.target`` once it has ``target_min_control`` answers; before that the cycle's
  holdout / CV ``evaluation.metric`` is used, and the report names which;
* ``stabilizing``: Cohen's kappa between successive cycles' models' predictions on the
  fixed stop set is at least ``stabilizing_kappa`` for ``stabilizing_cycles`` cycles in a
  row (Bloodgood & Vijay-Shanker, 2009: predictions that stop changing).

Multi-label (``task = "multi_label"``): the target reads the control slice's configured
metric (micro F1 by default; for hamming_loss, lower is better, so the rule fires at or
below the target and the conservative bound is the upper one), and the stop-set agreement
of two models' predicted tag sets is the mean over tags of Cohen's kappa on "has the tag"
(:func:`stop_set_tag_kappa`), tags where kappa is undefined left out.
"""

from __future__ import annotations

import math
from typing import Sequence

import duckdb
import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import Settings
from alflow.tasks.agreement import cohen_kappa, per_tag_kappa
from alflow.tasks.control import current_estimate
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store, document

# Open label flags listed in a cycle's summary and in `alflow status`.
FLAGS_SHOWN = 10


def stop_set_kappa(store: Store, settings: Settings, model_version: int, previous: int | None) -> float | None:
    """Predict the stop set with ``model_version`` (stored once per model) and return
    Cohen's kappa against ``previous``'s stored predictions; None without a previous
    model, when it is the same model (no new model: nothing changed to compare), or when
    both predict a single class for every item (kappa undefined: degenerate, not stable)."""
    from alflow.tasks import modeling
    from alflow.tasks.train import model_file

    ids = store.stop_set_ids(settings.stopping.stop_set_size, settings.seed)
    current = store.stop_set_predictions(model_version)
    if len(current) == 0 and ids:
        row = store.model_row(model_version)
        model = modeling.load_model(model_file(settings, row),
                                    modeling.trusted_types(settings.model, settings.labels, settings.task))
        items = store.items(ids)
        docs = [document(t, x) for t, x in zip(items["title"], items["text"])]
        if settings.task == "multi_label":
            from alflow.tasks.multilabel.model import predict_tags

            labels = predict_tags(model, docs, settings.labels)
        else:
            proba = modeling.predict_proba(model, docs, settings.labels)
            labels = np.asarray(settings.labels, dtype=object)[proba.argmax(axis=1)].tolist()
        store.record_stop_set_predictions(model_version, items["item_id"].tolist(), labels)
        current = pd.Series(labels, index=items["item_id"].to_numpy(), dtype=object).sort_index()
    if previous is None or previous == model_version:
        return None
    before = store.stop_set_predictions(previous)
    common = current.index.intersection(before.index)
    if len(common) == 0:
        return None
    if settings.task == "multi_label":
        return stop_set_tag_kappa(current.loc[common].tolist(), before.loc[common].tolist(), settings.labels)
    kappa = cohen_kappa(current.loc[common].tolist(), before.loc[common].tolist())
    return None if math.isnan(kappa) else kappa  # NaN: both models gave one class to everything


def stop_set_tag_kappa(current: Sequence[str], before: Sequence[str], tags: Sequence[str]) -> float | None:
    """Agreement of two models' predicted tag sets (text forms, (n,) each, the same items):
    the mean over ``tags`` of Cohen's kappa on "has the tag"
    (:func:`alflow.tasks.agreement.per_tag_kappa`). A tag both models give to every item or
    to none has no kappa and is left out (its predictions did not change); None when no tag
    has one. Why not exact-set kappa: with t tags there are 2^t sets, most seen once, and
    one flipped tag of a set would count as a whole disagreement."""
    from alflow.tasks.multilabel.tags import parse_tags

    kappas = per_tag_kappa([parse_tags(v) for v in current], [parse_tags(v) for v in before], tags)
    defined = [k for k in kappas.values() if not math.isnan(k)]
    return float(np.mean(defined)) if defined else None


def labeling_minutes(store: Store) -> float | None:
    """Labeling time recorded with the answers, in minutes (None: not recorded)."""
    try:
        seconds = store.scalar("SELECT sum(seconds) FROM labels")
    except duckdb.BinderException:  # a schema without labels.seconds
        return None
    return None if seconds is None else float(seconds) / 60.0


def evaluate_rules(settings: Settings, counts: dict, metrics: dict | None, control: dict,
                   kappas: Sequence[float | None], minutes: float | None) -> list[dict]:
    """Every rule's state: ``{rule, configured, fired, value, threshold, detail}``.

    ``kappas``: the stop-set kappa of each cycle so far, oldest first (None where there
    was none); ``control``: :func:`alflow.tasks.control.control_estimate`.
    """
    s = settings.stopping
    rules = []
    spent = counts["answered"]
    rules.append({"rule": "budget", "configured": s.budget is not None, "value": spent, "threshold": s.budget,
                  "fired": s.budget is not None and spent >= s.budget,
                  "detail": (f"budget of {s.budget} labels spent ({spent} given)"
                             if s.budget is not None and spent >= s.budget
                             else f"{spent} labels given" + (f" of a budget of {s.budget}" if s.budget else ""))})
    minutes_text = "labeling time not recorded" if minutes is None else f"{minutes:.1f} min of labeling time"
    rules.append({"rule": "budget_minutes", "configured": s.budget_minutes is not None, "value": minutes,
                  "threshold": s.budget_minutes,
                  "fired": s.budget_minutes is not None and minutes is not None and minutes >= s.budget_minutes,
                  "detail": minutes_text + (f" of a budget of {s.budget_minutes:g} min" if s.budget_minutes else "")})
    metric = settings.evaluation.metric
    # hamming_loss (multi-label) is the one metric where lower is better
    higher = metric != "hamming_loss"
    if control["n"] >= s.target_min_control:
        lower = s.target_bound == "lower"
        value = (control["value_low"] if higher else control["value_high"]) if lower else control["value"]
        bound = "lower bound" if higher else "upper bound"
        estimate = (f"control-slice {control['metric']} of model v{control['model_version']} "
                    f"{control['value']:.3f} [{control['value_low']:.3f}, {control['value_high']:.3f}] on "
                    f"{control['n']} control items, "
                    + (f"{bound} {value:.3f}" if lower else f"point estimate {value:.3f}")
                    + (f" ({control['note']})" if control.get("note") else ""))
        used = f"control {control['metric']} ({bound if lower else 'point estimate'})"
    else:
        value = (metrics or {}).get(metric)
        method = (metrics or {}).get("method", settings.evaluation.method)
        estimate = (f"{method} {metric} " + ("–" if value is None else f"{value:.3f}")
                    + f" (control slice: {control['n']} of {s.target_min_control} answers needed)")
        used = f"{method} {metric}"
    fired = s.target is not None and value is not None and (value >= s.target if higher else value <= s.target)
    rules.append({"rule": "target", "configured": s.target is not None, "value": value, "threshold": s.target,
                  "estimate": used, "fired": fired,
                  "detail": estimate + (f" {'reached' if fired else 'vs'} the target {s.target:g}" if s.target else "")})
    k = s.stabilizing_cycles
    recent = list(kappas)[-k:]
    shown = ", ".join("–" if v is None else f"{v:.3f}" for v in recent) or "none yet"
    kind = "mean per-tag kappa" if settings.task == "multi_label" else "kappa"
    stable = (s.stabilizing_kappa is not None and len(recent) == k
              and all(v is not None and v >= s.stabilizing_kappa for v in recent))
    rules.append({"rule": "stabilizing", "configured": s.stabilizing_kappa is not None,
                  "value": recent[-1] if recent else None, "threshold": s.stabilizing_kappa, "fired": stable,
                  "detail": f"stop-set {kind} of the last {len(recent)} cycles: {shown}"
                            + (f" (needs >= {s.stabilizing_kappa:g} for {k} cycles)" if s.stabilizing_kappa else "")})
    return rules


def any_configured(settings: Settings) -> bool:
    """True if some rule can fire (its threshold is set)."""
    s = settings.stopping
    return any(v is not None for v in (s.budget, s.budget_minutes, s.target, s.stabilizing_kappa))


def fired_rule(rules: list[dict]) -> str | None:
    """'<rule>: <detail>' of the first rule that fired, or None."""
    for rule in rules:
        if rule["fired"]:
            return f"{rule['rule']}: {rule['detail']}"
    return None


def flag_records(flags) -> list[dict]:
    """Open label flags as plain JSON-ready dicts: item_id, given_label, suggested_label,
    score, rank, model_version."""
    return [{"item_id": str(f.item_id), "given_label": str(f.given_label), "suggested_label": str(f.suggested_label),
             "score": float(f.score), "rank": int(f.rank), "model_version": int(f.model_version)}
            for f in flags.itertuples(index=False)]


def score_model_on_control(store: Store, settings: Settings, model_version: int) -> int:
    """Store model ``model_version``'s predictions of the control answers it has none of
    (loading its file only when there are some); returns how many it predicted."""
    from alflow.tasks import modeling
    from alflow.tasks.control import score_control
    from alflow.tasks.train import model_file

    if store.unscored_control(model_version).empty:
        return 0
    row = store.model_row(model_version)
    model = modeling.load_model(model_file(settings, row),
                                modeling.trusted_types(settings.model, settings.labels, settings.task))
    return score_control(store, model_version, model)


def assess_cycle(store: Store, settings: Settings, cycle: int, model_version: int | None, counts: dict,
                 metrics: dict | None) -> dict:
    """After a cycle's retrain: the label check (:func:`alflow.tasks.label_check.check_labels`)
    of its model, its stop-set kappa, the control estimate and every rule's state. Returns
    ``{control, flags, flagged (the first FLAGS_SHOWN open flags), stop_kappa, rules, stop}``,
    for the caller to store as the cycle's ``cycle_quality`` row with its report, in one
    transaction (:meth:`Store.record_assessment`). What it stores on the way (label flags,
    control and stop-set predictions) is keyed by model and written once, so running it
    again for the same cycle adds nothing."""
    from alflow.tasks.label_check import check_labels

    if model_version is not None:
        check_labels(store, settings, model_version)
        score_model_on_control(store, settings, model_version)
    previous = store.query_df("SELECT model_version FROM cycles WHERE cycle < ? AND model_version IS NOT NULL "
                              "ORDER BY cycle DESC LIMIT 1", [cycle])
    kappa = None
    if model_version is not None:
        kappa = stop_set_kappa(store, settings, model_version,
                               int(previous.iloc[0, 0]) if len(previous) else None)
    kappas = stored_kappas(store, before=cycle) + [kappa]
    control = current_estimate(store, settings)
    flags = store.label_flag_count(model_version) if model_version is not None else 0
    rules = evaluate_rules(settings, counts, metrics, control, kappas, labeling_minutes(store))
    stop = fired_rule(rules)
    flagged = flag_records(store.open_label_flags(FLAGS_SHOWN, model_version))
    return {"control": control, "flags": flags, "flagged": flagged, "stop_kappa": kappa, "rules": rules,
            "stop": stop}


@task(name="assess-cycle", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def assess_cycle_task(settings: Settings, cycle: int, model_version: int | None, counts: dict,
                      metrics: dict | None) -> dict:
    """:func:`assess_cycle` at the end of a cycle."""
    return assess_cycle(Store(settings.database, settings.store.lock_timeout_seconds), settings, cycle,
                        model_version, counts, metrics)


def stored_kappas(store: Store, before: int | None = None) -> list[float | None]:
    frame = store.query_df("SELECT stop_kappa FROM cycle_quality" + (" WHERE cycle < ?" if before else "")
                           + " ORDER BY cycle", [before] if before else [])
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            for v in frame["stop_kappa"]]


def current_rules(store: Store, settings: Settings, counts: dict | None = None,
                  control: dict | None = None) -> list[dict]:
    """Every rule's state now, under the current config, from what the store holds (the
    newest cycle's metrics, the stop-set kappas, the control slice, the answers).
    ``control``: :func:`current_estimate`, when the caller has it already."""
    import json

    counts = counts or store.counts(settings.holdout_fraction)
    latest = store.query_df("SELECT metrics FROM cycles ORDER BY cycle DESC LIMIT 1")
    metrics = json.loads(latest.iloc[0, 0]) if len(latest) and isinstance(latest.iloc[0, 0], str) else None
    control = control if control is not None else current_estimate(store, settings)
    return evaluate_rules(settings, counts, metrics, control, stored_kappas(store), labeling_minutes(store))


def quality_status(store: Store, settings: Settings, counts: dict | None = None) -> dict:
    """The label check, the control slice and the stopping rules for `alflow status`:
    ``{control, label_flags: {model_version, count, open}, stopping: {fired, rules}}``
    (``open``: up to FLAGS_SHOWN flags still to re-review, most likely wrong first)."""
    newest = store.last_checked_model()
    open_flags = store.open_label_flags(FLAGS_SHOWN)
    control = current_estimate(store, settings)  # once: its macro F1 interval is a bootstrap
    rules = current_rules(store, settings, counts, control)
    return {
        "control": control,
        "label_flags": {"model_version": None if newest is None else int(newest),
                        "count": store.label_flag_count(),
                        "open": flag_records(open_flags)},
        "stopping": {"fired": fired_rule(rules), "rules": rules},
    }
