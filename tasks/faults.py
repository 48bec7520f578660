"""Named fault points: places where a test can stop the process dead, to prove that every
step of a cycle is resumable (tests/test_faults.py).

``ALFLOW_FAULT`` names a point (or several, comma-separated). A process reaching a named
point exits at once with ``os._exit(FAULT_EXIT)``: no ``finally``, no ``atexit``, no
flushed buffers, no rolled-back transaction, as after ``kill -9``. Unset, or naming other
points, a point does nothing (one environment lookup).

``ALFLOW_FAULT_HOLD`` (a file path) turns the exit into a wait: the process writes the
point's name to that file and stops there, so a test can signal it from outside while it
stands at the point (SIGTERM to ``alflow serve``, SIGKILL to a worker's process group).
It exits anyway after ``HOLD_SECONDS``.

Each point sits on a step boundary, or inside a step's transaction (named ``mid-`` or
``after-write``: the transaction must leave nothing behind). :data:`FAULT_POINTS` lists
them all with where they are; the fault matrix exercises every one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_ENV = "ALFLOW_FAULT"
HOLD_ENV = "ALFLOW_FAULT_HOLD"
FAULT_EXIT = 86  # the exit status of a process stopped at a fault point
HOLD_SECONDS = 300.0

# name -> where it is, in cycle order.
FAULT_POINTS: dict[str, str] = {
    "ingest-mid-chunk": "ingest: a chunk of records is being read, none of it stored (tasks/ingest.py)",
    "ingest-after-write": "ingest: a source's last chunk and its ingests row are written in their transaction, "
                          "its cursor not yet (tasks/store/cursors.py)",
    "prelabel-mid-write": "pre-label: predictions inserted in their transaction, not committed "
                          "(tasks/store/pool.py)",
    "query-after-batch": "query: the batch and its items are recorded, the run has not gone on to the review "
                         "(tasks/query.py)",
    "review-between-rounds": "review: a round's answers are recorded, the next round (or the retrain) not "
                             "begun (flows/cycle.py)",
    "review-mid-import": "review: `alflow import` has checked every row of its file, its one write not done "
                         "(tasks/review/files.py)",
    "retrain-after-file": "retrain: the model file is written, its models row not (tasks/train.py)",
    "promotion": "retrain: the models row with its promotion is written, the cycle row not (tasks/train.py)",
    "cycle-row": "the cycle row is written, the cycle not assessed (tasks/finish.py)",
    "quality-row": "the quality row and the cycle's report are written, no artifact published "
                   "(tasks/finish.py)",
    "artifacts": "the learning-curve artifact is published, its id not recorded and the summary not "
                 "published (tasks/finish.py)",
}


def fault_point(name: str) -> None:
    """Stop the process here if ``ALFLOW_FAULT`` names ``name`` (see the module docstring)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    if name not in FAULT_POINTS:  # a typo in the code would make a test pass for nothing
        raise ValueError(f"unknown fault point {name!r}")
    if name not in (w.strip() for w in wanted.split(",")):
        return
    hold = os.environ.get(HOLD_ENV)
    if hold:
        _hold(name, Path(hold))
    os._exit(FAULT_EXIT)


def _hold(name: str, path: Path) -> None:
    """Say where the process stands, then wait for a signal from outside (the test's)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(f"{name} {os.getpid()}\n", encoding="utf-8")
    os.replace(partial, path)
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.1)
