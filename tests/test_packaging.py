"""Packaging: one import name (`alflow`), from any folder, editable or installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import REPO

FOLDERS = ("flows", "tasks", "connectors", "config")


def python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_alflow_from_any_folder_exposes_the_version(tmp_path):
    out = json.loads(python(
        "import json, alflow, alflow.flows.cycle, alflow.tasks.store, alflow.connectors, alflow.config;"
        "print(json.dumps([alflow.__version__, alflow.flows.cycle.__file__]))",
        cwd=tmp_path,
    ))
    assert out[0] == version("alflow")
    assert Path(out[1]) == REPO / "flows" / "cycle.py"


def test_the_folders_are_not_top_level_packages(tmp_path):
    """`config`, `tasks`, `flows` and `connectors` are common names: alflow must not take them."""
    code = "import importlib.util, json; print(json.dumps([importlib.util.find_spec(n) is not None for n in %r]))"
    assert json.loads(python(code % (FOLDERS,), cwd=tmp_path)) == [False] * len(FOLDERS)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A regular (non-editable) install of this checkout into its own folder."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "alflow"
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".alflow", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return target


def test_an_install_adds_only_alflow(installed):
    top = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"alflow", "bin"}
    assert {p.name for p in (installed / "alflow").iterdir() if p.is_dir()} >= set(FOLDERS)
    # Migrations, the example config and the bundled corpus are package data.
    assert sorted(p.name for p in (installed / "alflow" / "tasks" / "store" / "migrations").glob("*.sql"))
    assert (installed / "alflow" / "alflow.toml").is_file()
    assert (installed / "alflow" / "data" / "sms_spam.csv").is_file()


def test_entrypoints_load_from_an_installed_copy(installed, tmp_path):
    """A deployment's `flows/<file>.py:<flow>` entrypoint, in an installed copy, loads and
    imports its modules from that copy."""
    root = installed / "alflow"
    code = (
        "import json, sys; from prefect.flows import load_flow_from_entrypoint;"
        f"root = {str(root)!r};"
        "flows = [load_flow_from_entrypoint(root + '/' + e) for e in "
        "('flows/cycle.py:active_learning_cycle', 'flows/ingest.py:ingest')];"
        "import alflow.tasks.store;"
        "print(json.dumps([[f.name for f in flows], alflow.tasks.store.__file__]))"
    )
    names, store_file = json.loads(python(code, cwd=tmp_path, pythonpath=installed).splitlines()[-1])
    assert names == ["active-learning-cycle", "ingest"]
    assert Path(store_file).is_relative_to(installed)


def test_entrypoints_load_from_the_repository_root():
    code = (
        "import json; from prefect.flows import load_flow_from_entrypoint;"
        "print(json.dumps([load_flow_from_entrypoint(e).name for e in "
        "('flows/cycle.py:active_learning_cycle', 'flows/ingest.py:ingest')]))"
    )
    assert json.loads(python(code, cwd=REPO).splitlines()[-1]) == ["active-learning-cycle", "ingest"]


def test_init_from_an_installed_copy_points_at_its_bundled_corpus(installed, tmp_path):
    project = tmp_path / "project"
    python(f"import sys; sys.argv = ['alflow', 'init', {str(project)!r}];"
           "from alflow.flows.cli import main; main()", cwd=tmp_path, pythonpath=installed)
    out = python(
        "from alflow.config import load_config;"
        f"s = load_config({str(project / 'alflow.toml')!r}); print(s.sources[0].path)",
        cwd=tmp_path, pythonpath=installed,
    )
    assert Path(out) == installed / "alflow" / "data" / "sms_spam.csv"
