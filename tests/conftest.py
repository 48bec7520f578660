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


def copy_repo_config(directory: Path) -> Path:
    """The shipped alflow.toml, its bundled corpus path made absolute, in ``directory``."""
    text = (REPO / "alflow.toml").read_text(encoding="utf-8")
    text = text.replace('path = "data/sms_spam.csv"', f'path = "{SMS_CSV.as_posix()}"')
    path = directory / "alflow.toml"
    path.write_text(text, encoding="utf-8")
    return path


def chromium_path() -> str | None:
    return shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium") or None
