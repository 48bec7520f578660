"""Which task failures are worth a retry: the ones that can pass (a lock held a while, a
flaky service), not bad input, which fails the same way every time."""

from __future__ import annotations


def is_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the error is a permanent one."""
    from alflow.config import ConfigError
    from alflow.connectors.base import SourceError
    from alflow.tasks.modeling import ModelError
    from alflow.tasks.review import ReviewError
    from alflow.tasks.store.database import StoreUnwritableError

    permanent = (ConfigError, SourceError, ModelError, ReviewError, StoreUnwritableError, ValueError, TypeError,
                 KeyError)
    try:
        error = state.result(raise_on_failure=False)
    except Exception as exc:  # the result could not be read: judge what was raised
        error = exc
    return not isinstance(error, permanent)
