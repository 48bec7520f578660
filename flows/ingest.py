"""The ingest flow: every configured source into the DuckDB ``items`` table."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from alflow.config import load_config
from alflow.tasks.ingest import IngestReport, ingest_source_task
from alflow.tasks.store import Store


@flow(name="ingest", log_prints=True)
def ingest(config_path: str = "alflow.toml") -> list[IngestReport]:
    """Fetch each source and upsert its records (deduplicated by content hash).

    Safe to re-run at any time: nothing already stored is written twice.
    """
    settings = load_config(config_path)
    Store(settings.database, settings.store.lock_timeout_seconds).migrate()
    run_id = flow_run.get_id()
    return [ingest_source_task(settings, source.name, run_id, run_id) for source in settings.sources]
