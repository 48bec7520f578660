"""Progress for long steps: a rich bar in a terminal, periodic log lines everywhere else.

The `alflow` command turns bars on (:func:`enable_bars`); in a deployment or a test the same
steps log "pre-label: 4000/5160 (78%)" lines to the Prefect run log instead, so the UI shows
progress too.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

_lock = threading.Lock()
_bars = None  # the shared rich Progress while at least one step is running
_active = 0
_enabled = False


def enable_bars(enabled: bool = True) -> None:
    """Show rich progress bars (only when stderr is a terminal)."""
    global _enabled
    _enabled = enabled and sys.stderr.isatty()


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger("alflow")


@contextmanager
def track(description: str, total: int | None = None, log_every: float = 10.0) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; shows a bar or logs at most every ``log_every`` seconds."""
    global _bars, _active
    done = 0
    if _enabled:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with _lock:
            if _bars is None:
                _bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
                _bars.start()
            _active += 1
            task_id = _bars.add_task(description, total=total)
        bars = _bars

        def advance(n: int = 1) -> None:
            bars.advance(task_id, n)

        try:
            yield advance
        finally:
            with _lock:
                _active -= 1
                if _active == 0 and _bars is not None:
                    _bars.stop()
                    _bars = None
        return

    logger = _logger()
    last = time.monotonic()

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= log_every:
            last = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            logger.info(f"{description}: {done}/{total if total else '?'}{share}")

    yield advance
