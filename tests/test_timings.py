"""The cycle's timing breakdown: steps, overhead and wall, across the two processes of a
suspended run (the flow's own breakdown is checked in tests/test_flows.py)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from alflow.tasks.store import utcnow
from alflow.tasks.store.models import CycleTimings
from alflow.tasks.timings import STEPS, CycleClock, timings_line


def test_steps_overhead_and_wall_in_one_process():
    clock = CycleClock()
    with clock.step("query"):
        time.sleep(0.02)
    with clock.step("train"):
        time.sleep(0.01)
    clock.add("train", -0.004)  # evaluation moved out of the retrain's time
    clock.add("evaluate", 0.004)
    time.sleep(0.01)  # between steps: overhead
    seconds = clock.breakdown().seconds
    assert set(seconds) == {*STEPS, "overhead", "wall"}
    assert seconds["query"] >= 0.02 and seconds["train"] >= 0.006 and seconds["evaluate"] == 0.004
    assert seconds["ingest"] == seconds["prelabel"] == seconds["review_wait"] == 0.0
    assert seconds["overhead"] >= 0.01
    assert sum(seconds[s] for s in STEPS) + seconds["overhead"] == pytest.approx(seconds["wall"])
    with pytest.raises(ValueError, match="unknown cycle step 'training'"):
        clock.add("training", 1.0)


def test_a_resumed_run_adds_the_wait_since_its_batch_was_asked():
    """The first process stored its steps and when it asked; the second adds the wait from
    then to its own start, and its wall runs from the first process's start."""
    now = utcnow()
    before = CycleTimings(now - timedelta(seconds=100), {"ingest": 4.0, "prelabel": 3.0, "query": 1.0},
                          asked_at=now - timedelta(seconds=90))
    clock = CycleClock(before)
    clock.resumed_review()
    with clock.step("train"):
        time.sleep(0.01)
    seconds = clock.breakdown().seconds
    assert seconds["review_wait"] == pytest.approx(90, abs=0.5)
    assert seconds["wall"] == pytest.approx(100, abs=0.5)
    assert seconds["overhead"] == pytest.approx(100 - 90 - 8, abs=0.5)
    assert min(seconds.values()) >= 0 and sum(seconds[s] for s in STEPS) <= seconds["wall"]
    line = timings_line(seconds)
    assert line.startswith("ingest 4.00 s, pre-label 3.00 s, query 1.00 s, review wait 90.")
    assert "overhead 2." in line and "(2%) of 100." in line
