"""Where a cycle's time goes: seconds per step, and the overhead around the steps.

A cycle's ``timings`` (stored in ``cycle_timings``, shown by `alflow status` and in the
cycle summary) are, in seconds:

* ``ingest``, ``prelabel`` (loading the current model and scoring the pool), ``query``,
  ``review_wait`` (the simulated annotator's answers, or the wait for a human from the
  batch being asked to its answers being recorded), ``train`` and ``evaluate``: each step
  as the flow calls it;
* ``wall``: from the cycle's start to its record, across the two processes of a suspended run;
* ``overhead``: wall minus the steps' sum - Prefect's orchestration of the tasks, DuckDB's
  opens and commits between them, and the flow's own bookkeeping (locks, counts, checks).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from alflow.tasks.store import utcnow
from alflow.tasks.store.models import CycleTimings

STEPS = ("ingest", "prelabel", "query", "review_wait", "train", "evaluate")


class CycleClock:
    """Times the steps of one cycle in this process, on top of what ``resumed`` (the steps
    an earlier process of the same run stored with its batch) already holds."""

    def __init__(self, resumed: CycleTimings | None = None):
        self._start = time.perf_counter()
        self.timings = CycleTimings(utcnow()) if resumed is None else resumed
        # Seconds of the cycle before this process began (a resumed run: up to the resume).
        self._before = 0.0 if resumed is None else max(0.0, (utcnow() - resumed.started_at).total_seconds())

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Adds the block's wall seconds to step ``name`` (one of ``STEPS``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Adds ``seconds`` (negative: moves time out of a step, e.g. evaluation out of the
        retrain) to step ``name``; a step never goes below zero."""
        if name not in STEPS:
            raise ValueError(f"unknown cycle step {name!r} (steps: {', '.join(STEPS)})")
        self.timings.seconds[name] = max(0.0, self.timings.seconds.get(name, 0.0) + float(seconds))

    def asked(self) -> CycleTimings:
        """The timings when the batch has been queried: the wait for review starts now."""
        self.timings.asked_at = utcnow()
        return self.timings

    def resumed_review(self) -> None:
        """A resumed run: the wait from its batch being asked until this process began."""
        if self.timings.asked_at is not None:
            waited = (utcnow() - self.timings.asked_at).total_seconds() - (time.perf_counter() - self._start)
            self.add("review_wait", waited)

    def breakdown(self) -> CycleTimings:
        """Every step (0.0 if not run), ``wall`` and ``overhead`` (never negative)."""
        steps = {name: self.timings.seconds.get(name, 0.0) for name in STEPS}
        # Each step is timed inside the wall; max() only absorbs clock rounding across processes.
        wall = max(self._before + time.perf_counter() - self._start, sum(steps.values()))
        seconds = {**steps, "overhead": wall - sum(steps.values()), "wall": wall}
        return CycleTimings(self.timings.started_at, seconds, self.timings.asked_at)


def timings_line(seconds: dict) -> str:
    """'ingest 1.20 s, pre-label 2.31 s, ..., overhead 0.40 s (6%) of 8.10 s'."""
    names = {"prelabel": "pre-label", "review_wait": "review wait"}
    parts = [f"{names.get(step, step)} {seconds.get(step, 0.0):.2f} s" for step in STEPS]
    wall = seconds.get("wall") or 0.0
    share = f" ({seconds.get('overhead', 0.0) / wall:.0%})" if wall else ""
    return f"{', '.join(parts)}, overhead {seconds.get('overhead', 0.0):.2f} s{share} of {wall:.2f} s"
