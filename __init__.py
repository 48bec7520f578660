"""alflow: active learning on Prefect.

Ingest sources into DuckDB, pre-label the pool with the current model, query the most
informative items, pause for a human to check the labels, retrain, evaluate, repeat.

The repository's top-level folders are this package's subpackages: ``alflow.flows``,
``alflow.tasks``, ``alflow.connectors`` and ``alflow.config``. The ``alflow`` command is
``alflow.flows.cli``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("alflow")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
