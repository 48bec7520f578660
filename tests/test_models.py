"""Model versions: paths relative to models_dir, a changed class list or classifier, the
skops trust list, promotion, and "already trained on these labels"."""

from __future__ import annotations

import collections
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from alflow.config import FilesSource, load_config
from alflow.connectors import build_connector, to_row
from alflow.tasks import modeling
from alflow.tasks.store import DOC_SQL, Answer, Store, holdout_sql

AG_LABELS = ["world", "sports", "business", "scitech"]
CHANGED = (f"labels changed since model v1 ({AG_LABELS} -> {AG_LABELS + ['other']}): "
           "retraining on the new class list")


# -- helpers -----------------------------------------------------------------------------------
def project(directory: Path, *, labels=None, evaluation: str = "holdout", extra: str = "") -> Path:
    """An alflow.toml over the 800 AG News items, state in ``directory/state``, batches of 10."""
    from conftest import AG_NEWS_CSV, write_config

    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, labels=labels or AG_LABELS, source_path=AG_NEWS_CSV, title_column="title",
                        evaluation=evaluation, batch_size=10, extra=extra)


def set_labels(config: Path, labels: list[str]) -> None:
    text = config.read_text(encoding="utf-8")
    first, rest = text.split("\n", 2)[1], text.split("\n", 2)[2]
    assert first.startswith("labels = ")
    config.write_text("\n" + f"labels = {labels!r}".replace("'", '"') + "\n" + rest, encoding="utf-8")


def ingested(config: Path) -> tuple[Store, object]:
    """The store of ``config`` with its source ingested (no Prefect), and the settings."""
    settings = load_config(config)
    store = Store(settings.database, lock_timeout=5)
    store.migrate()
    source = settings.sources[0]
    connector = build_connector(FilesSource(type="files", name="ag", path=source.path, title_column="title",
                                            label_column="label"))
    store.upsert_items(pd.DataFrame([to_row(r, "ag") for r in connector.fetch()]), "ingest-ag")
    return store, settings


def label_gold(store: Store, settings, n: int, offset: int = 0) -> list[str]:
    """Answer ``n`` more pool items (in item_id order) with their gold labels."""
    frame = store.query_df(
        f"""SELECT item_id, gold_label FROM items i WHERE NOT {holdout_sql(settings.holdout_fraction)}
        ORDER BY item_id LIMIT ? OFFSET ?""", [n, offset])
    store.record_labels([Answer(i, g) for i, g in zip(frame["item_id"], frame["gold_label"])],
                        annotator="sim", origin="simulated")
    return frame["item_id"].tolist()


def n_models(store: Store) -> int:
    return int(store.scalar("SELECT count(*) FROM models"))


def model_files(settings) -> list[str]:
    return sorted(p.name for p in settings.models_dir.glob("*.skops"))


def tamper(path: Path, value) -> None:
    """Overwrite a model file with the same fitted model plus ``value`` in an attribute."""
    import skops.io as sio

    model = load_skops(path)
    model.named_steps["clf"].alflow_extra = value
    sio.dump(model, path)


def load_skops(path: Path):
    import skops.io as sio

    return sio.load(path, trusted=sio.get_untrusted_types(file=path))


def messages(caplog, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# -- should_promote ----------------------------------------------------------------------------
def test_should_promote_rules():
    assert modeling.should_promote(0.80, None, "accuracy", 50).promoted  # first model
    worse = modeling.should_promote(0.79, 0.80, "accuracy", 50)
    assert not worse.promoted and "0.790 < current 0.800 on 50 items" in worse.reason
    assert modeling.should_promote(0.80, 0.80, "accuracy", 50).promoted  # equal
    assert modeling.should_promote(0.85, 0.80, "macro_f1", 50).promoted  # better
    assert not modeling.should_promote(None, 0.80, "accuracy", 50).promoted
    assert modeling.should_promote(0.5, 0.9, "accuracy", 0).promoted  # nothing to compare on


def test_cv_promotion_compares_on_labels_added_since_the_current_model(tmp_path):
    """With cv, both models are scored on exactly the labels the current one has not seen."""
    store, settings = ingested(project(tmp_path, evaluation="cv"))
    label_gold(store, settings, 30)
    first = modeling_retrain(store, settings)
    assert first.promoted and first.reason == "first model"
    fresh = label_gold(store, settings, 12, offset=30)
    second = modeling_retrain(store, settings)
    promotion = second.metrics["promotion"]
    assert promotion["compared_on"] == 12
    # the current model's score is its own on those 12 items, nothing else
    v1 = load_skops(settings.models_dir / "model-0001.skops")
    frame = store.query_df(f"SELECT i.item_id, {DOC_SQL} AS doc, i.gold_label FROM items i "
                           "WHERE list_contains(?, i.item_id) ORDER BY i.item_id", [fresh])
    docs, truth = frame["doc"].tolist(), frame["gold_label"].tolist()
    assert len(docs) == 12
    expected = modeling.metrics(truth, v1.predict(docs))[settings.evaluation.metric]
    assert promotion["current"] == pytest.approx(expected)
    assert second.promoted == (promotion["new"] >= promotion["current"])


def modeling_retrain(store, settings):
    from alflow.tasks.train import retrain

    return retrain(store, settings)


# -- retrain: already trained, what a models row records ---------------------------------------
def test_retrain_twice_on_the_same_labels_is_one_model(tmp_path):
    store, settings = ingested(project(tmp_path))
    label_gold(store, settings, 20)
    first = modeling_retrain(store, settings)
    assert first.model_version == 1 and first.promoted
    again = modeling_retrain(store, settings)
    assert again.model_version == 1 and again.reason == "already trained on these labels"
    assert n_models(store) == 1 and model_files(settings) == ["model-0001.skops"]
    label_gold(store, settings, 1, offset=20)
    third = modeling_retrain(store, settings)
    assert third.model_version == 2 and third.n_labels == 21
    assert n_models(store) == 2 and model_files(settings) == ["model-0001.skops", "model-0002.skops"]


def test_model_rows_hold_the_file_name_and_the_class_list(tmp_path):
    store, settings = ingested(project(tmp_path))
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    row = store.current_model()
    assert row["path"] == "model-0001.skops"
    assert row["labels"] == AG_LABELS


# -- skops trust -------------------------------------------------------------------------------
def test_default_model_needs_no_extra_trust():
    from alflow.config import ModelSettings

    assert modeling.trusted_types(ModelSettings(), AG_LABELS) == frozenset()
    forest = ModelSettings(classifier="sklearn.ensemble.RandomForestClassifier",
                           classifier_params={"n_estimators": 5})
    assert modeling.trusted_types(forest, AG_LABELS) == {"sklearn.tree._tree.Tree"}


@pytest.mark.parametrize("value, refused", [
    (collections.Counter({"a": 1}), "collections.Counter"),
    (__import__("functools").partial(print), "functools.partial"),
    (__import__("operator").attrgetter("x"), "operator.attrgetter"),
])
def test_a_model_file_with_another_type_is_refused(tmp_path, value, refused):
    store, settings = ingested(project(tmp_path))
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    path = settings.models_dir / "model-0001.skops"
    tamper(path, value)
    with pytest.raises(modeling.UntrustedModelError) as info:
        modeling.load_model(path, modeling.trusted_types(settings.model, settings.labels))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and refused in message


def test_untrusted_model_falls_back_to_the_previous_promoted_one(tmp_path, caplog):
    from alflow.tasks.train import load_current_model

    store, settings = ingested(project(tmp_path))
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    label_gold(store, settings, 20, offset=20)
    modeling_retrain(store, settings)
    _promote_all(store)  # two promoted models, whatever v2 scored
    tamper(settings.models_dir / "model-0002.skops", collections.Counter())
    current = load_current_model(store, settings)
    assert current.version == 1
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1 and "model-0002.skops" in errors[0] and "collections.Counter" in errors[0]
    assert n_models(store) == 2  # nothing retrained: the previous model serves

    # no earlier usable model: retrain from the stored labels
    tamper(settings.models_dir / "model-0001.skops", collections.Counter())
    current = load_current_model(store, settings)
    assert current.version == 3 and current.row["promoted"]
    assert current.row["metrics"]["promotion"]["reason"].startswith("replaces model v2: no promoted model")


def _promote_all(store: Store) -> None:
    with store.transaction() as con:
        con.execute("UPDATE models SET promoted = true")


# -- missing or unreadable files, changed labels or classifier ---------------------------------
@pytest.mark.parametrize("damage", ["delete", "truncate", "not-a-zip"])
def test_unusable_model_file_is_retrained_from_the_stored_labels(tmp_path, caplog, damage):
    from alflow.tasks.train import load_current_model

    store, settings = ingested(project(tmp_path))
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    path = settings.models_dir / "model-0001.skops"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_text("not a model")
    current = load_current_model(store, settings)
    assert current is not None and current.version == 2 and current.row["promoted"]
    assert current.row["metrics"]["promotion"]["reason"].startswith("replaces model v1: model file ")
    warnings = messages(caplog)
    assert len(warnings) == 1 and "model-0001.skops" in warnings[0] and "retraining" in warnings[0]
    assert current.model.predict(["a football match"])[0] in AG_LABELS
    # the repaired model serves the next call without retraining
    assert load_current_model(store, settings).version == 2 and n_models(store) == 2


def test_changed_labels_retrain_on_the_new_class_list(tmp_path, caplog):
    from alflow.tasks.train import load_current_model

    config = project(tmp_path, labels=["world", "sports", "business", "scitech"])
    store, settings = ingested(config)
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    set_labels(config, AG_LABELS + ["other"])
    settings = load_config(config)
    current = load_current_model(store, settings)
    assert current.version == 2 and current.row["labels"] == AG_LABELS + ["other"]
    warnings = messages(caplog)
    assert warnings == [CHANGED]
    assert modeling.score_chunk(current.model, ["a match"], settings.labels)["proba"].shape == (1, 5)


def test_removed_class_trains_on_the_labels_still_configured(tmp_path, caplog):
    from alflow.tasks.train import load_current_model

    config = project(tmp_path)
    store, settings = ingested(config)
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    set_labels(config, ["world", "sports"])
    settings = load_config(config)
    current = load_current_model(store, settings)
    assert set(current.model.classes_) <= {"world", "sports"}
    assert current.row["n_labels"] < 20


def test_legacy_model_row_without_labels_detected_from_its_predictions(tmp_path, caplog):
    """A model trained before schema v2 has labels NULL: its stored probabilities' width tells."""
    from alflow.tasks.prelabel import prelabel_pool
    from alflow.tasks.train import load_current_model

    config = project(tmp_path)
    store, settings = ingested(config)
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    with store.transaction() as con:
        con.execute("UPDATE models SET labels = NULL")
    current = load_current_model(store, settings)
    assert current.version == 1  # same labels: usable as it is
    prelabel_pool(store, current.model, 1, settings.labels, 500, settings.holdout_fraction)
    set_labels(config, AG_LABELS + ["other"])
    current = load_current_model(store, load_config(config))
    assert current.version == 2
    assert any("labels changed since model v1 (4 classes -> " in m for m in messages(caplog))


def test_changed_classifier_is_retrained(tmp_path, caplog):
    from alflow.tasks.train import load_current_model

    config = project(tmp_path)
    store, settings = ingested(config)
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    config.write_text(config.read_text() + '\n[model]\nclassifier = "sklearn.naive_bayes.ComplementNB"\n'
                      "classifier_params = {}\n")
    settings = load_config(config)
    current = load_current_model(store, settings)
    assert current.version == 2 and type(current.model.named_steps["clf"]).__name__ == "ComplementNB"
    assert any(m.startswith("model.classifier changed since model v1") for m in messages(caplog))


def test_nothing_trainable_on_the_new_labels_is_a_cold_start(tmp_path, caplog):
    from alflow.tasks.train import load_current_model

    config = project(tmp_path)
    store, settings = ingested(config)
    label_gold(store, settings, 20)
    modeling_retrain(store, settings)
    set_labels(config, ["alpha", "beta"])
    assert load_current_model(store, load_config(config)) is None
    assert any("cold start" in m for m in messages(caplog))


# -- end to end: cycles ------------------------------------------------------------------------
@pytest.fixture
def cycle(prefect_api):
    from alflow.flows.cycle import active_learning_cycle

    def run(config: Path, ingest: bool = True) -> dict:
        return active_learning_cycle(str(config), auto=True, ingest_sources=ingest)

    return run


def batch_model(config: Path, summary: dict) -> int | None:
    settings = load_config(config)
    return Store(settings.database).batch(summary["batch_id"])["model_version"]


@pytest.mark.slow
def test_moved_project_folder_keeps_the_loop_working(tmp_path, cycle, caplog):
    config = project(tmp_path / "before")
    first = cycle(config)
    assert first["model_version"] == 1
    shutil.move(tmp_path / "before", tmp_path / "after")
    moved = tmp_path / "after" / "alflow.toml"
    second = cycle(moved, ingest=False)
    assert batch_model(moved, second) == 1  # pre-labeled with the moved model, not retrained
    assert second["cycle"] == 2 and second["model_version"] == 2
    store = Store(load_config(moved).database)
    assert store.scalar("SELECT count(*) FROM predictions WHERE model_version = 1") > 0
    assert not [m for m in messages(caplog) if "model" in m]


@pytest.mark.slow
def test_deleted_model_file_is_retrained_with_a_warning(tmp_path, cycle, caplog):
    config = project(tmp_path)
    cycle(config)
    (load_config(config).models_dir / "model-0001.skops").unlink()
    second = cycle(config, ingest=False)
    assert batch_model(config, second) == 2  # the repaired model pre-labeled the batch
    assert second["cycle"] == 2 and second["model_version"] == 3
    warnings = messages(caplog)
    assert any("model-0001.skops is missing: retraining from the stored labels" in m for m in warnings)


@pytest.mark.slow
def test_changed_labels_cycle_says_so_and_completes(tmp_path, cycle, caplog):
    """The pool was pre-labeled by v1 (a cycle stopped after pre-labeling), then a class is
    added: the next cycle used to fail reshaping v1's 4-class probabilities to 5."""
    from alflow.tasks.prelabel import prelabel_pool

    config = project(tmp_path)
    cycle(config)
    settings = load_config(config)
    store = Store(settings.database)
    prelabel_pool(store, load_skops(settings.models_dir / "model-0001.skops"), 1, settings.labels, 500,
                  settings.holdout_fraction)
    set_labels(config, AG_LABELS + ["other"])
    second = cycle(config, ingest=False)
    assert second["cycle"] == 2 and batch_model(config, second) == 2
    changed = [m for m in messages(caplog) if "labels changed" in m]
    assert changed == [CHANGED]
    assert store.scalar("SELECT min(len(proba)) FROM predictions WHERE model_version = 2") == 5


@pytest.mark.slow
def test_untrusted_model_file_cycle_uses_the_previous_promoted_model(tmp_path, cycle, caplog):
    config = project(tmp_path)
    cycle(config)
    second = cycle(config, ingest=False)
    store = Store(load_config(config).database)
    _promote_all(store)  # two promoted models, whatever cycle 2 scored
    path = load_config(config).models_dir / "model-0002.skops"
    tamper(path, collections.Counter({"x": 1}))
    third = cycle(config, ingest=False)
    assert second["model_version"] == 2 and batch_model(config, third) == 1
    assert third["cycle"] == 3
    refused = [m for m in messages(caplog, logging.ERROR) if "model-0002.skops" in m]
    assert refused and "collections.Counter" in refused[0] and "\n" not in refused[0]


def test_pool_fitted_features_cover_unlabeled_words_and_survive_skops(tmp_path):
    """vectorizer_fit = "pool": the vocabulary (and LSA) come from the pool, the classifier
    from the labels; the file loads with the trust list of the configured model."""
    from alflow.config import ModelSettings

    settings = ModelSettings(vectorizer_fit="pool", svd_components=5)
    docs, labels = ["cheap pills now", "win cash now", "lunch at noon", "see you at noon"], ["spam", "spam", "ham", "ham"]
    pool = ["zebra crossing tonight", "free zebra prize", "meeting moved to friday"]
    model = modeling.fit(settings, docs, labels, pool_docs=pool)
    assert {"zebra", "friday"} <= set(model.named_steps["tfidf"].vocabulary_)
    assert "zebra" not in modeling.fit(ModelSettings(), docs, labels).named_steps["tfidf"].vocabulary_
    # The same fitted features are reused, not refitted, when handed over (a committee, simulate).
    again = modeling.fit(settings, docs[:3] + ["noon"], ["spam", "spam", "ham", "ham"], features=model[:-1])
    assert again.named_steps["tfidf"] is model.named_steps["tfidf"]
    path = modeling.save_model(model, tmp_path / "m.skops")
    loaded = modeling.load_model(path, modeling.trusted_types(settings, ["ham", "spam"]))
    assert (loaded.predict_proba(pool) == model.predict_proba(pool)).all()
    with pytest.raises(ValueError, match='vectorizer_fit = "pool"'):
        ModelSettings(svd_components=5)
