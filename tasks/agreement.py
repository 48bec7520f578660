"""Inter-annotator agreement: plain functions over arrays, and the report over the store.

* :func:`cohen_kappa`: two annotators' answers on the same items (chance-corrected).
* :func:`krippendorff_alpha`: any number of annotators, answers missing allowed (nominal).
* :func:`agreement_report`: both over the stored answers, per batch and overall, with each
  annotator's agreement with the majority of the others and how often answers kept
  the pre-label shown with the item (automation bias).

Multi-label answers (tag sets, stored as their text form) are compared as sets: alpha with
the MASI distance (:func:`krippendorff_alpha_sets`) and Cohen's kappa per tag
(:func:`per_tag_kappa`); :func:`agreement_options` says which a config asks for.

A missing answer is ``None`` or NaN; a ``skip`` is not an answer about the class, so the
report treats it as missing.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from alflow.config import SKIP


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two annotators' answers ``a`` and ``b`` (same length n, one per item),
    by :func:`sklearn.metrics.cohen_kappa_score` on the items both answered.

    NaN when no item was answered by both, or when chance agreement is 1 (both always gave
    the same single label).
    """
    from sklearn.metrics import cohen_kappa_score

    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs answers for the same items: {len(a)} != {len(b)}")
    pairs = [(x, y) for x, y in zip(a, b) if not _missing(x) and not _missing(y)]
    if not pairs or len({x for x, _ in pairs} | {y for _, y in pairs}) < 2:
        return float("nan")
    first, second = zip(*pairs)
    return float(cohen_kappa_score([str(x) for x in first], [str(y) for y in second]))


def krippendorff_alpha(data) -> float:
    """Krippendorff's alpha for nominal data, answers missing allowed.

    ``data``: (n_annotators, n_items), one answer per cell or None/NaN where an annotator
    did not answer. Items with fewer than two answers carry no information and are left
    out. alpha = 1 - D_o / D_e from the coincidence matrix: 1 is perfect agreement, 0 what
    chance gives, below 0 systematic disagreement. NaN when fewer than two pairable answers
    remain or all of them are one label (no variation to agree about).
    """
    rows = [list(r) for r in data]
    if not rows:
        return float("nan")
    n_items = len(rows[0])
    if any(len(r) != n_items for r in rows):
        raise ValueError("krippendorff_alpha needs one row per annotator, all of the same length")
    units = []
    for j in range(n_items):
        values = [r[j] for r in rows if not _missing(r[j])]
        if len(values) >= 2:
            units.append(values)
    labels, coincidence = coincidences(units, key=str)
    if len(labels) < 2:
        return float("nan")
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    observed = coincidence.sum() - np.trace(coincidence)
    expected = (n_c.sum() ** 2 - (n_c ** 2).sum()) / (n - 1)
    return float(1.0 - observed / expected)


def coincidences(units: list[list], key) -> tuple[list, np.ndarray]:
    """Krippendorff's coincidence matrix of ``units`` (the answers to each item that has two
    or more): ``(values, (v, v) matrix)``, the values sorted by ``key``; each ordered pair
    of answers within a unit counts 1 / (answers in it - 1). No units: ``([], (0, 0))``."""
    values = sorted({v for unit in units for v in unit}, key=key)
    index = {v: i for i, v in enumerate(values)}
    coincidence = np.zeros((len(values), len(values)))
    for unit in units:
        counts = np.zeros(len(values))
        for v in unit:
            counts[index[v]] += 1
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    return values, coincidence


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def agreement_options(settings) -> dict:
    """The keyword arguments of :func:`agreement_report` (and ``adjudication_distance`` of
    :meth:`~alflow.tasks.store.Store.item_states`) for ``settings``: the adjudication
    threshold, and with task = "multi_label" the MASI ``adjudication_distance`` and the
    ``tags``."""
    options = {"adjudication_threshold": settings.review.adjudication_threshold}
    if settings.task == "multi_label":
        options.update(adjudication_distance=settings.review.adjudication_distance, tags=list(settings.labels))
    return options


def agreement_of(answers, tags: Sequence[str] | None = None) -> dict:
    """Agreement figures for a frame of answers (rows of
    :meth:`~alflow.tasks.store.Store.answer_table`: item_id, annotator, label,
    prelabel_shown, effective).

    Returns ``{answers, annotators, items_overlapping, kappa, alpha, per_annotator,
    prelabel}``: ``items_overlapping`` counts items with at least two (non-skip) answers;
    ``kappa`` is Cohen's kappa when exactly two annotators answered overlapping items, else
    None; ``alpha`` Krippendorff's alpha (nominal) over all annotators; ``per_annotator``:
    ``{name: {answers, compared, agreement}}``, agreement with the majority of the other
    annotators on overlapping items (:func:`agreement_with_others`); ``prelabel``: ``{shown, kept, agreement}``, how often an
    answer given with a pre-label kept it.

    ``tags`` (multi-label: each answer is a tag set's text form): ``alpha`` is over sets
    with the MASI distance, ``kappa`` stays None, and ``tag_kappa`` is ``{tag: kappa}`` of
    the two annotators per tag (None where undefined; when exactly two answered
    overlapping items, else ``{}``); two answers agree (per annotator, pre-label kept) when
    their sets are equal.
    """
    frame = answers[answers["label"] != SKIP] if len(answers) else answers
    shown = answers[answers["prelabel_shown"].notna()] if len(answers) else answers
    kept = int((shown["label"] == shown["prelabel_shown"]).sum()) if len(shown) else 0
    report = {
        "answers": int(len(frame)),
        "annotators": sorted(frame["annotator"].unique().tolist()) if len(frame) else [],
        "items_overlapping": 0, "kappa": None, "alpha": None, "per_annotator": {},
        "distance": "nominal" if tags is None else "masi", "tag_kappa": {},
        "prelabel": {"shown": int(len(shown)), "kept": kept,
                     "agreement": round(kept / len(shown), 4) if len(shown) else None},
    }
    if frame.empty:
        return report
    wide = frame.pivot(index="item_id", columns="annotator", values="label")
    overlapping = wide[wide.notna().sum(axis=1) >= 2]
    report["items_overlapping"] = int(len(overlapping))
    if overlapping.empty:
        return report
    coders = [c for c in overlapping.columns if overlapping[c].notna().any()]
    matrix = overlapping[coders].T.to_numpy(dtype=object)
    if tags is None:
        report["alpha"] = _number(krippendorff_alpha(matrix))
        if len(coders) == 2:
            report["kappa"] = _number(cohen_kappa(matrix[0], matrix[1]))
    else:
        from alflow.tasks.multilabel.tags import parse_tags

        sets = [[None if _missing(v) else parse_tags(v) for v in row] for row in matrix]
        report["alpha"] = _number(krippendorff_alpha_sets(sets))
        if len(coders) == 2:
            report["tag_kappa"] = {t: _number(k) for t, k in per_tag_kappa(sets[0], sets[1], tags).items()}
    for name in report["annotators"]:
        agree, compared = agreement_with_others(overlapping, name)
        report["per_annotator"][name] = {
            "answers": int((frame["annotator"] == name).sum()),
            "compared": compared,
            "agreement": round(agree / compared, 4) if compared else None,
        }
    return report


def agreement_with_others(wide, name: str) -> tuple[int, int]:
    """How often annotator ``name`` agrees with the majority of the *other* annotators:
    (agreements, items compared). ``wide``: items x annotators, one answer per cell (NaN:
    none). Compared are the items ``name`` and at least one other answered; a tie among
    the others counts as a disagreement (no majority to agree with)."""
    if name not in wide.columns:
        return 0, 0
    agree = compared = 0
    others = wide.drop(columns=[name])
    for own, row in zip(wide[name], others.itertuples(index=False)):
        votes = [v for v in row if not _missing(v)]
        if _missing(own) or not votes:
            continue
        compared += 1
        tally = Counter(votes).most_common()
        if len(tally) == 1 or tally[0][1] > tally[1][1]:
            agree += tally[0][0] == own
    return agree, compared


def agreement_report(store, batch_id: str | None = None, adjudication_threshold: float = 0.5,
                     adjudication_distance: float | None = None, tags: Sequence[str] | None = None) -> dict:
    """Agreement over the stored answers (see :func:`agreement_of`), overall or for one batch.

    Overall, it also has ``batches``: ``[{batch_id, items_overlapping, kappa, alpha}]`` for
    each batch with overlapping answers, and ``adjudication_pending``: items waiting for an
    adjudicator (answers tied, or disagreeing above ``adjudication_threshold``; tag sets:
    two farther apart than the MASI ``adjudication_distance``). ``tags``: the answers are
    tag sets (:func:`agreement_options` gives these arguments for a config).
    """
    report = agreement_of(store.answer_table(batch_id), tags)
    if batch_id is not None:
        return dict(report, batch_id=batch_id)
    batches = []
    per_batch = store.answer_table(per_batch=True)
    order = store.query_df("SELECT batch_id FROM batches ORDER BY created_at, batch_id")["batch_id"]
    shared = per_batch[per_batch.duplicated("item_id", keep=False) & per_batch["batch_id"].notna()]
    for one in order[order.isin(set(shared["batch_id"]))]:
        figures = agreement_of(per_batch[per_batch["batch_id"] == one], tags)
        if figures["items_overlapping"]:
            batches.append({"batch_id": one, **{k: figures[k] for k in ("items_overlapping", "kappa", "alpha")}})
    report["batches"] = batches
    report["adjudication_pending"] = int(len(store.needs_adjudication(adjudication_threshold,
                                                                      adjudication_distance)))
    return report


def agreement_line(report: dict) -> str:
    """'agreement: alpha 0.71, kappa 0.70 on 12 items answered by 2+ annotators; pre-label kept
    in 18/20 answers; 1 item waiting for adjudication' (what `alflow status` prints). Tag
    sets: 'alpha (MASI) 0.64, per-tag kappa sports 0.81, world 0.40, business –'."""
    parts = []
    if report["items_overlapping"]:
        masi = report.get("distance") == "masi"
        alpha = "–" if report["alpha"] is None else f"{report['alpha']:.2f}"
        figures = [f"alpha (MASI) {alpha}" if masi else f"alpha {alpha}"]
        if report["kappa"] is not None:
            figures.append(f"kappa {report['kappa']:.2f}")
        if report.get("tag_kappa"):
            figures.append("per-tag kappa " + ", ".join(
                f"{tag} {'–' if k is None else format(k, '.2f')}" for tag, k in report["tag_kappa"].items()))
        parts.append(f"{', '.join(figures)} on {report['items_overlapping']} items answered by 2+ annotators")
    else:
        parts.append("no item answered by 2+ annotators yet")
    pre = report["prelabel"]
    if pre["shown"]:
        parts.append(f"pre-label kept in {pre['kept']}/{pre['shown']} answers")
    if report.get("adjudication_pending"):
        n = report["adjudication_pending"]
        parts.append(f"{n} item{'s' if n != 1 else ''} waiting for adjudication")
    return "agreement: " + "; ".join(parts)


# -- multi-label answers: tag sets ------------------------------------------------------------
def masi_distance(a, b) -> float:
    """MASI distance of two tag sets (Passonneau 2006), in [0, 1]: ``1 - J * M`` with J the
    Jaccard overlap |a & b| / |a | b| and M 1 for equal sets, 2/3 when one contains the
    other, 1/3 when they only overlap, 0 when disjoint. Two empty sets ("no tag applies",
    both) agree: 0."""
    a, b = frozenset(a), frozenset(b)
    if a == b:
        return 0.0
    union = len(a | b)
    jaccard = len(a & b) / union
    if a <= b or b <= a:
        monotonicity = 2.0 / 3.0
    elif a & b:
        monotonicity = 1.0 / 3.0
    else:
        monotonicity = 0.0
    return 1.0 - jaccard * monotonicity


def _tag_set(value, where: str) -> frozenset | None:
    if _missing(value):
        return None
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"{where} must be a set of tags (or None/NaN when not answered), got {value!r}")
    return frozenset(value)


def krippendorff_alpha_sets(data, distance=masi_distance) -> float:
    """Krippendorff's alpha for tag sets, with ``distance`` between two sets (MASI by default).

    ``data``: (n_annotators, n_items), one tag set per cell (any iterable of tag names; an
    empty set is an answer: no tag applies) or None/NaN where an annotator did not answer.
    Items with fewer than two answers are left out. alpha = 1 - D_o / D_e, the observed
    and the expected mean distance over pairs of answers from the coincidence matrix of the
    distinct sets (Krippendorff 2011 with a custom metric): 1 is perfect agreement, 0 what
    chance gives. NaN when fewer than two pairable answers remain or they never differ.
    """
    rows = [list(r) for r in data]
    if not rows:
        return float("nan")
    n_items = len(rows[0])
    if any(len(r) != n_items for r in rows):
        raise ValueError("krippendorff_alpha_sets needs one row per annotator, all of the same length")
    units = []
    for j in range(n_items):
        values = [_tag_set(r[j], f"answer of annotator {i} on item {j}") for i, r in enumerate(rows)]
        values = [v for v in values if v is not None]
        if len(values) >= 2:
            units.append(values)
    domain, coincidence = coincidences(units, key=lambda s: sorted(s))
    if len(domain) < 2:
        return float("nan")
    delta = np.array([[distance(x, y) for y in domain] for x in domain], dtype=float)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    observed = (coincidence * delta).sum() / n
    expected = (np.outer(n_c, n_c) * delta).sum() / (n * (n - 1))
    if expected == 0:
        return float("nan")
    return float(1.0 - observed / expected)


def per_tag_kappa(a: Sequence, b: Sequence, tags: Sequence[str]) -> dict[str, float]:
    """Cohen's kappa of two annotators per tag: ``a`` and ``b`` (n,), one tag set per item
    or None/NaN where not answered; for each of ``tags``, :func:`cohen_kappa` of "has the
    tag" over the items both answered. ``{tag: kappa}``, NaN where undefined (a tag both
    always or never gave)."""
    if len(a) != len(b):
        raise ValueError(f"per_tag_kappa needs answers for the same items: {len(a)} != {len(b)}")
    first = [_tag_set(v, f"annotator a's answer on item {j}") for j, v in enumerate(a)]
    second = [_tag_set(v, f"annotator b's answer on item {j}") for j, v in enumerate(b)]
    return {tag: cohen_kappa([None if s is None else int(tag in s) for s in first],
                             [None if s is None else int(tag in s) for s in second])
            for tag in tags}
