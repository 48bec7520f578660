"""Settings: alflow.toml plus ALFLOW_* overrides, validated with one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import SMS_CSV, copy_repo_config, write_config

from alflow.config import ConfigError, load_config


def config_error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    message = str(info.value)
    assert "\n" not in message, message
    return message


def minimal(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "alflow.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


# -- valid files -------------------------------------------------------------------------
def test_load_valid_file(sms_config: Path):
    settings = load_config(sms_config, environ={})
    assert settings.labels == ["ham", "spam"]
    assert settings.seed == 7
    assert settings.query.strategy == "margin"
    assert settings.query.batch_size == 20
    assert settings.query.exploration == 0.1
    assert settings.review.poll_interval_seconds == 1
    assert settings.evaluation.method == "holdout"
    assert settings.evaluation.holdout_fraction == 0.2
    assert settings.model.classifier == "sklearn.linear_model.LogisticRegression"  # a default
    assert settings.config_path == sms_config.resolve()
    [source] = settings.sources
    assert (source.type, source.name, source.path, source.label_column) == ("files", "corpus", SMS_CSV, "label")
    assert source.text_column == "text"


def test_shipped_config_loads(tmp_path: Path):
    settings = load_config(copy_repo_config(tmp_path), environ={})
    assert settings.labels == ["ham", "spam"]
    assert settings.sources[0].path == SMS_CSV
    assert settings.database == tmp_path.resolve() / ".alflow" / "alflow.duckdb"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    config = write_config(project, labels=["a", "b"], source_path=Path("data/in.csv"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_config(config, environ={})
    assert settings.database == project.resolve() / "state" / "alflow.duckdb"
    assert settings.models_dir == project.resolve() / "state" / "models"
    assert settings.sources[0].path == project.resolve() / "data" / "in.csv"
    assert settings.db_path == str(project.resolve() / "state" / "alflow.duckdb")
    # A relative path given by the environment resolves the same way; absolute stays.
    settings = load_config(config, environ={"ALFLOW_DATABASE": "other/x.duckdb",
                                            "ALFLOW_MODELS_DIR": str(tmp_path / "abs")})
    assert settings.database == project.resolve() / "other" / "x.duckdb"
    assert settings.models_dir == tmp_path / "abs"


def test_config_found_relative_to_cwd(tmp_path: Path, monkeypatch):
    write_config(tmp_path, labels=["a", "b"], source_path=SMS_CSV)
    monkeypatch.chdir(tmp_path)
    settings = load_config(None, environ={})
    assert settings.config_path == tmp_path.resolve() / "alflow.toml"
    assert settings.database == tmp_path.resolve() / "state" / "alflow.duckdb"


# -- environment overrides ---------------------------------------------------------------
def test_env_overrides(sms_config: Path):
    settings = load_config(sms_config, environ={
        "ALFLOW_QUERY__BATCH_SIZE": "50",
        "ALFLOW_SEED": "3",
        "ALFLOW_QUERY__STRATEGY": "entropy",
        "ALFLOW_STOPPING__BUDGET": "120",
        "ALFLOW_EVALUATION__METHOD": "cv",
        "ALFLOW_LABELS": '["x", "y", "z"]',
        "ALFLOW_MODEL__CLASSIFIER_PARAMS": '{"max_iter": 50}',
    })
    assert settings.query.batch_size == 50
    assert settings.seed == 3
    assert settings.query.strategy == "entropy"
    assert settings.stopping.budget == 120
    assert settings.evaluation.method == "cv"
    assert settings.labels == ["x", "y", "z"]
    assert settings.model.classifier_params == {"max_iter": 50}
    # untouched keys keep the file's values
    assert settings.query.exploration == 0.1


def test_env_string_values_stay_strings(sms_config: Path):
    settings = load_config(sms_config, environ={"ALFLOW_REVIEW__ANNOTATOR": "123"})
    assert settings.review.annotator == "123"
    settings = load_config(sms_config, environ={"ALFLOW_REVIEW__ANNOTATOR": "007"})
    assert settings.review.annotator == "007"


def test_environ_parameter_replaces_the_process_environment(sms_config: Path, monkeypatch):
    monkeypatch.setenv("ALFLOW_SEED", "99")
    assert load_config(sms_config, environ={}).seed == 7
    assert load_config(sms_config).seed == 99


def test_non_setting_env_vars_are_ignored(sms_config: Path):
    settings = load_config(sms_config, environ={
        "ALFLOW_CONFIG": "/nowhere.toml", "ALFLOW_NO_PROGRESS": "1", "ALFLOW_SKIP_BROWSER_TESTS": "1",
        "PATH": "/usr/bin", "QUERY__BATCH_SIZE": "-4",
    })
    assert settings.query.batch_size == 20


def test_bad_env_value_names_the_variable(sms_config: Path):
    message = config_error(sms_config, {"ALFLOW_QUERY__EXPLORATION": "2"})
    assert "ALFLOW_QUERY__EXPLORATION" in message
    assert "query.exploration" in message
    assert str(sms_config) not in message  # the file is fine; the variable is not


def test_unknown_env_key(sms_config: Path):
    message = config_error(sms_config, {"ALFLOW_QUERY__NOPE": "1"})
    assert "ALFLOW_QUERY__NOPE" in message and "query.nope" in message and "unknown key" in message


def test_malformed_env_name(sms_config: Path):
    message = config_error(sms_config, {"ALFLOW_QUERY__": "1"})
    assert "ALFLOW_QUERY__" in message


def test_env_into_a_non_section(sms_config: Path):
    message = config_error(sms_config, {"ALFLOW_SEED__X": "1"})
    assert "ALFLOW_SEED__X" in message and "seed" in message


def test_env_vars_that_name_no_setting_are_ignored(sms_config: Path):
    """A deployment exports ALFLOW_REPO for its pull step (and a user may have any other
    ALFLOW_X): only ALFLOW_<SECTION>__<KEY> and the top-level keys are settings."""
    settings = load_config(sms_config, environ={"ALFLOW_REPO": "/srv/alflow", "ALFLOW_HOME": "x",
                                                "ALFLOW_DATABASE": "other.duckdb"})
    assert settings.database == sms_config.parent.resolve() / "other.duckdb"  # a top-level key: a setting
    assert settings == load_config(sms_config, environ={"ALFLOW_DATABASE": "other.duckdb"})


def test_unknown_env_section_is_one_line_naming_it(sms_config: Path):
    message = config_error(sms_config, {"ALFLOW_REPO__PATH": "/srv/alflow", "ALFLOW_REPO": "/srv/alflow"})
    assert message == "ALFLOW_REPO__PATH: repo: unknown key"


def test_schedules_from_the_file_and_the_environment(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra='\n[schedules]\ncycle = "0 6 * * *"\ningest = "0 * * * *"\ntimezone = "Europe/Berlin"\n')
    settings = load_config(path, environ={})
    assert (settings.schedules.cycle, settings.schedules.ingest, settings.schedules.timezone) == \
        ("0 6 * * *", "0 * * * *", "Europe/Berlin")
    settings = load_config(path, environ={"ALFLOW_SCHEDULES__CYCLE": "* * * * *", "ALFLOW_SCHEDULES__INGEST": ""})
    assert (settings.schedules.cycle, settings.schedules.ingest) == ("* * * * *", "")
    assert load_config(write_config(tmp_path, labels=["a", "b"], source_path=SMS_CSV), environ={}).schedules.cycle == ""
    assert config_error(path, {"ALFLOW_SCHEDULES__CYCLE": "61 * * * *"}) == \
        "ALFLOW_SCHEDULES__CYCLE: schedules.cycle: '61 * * * *' is not a cron string like \"0 6 * * *\""
    assert config_error(path, {"ALFLOW_SCHEDULES__TIMEZONE": "Mars/Olympus"}).startswith(
        "ALFLOW_SCHEDULES__TIMEZONE: schedules.timezone: 'Mars/Olympus' is not a time zone")


def test_max_open_batches(sms_config: Path):
    assert load_config(sms_config, environ={}).review.max_open_batches == 1
    assert load_config(sms_config, environ={"ALFLOW_REVIEW__MAX_OPEN_BATCHES": "3"}).review.max_open_batches == 3
    assert "review.max_open_batches" in config_error(sms_config, {"ALFLOW_REVIEW__MAX_OPEN_BATCHES": "0"})


# -- errors in the file ------------------------------------------------------------------
def test_unknown_key_in_file(tmp_path: Path):
    path = minimal(tmp_path, """
        labels = ["a", "b"]
        [query]
        batchsize = 3
        """)
    message = config_error(path)
    assert "query.batchsize" in message and "unknown key" in message
    assert str(path) in message


def test_unknown_top_level_key(tmp_path: Path):
    path = minimal(tmp_path, 'labels = ["a", "b"]\nlabel = "a"\n')
    assert "label: unknown key" in config_error(path)


def test_bad_value_names_the_key(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV, batch_size=-1)
    message = config_error(path)
    assert "query.batch_size" in message and str(path) in message and "-1" in message


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[stopping]\nbudget = 0\n', "stopping.budget"),
        ('[stopping]\ntarget = 1.5\n', "stopping.target"),
        ('[review]\nannotator = "two words"\n', "review.annotator"),
        ('[review]\npoll_interval_seconds = 0\n', "review.poll_interval_seconds"),
        ('[evaluation]\ncv_folds = 1\n', "evaluation.cv_folds"),
        ('[evaluation]\nholdout_fraction = 0.95\n', "evaluation.holdout_fraction"),
        ('[query]\nbatch_size = "many"\n', "query.batch_size"),
        ('[store]\nlock_timeout_seconds = -1\n', "store.lock_timeout_seconds"),
    ],
)
def test_more_bad_values(tmp_path: Path, extra: str, key: str):
    path = minimal(tmp_path, 'labels = ["a", "b"]\n' + extra)
    message = config_error(path)
    assert key in message and str(path) in message


def test_bad_strategy_name(tmp_path: Path):
    path = minimal(tmp_path, 'labels = ["a", "b"]\n[query]\nstrategy = "confusion"\n')
    message = config_error(path)
    assert "query.strategy" in message and "confusion" in message


def test_class_named_skip_rejected(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "skip"], source_path=SMS_CSV)
    message = config_error(path)
    assert "labels" in message and "skip" in message


def test_duplicate_labels_rejected(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "spam", "ham"], source_path=SMS_CSV)
    message = config_error(path)
    assert "labels" in message and "repeat" in message
    # Spacing does not make two classes different.
    path = minimal(tmp_path, 'labels = ["ham", " ham "]\n')
    assert "repeat" in config_error(path)


def test_fewer_than_two_labels_rejected(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham"], source_path=SMS_CSV)
    assert "labels" in config_error(path)
    path = minimal(tmp_path, "seed = 1\n")
    message = config_error(path)
    assert "labels" in message and "missing" in message


def test_labels_are_stripped(tmp_path: Path):
    path = minimal(tmp_path, 'labels = [" ham", "spam "]\n')
    assert load_config(path, environ={}).labels == ["ham", "spam"]


def test_classifier_that_does_not_import(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra='[model]\nclassifier = "sklearn.nope.Thing"\n')
    message = config_error(path)
    assert "model.classifier" in message and "sklearn.nope" in message
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra='[model]\nclassifier = "sklearn.linear_model.Nope"\n')
    assert "model.classifier" in config_error(path)
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra='[model]\nclassifier = "LogisticRegression"\n')
    assert "model.classifier" in config_error(path)


def test_classifier_without_predict_proba(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra='[model]\nclassifier = "sklearn.svm.LinearSVC"\nclassifier_params = {}\n')
    message = config_error(path)
    assert "model.classifier" in message and "predict_proba" in message and "LinearSVC" in message


def test_classifier_params_decide_predict_proba(tmp_path: Path):
    base = '[model]\nclassifier = "sklearn.svm.SVC"\n'
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV, extra=base)
    assert "predict_proba" in config_error(path)
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra=base + "classifier_params = { probability = true }\n")
    assert load_config(path, environ={}).model.classifier == "sklearn.svm.SVC"


def test_classifier_params_that_do_not_fit(tmp_path: Path):
    # The default classifier is checked against the given parameters too.
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra="[model]\nclassifier_params = { nope = 1 }\n")
    message = config_error(path)
    assert "classifier_params" in message and "nope" in message


def test_ingest_neither_imports_nor_checks_the_classifier(tmp_path: Path, prefect_api):
    """`alflow ingest` builds no model: a classifier it cannot import does not stop it (the
    run that trains says so), and scikit-learn is not imported (1.4 s of its start-up)."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from alflow.flows.cli import app

    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV,
                        extra='[model]\nclassifier = "sklearn.nope.Thing"\n')
    ingested = CliRunner().invoke(app, ["ingest", "--config", str(path), "--no-progress"])
    assert ingested.exit_code == 0 and "read" in ingested.output, ingested.output
    assert "model.classifier" in config_error(path)
    # without a [model] table too: its default is then the section's, built with the check off
    (tmp_path / "bare").mkdir()
    bare = write_config(tmp_path / "bare", labels=["ham", "spam"], source_path=SMS_CSV)
    imported = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom alflow.config import load_config\n"
                               f"for path in ({str(path)!r}, {str(bare)!r}):\n"
                               "    load_config(path, environ={}, check_model=False)\n"
                               "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))"],
        capture_output=True, text=True, timeout=120)
    assert imported.stdout.split() == ["[]"], imported.stderr


def test_classifier_from_env_is_checked(sms_config: Path):
    message = config_error(sms_config, {"ALFLOW_MODEL__CLASSIFIER": "sklearn.svm.LinearSVC"})
    assert "ALFLOW_MODEL__CLASSIFIER" in message and "model.classifier" in message


def test_bad_source(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('type = "files"', 'type = "ftp"'), encoding="utf-8")
    assert "sources.0" in config_error(path)
    path.write_text(text + 'colour = "red"\n', encoding="utf-8")
    message = config_error(path)
    assert "sources.0" in message and "colour" in message and "unknown key" in message


def test_label_map(tmp_path: Path):
    path = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV)
    text = path.read_text(encoding="utf-8")
    path.write_text(text + 'label_map = { 0 = "ham", 1 = "spam", Spam = "spam" }\n', encoding="utf-8")
    assert load_config(path, environ={}).sources[0].label_map == {"0": "ham", "1": "spam", "Spam": "spam"}
    assert load_config(write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV),
                       environ={}).sources[0].label_map == {}

    path.write_text(text + 'label_map = { HAM = "ham", Spam = "spamm" }\n', encoding="utf-8")
    assert config_error(path) == (
        f"{path.resolve()}: sources.0.label_map: 'Spam' maps to 'spamm', which is not one of labels ['ham', 'spam']"
    )
    source = '[{"type": "files", "name": "s", "path": "x.csv", "label_map": {"1": "yes"}}]'
    message = config_error(path, {"ALFLOW_SOURCES": source})
    assert message.startswith("ALFLOW_SOURCES: sources.0.label_map: '1' maps to 'yes'")


def test_missing_file(tmp_path: Path):
    message = config_error(tmp_path / "absent.toml")
    assert "absent.toml" in message and "not found" in message


def test_missing_file_in_cwd(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "alflow.toml" in config_error(None)


def test_invalid_toml(tmp_path: Path):
    path = minimal(tmp_path, 'labels = ["a", "b"\n[query\nbatch_size = \n')
    message = config_error(path)
    assert "TOML" in message and str(path) in message


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "alflow.toml"
    path.write_bytes(b'labels = ["caf\xe9", "b"]\n')
    assert "UTF-8" in config_error(path)

