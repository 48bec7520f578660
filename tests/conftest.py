"""Shared fixtures: a Prefect test server for the session, configs over real corpora."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SMS_CSV = REPO / "data" / "sms_spam.csv"
AG_NEWS_CSV = DATA / "ag_news_800.csv"

# Tests must not read a developer's settings or reach a server they have running.
for name in list(os.environ):
    if name.startswith("ALFLOW_") and name not in ("ALFLOW_SKIP_BROWSER_TESTS",):
        os.environ.pop(name)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


# Seconds each heavy module takes on one of CI's workers (2 cores, measured with
# --durations, rounded). `./dev.sh test` gives every module to one worker (--dist loadfile:
# its module fixtures, a Prefect server or a fault-free reference run, are built once) and
# hands the modules out longest first (--no-loadscope-reorder keeps this order), so the
# workers end together instead of one waiting on a late two-minute test. Only the order
# depends on these: a wrong figure costs time, not a result.
MODULE_SECONDS = {
    "test_faults.py": 230, "test_flows.py": 170, "test_serve.py": 130, "test_browser.py": 100,
    "test_simulate.py": 75, "test_label_quality.py": 70, "test_cli.py": 60, "test_models.py": 60,
    "test_label_trust.py": 40, "test_dask_cluster.py": 35, "test_annotators.py": 30,
    "test_browser_curve.py": 30, "test_self_training.py": 30, "test_llm_cycle.py": 25, "test_scoring.py": 25,
    "test_embeddings.py": 20, "test_fault_storm.py": 20, "test_label_rules_model.py": 17, "test_config.py": 15,
    "test_embeddings_down.py": 15,
    "test_ingest.py": 15, "test_report.py": 15, "test_leases.py": 12, "test_review.py": 12, "test_docs.py": 8,
    "test_multilabel_cycle.py": 35, "test_multilabel_quality.py": 12, "test_simulate_multilabel.py": 10,
    "test_review_multilabel.py": 6, "test_llm_multilabel.py": 12, "test_multilabel_paused.py": 35,
}
SECONDS_PER_TEST = 0.5  # a module not listed: most of its tests are unit tests


def pytest_collection_modifyitems(session, config, items):
    """The modules longest first (:data:`MODULE_SECONDS`), each module's tests in file order."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.path.name, []).append(item)

    def seconds(name: str) -> float:
        return MODULE_SECONDS.get(name, SECONDS_PER_TEST * len(modules[name]))

    items[:] = [item for name in sorted(modules, key=seconds, reverse=True) for item in modules[name]]


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for every flow test of the session (starting one costs ~8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def write_config(directory: Path, *, labels: list[str], source_path: Path, extra: str = "",
                 label_column: str | None = "label", title_column: str | None = None,
                 evaluation: str = "holdout", batch_size: int = 20,
                 timeout_hours: float = 168.0) -> Path:
    """An alflow.toml in ``directory`` over one files source; ``extra`` is appended TOML."""
    columns = ""
    if label_column:
        columns += f'label_column = "{label_column}"\n'
    if title_column:
        columns += f'title_column = "{title_column}"\n'
    text = textwrap.dedent(
        f"""
        labels = {labels!r}
        database = "state/alflow.duckdb"
        models_dir = "state/models"
        seed = 7

        [query]
        strategy = "margin"
        batch_size = {batch_size}
        exploration = 0.1

        [review]
        poll_interval_seconds = 1
        timeout_hours = {timeout_hours}

        [evaluation]
        method = "{evaluation}"
        holdout_fraction = 0.2
        """
    ).replace("'", '"')
    text += extra
    text += textwrap.dedent(
        f"""
        [[sources]]
        type = "files"
        name = "corpus"
        path = "{source_path.as_posix()}"
        """
    ) + columns
    path = directory / "alflow.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def sms_config(tmp_path: Path) -> Path:
    """A config over the bundled SMS corpus (ham/spam, 13% spam), state in tmp_path."""
    return write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)


@pytest.fixture
def ag_config(tmp_path: Path) -> Path:
    """A config over 800 AG News items (4 balanced classes) with titles."""
    return write_config(tmp_path, labels=["world", "sports", "business", "scitech"],
                        source_path=AG_NEWS_CSV, title_column="title")


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    """The first 300 SMS rows: a pool small enough for quick store tests."""
    lines = SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:301]
    path = tmp_path / "small.csv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def ingested_here(config: Path):
    """``(store, settings)`` of ``config`` with its first source's records stored, without
    Prefect (no flow run): the state a unit of the cycle starts from."""
    import pandas as pd

    from alflow.config import load_config
    from alflow.connectors import build_connector, to_row
    from alflow.tasks.store import Store

    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    source = settings.sources[0]
    store.upsert_items(pd.DataFrame([to_row(r, source.name) for r in build_connector(source).fetch()]), "ingest")
    return store, settings


def copy_repo_config(directory: Path) -> Path:
    """The shipped alflow.toml, its bundled corpus path made absolute, in ``directory``."""
    text = (REPO / "alflow.toml").read_text(encoding="utf-8")
    text = text.replace('path = "data/sms_spam.csv"', f'path = "{SMS_CSV.as_posix()}"')
    path = directory / "alflow.toml"
    path.write_text(text, encoding="utf-8")
    return path


def chromium_path() -> str | None:
    return shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium") or None


# Spam words of the bundled SMS corpus (data/sms_spam.csv): a text with none is "ham".
SMS_KEYWORDS = {"free": "spam", "prize": "spam", "claim": "spam", "txt": "spam", "win": "spam",
                "urgent": "spam", "cash": "spam"}


@pytest.fixture
def openai_server():
    """A :class:`openai_server.FakeOpenAI` on 127.0.0.1 with the SMS corpus' spam keywords
    (``.keywords`` can be reassigned); closed after the test."""
    from openai_server import FakeOpenAI

    with FakeOpenAI(SMS_KEYWORDS, labels=["ham", "spam"]) as server:
        yield server
