"""The random control slice: an honest estimate of the model's accuracy on the pool.

Actively chosen items are the ones the model finds hardest, so cross-validation on them
(or accuracy on them) says little about the pool. Each batch therefore also carries a
control slice (``query.control_share`` of it, at least one item): items drawn uniformly
from the pool, in SQL, by a hash of (seed, batch number, item id), so a replayed query
draws the same ones. They are labeled like the rest (picked_by ``control``) and train the
model like every other answer.

What is estimated: each control item is compared with the prediction stored, when it was
drawn, by the model that queried its batch (``batches.model_version``). That model had
not seen the item (it was in the pool), and the item was a uniform draw from the pool it
was pre-labeling, so each item is an unbiased Bernoulli trial of that model's accuracy on
the pool. The model retrained afterwards *has* trained on it, so the item is never scored
against a later model. Pooled over batches, the figure is the accuracy of the pre-labels
the loop's models showed on the pool: unbiased for that mix, and conservative for the
newest model while models still improve. Actively chosen (and rechecked) items never
enter it; control items drawn on a cold start (no model) neither.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd

from alflow.config import Settings
from alflow.tasks.store import CONTROL, Store

PICK_COLUMNS = ["item_id", "score", "prelabel", "confidence", "picked_by"]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: (low, high) in [0, 1].

    ``successes`` of ``n`` trials; (nan, nan) when ``n`` is 0.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..n, got {successes} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def control_size(share: float, k: int) -> int:
    """Control items in a batch of ``k``: ``share`` of it rounded, at least one (none when
    ``share`` is 0), never more than ``k``."""
    if share <= 0 or k <= 0:
        return 0
    return min(k, max(1, round(share * k)))


def control_picks(store: Store, settings: Settings, model_version: int | None, n: int) -> pd.DataFrame:
    """``n`` pool items drawn uniformly (:meth:`Store.control_draw`, seeded by the config's
    seed and the number of batches so far), with the querying model's stored prediction as
    the pre-label (none on a cold start)."""
    if n <= 0:
        return pd.DataFrame(columns=PICK_COLUMNS)
    draw = int(store.scalar("SELECT count(*) FROM batches"))
    ids = store.control_draw(n, settings.seed, draw, settings.holdout_fraction)
    frame = pd.DataFrame({"item_id": ids, "score": np.nan, "prelabel": None, "confidence": np.nan,
                          "picked_by": CONTROL})
    if model_version is not None and ids:
        stored = store.query_df(
            "SELECT item_id, label, list_max(proba) AS confidence FROM predictions "
            "WHERE model_version = ? AND item_id IN (SELECT unnest(?::VARCHAR[]))",
            [model_version, ids],
        ).set_index("item_id")
        frame["prelabel"] = [stored["label"].get(i) for i in ids]
        frame["confidence"] = [float(stored["confidence"].get(i, np.nan)) for i in ids]
    return frame


def compose_batch(store: Store, settings: Settings, model_version: int | None, active: pd.DataFrame,
                  k: int) -> pd.DataFrame:
    """The batch of ``k`` as asked: flagged items to recheck first (``query.recheck_share``),
    then the active picks, then the control slice (``query.control_share``).

    ``active``: the strategy's picks in rank order (PICK_COLUMNS). The control slice is
    drawn from the whole pool first and the active picks give way to it, so that the
    strategy's choice never shapes the control sample.
    """
    from alflow.tasks.label_check import recheck_picks

    q = settings.query
    n_recheck = int(q.recheck_share * k) if model_version is not None else 0
    recheck = recheck_picks(store, n_recheck)
    control = control_picks(store, settings, model_version, control_size(q.control_share, k - len(recheck)))
    room = max(0, k - len(recheck) - len(control))
    if len(active):
        active = active[~active["item_id"].isin(set(control["item_id"]))].reset_index(drop=True)
        # make room by dropping the strategy's own lowest-ranked picks, so that the
        # exploration share (ranked last) survives
        own = np.flatnonzero(active["picked_by"].to_numpy() != "exploration")
        excess = max(0, len(active) - room)
        active = active.drop(index=own[len(own) - min(excess, len(own)):]).head(room)
    parts = [p for p in (recheck, active, control) if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PICK_COLUMNS)


def control_estimate(store: Store, confidence: float = 0.95) -> dict:
    """The control slice's accuracy so far (see the module docstring for what it estimates):
    ``{n, correct, accuracy, low, high, models}``; accuracy/low/high None while n is 0;
    ``models``: the versions whose predictions were scored."""
    outcomes = store.control_outcomes()
    n = len(outcomes)
    correct = int((outcomes["predicted"] == outcomes["label"]).sum()) if n else 0
    low, high = wilson_interval(correct, n, confidence)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None,
            "low": None if math.isnan(low) else low, "high": None if math.isnan(high) else high,
            "models": sorted({int(v) for v in outcomes["model_version"]}) if n else []}


def estimate_line(estimate: dict) -> str:
    """'0.912 [0.861, 0.946] on 57 control items' or why there is none yet."""
    if not estimate["n"]:
        return "no control item answered yet"
    return (f"{estimate['accuracy']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}] (95% Wilson) "
            f"on {estimate['n']} control items")
