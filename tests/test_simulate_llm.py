"""`alflow simulate` with an [llm] endpoint: the LLM's zero-shot baseline, and features
read from embeddings, through the command against the fake OpenAI server."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMS_CSV
from typer.testing import CliRunner

from alflow.flows.cli import app
from alflow.flows.simulate import (
    LLM_COLUMNS,
    SUMMARY_COLUMNS,
    LLMBaseline,
    SimulationResult,
    labels_to_pass,
    load_dataset,
    reference_lines,
    summarize,
    summary_markdown,
    with_llm,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def sms_sample(tmp_path_factory):
    """160 SMS rows (both classes), a quarter of them the test set."""
    frame = pd.read_csv(SMS_CSV).head(160)
    path = tmp_path_factory.mktemp("simllm") / "sms.csv"
    frame.to_csv(path, index=False)
    return path


def llm_config(path, base_url: str, features: str = "tfidf") -> str:
    path.write_text(f'[model]\nfeatures = "{features}"\nself_training = 0\n\n'
                    f'[llm]\nbase_url = "{base_url}"\nmodel = "fake-chat"\nembedding_model = "fake-embed"\n',
                    encoding="utf-8")
    return str(path)


def test_simulate_draws_the_llm_baseline_and_the_labels_to_pass_it(sms_sample, tmp_path, openai_server):
    """The test set is classified once (one chat request per test item); the summary holds
    the LLM's accuracy and macro F1, which the fake's keyword rule gives, and per strategy
    the labels its mean curve needs to beat it; the model reads tfidf+embeddings, every
    distinct text embedded once (batches of 64)."""
    config = llm_config(tmp_path / "alflow.toml", openai_server.base_url, "tfidf+embeddings")
    out = tmp_path / "out"
    result = runner.invoke(app, ["simulate", "--data", str(sms_sample), "--out", str(out), "--strategies",
                                 "random,margin", "--batch", "10", "--cycles", "3", "--init", "10", "--seeds", "2",
                                 "--config", config, "--jobs", "1", "--no-progress"])
    assert result.exit_code == 0, result.output

    data = load_dataset(sms_sample)
    truth = data.test_labels.tolist()
    said = [openai_server.label_of(doc, data.classes) for doc in data.test_docs]
    expected = float(np.mean([a == b for a, b in zip(said, truth)]))
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS + LLM_COLUMNS
    assert summary["llm_accuracy"].tolist() == pytest.approx([expected] * 2)
    spam = [(a == "spam", b == "spam") for a, b in zip(said, truth)]
    assert 0 < summary["llm_macro_f1"].iloc[0] <= 1 and any(a and b for a, b in spam)

    paths = openai_server.paths()
    assert paths.count("/v1/chat/completions") == len(data.test_docs)  # asked once, not per strategy or seed
    distinct = len(set(data.pool_docs.tolist() + data.test_docs.tolist()))
    assert paths.count("/v1/embeddings") == math.ceil(distinct / 64)

    curves = pd.read_csv(out / "curves.csv")
    for row in summary.itertuples(index=False):
        own = curves[curves["strategy"] == row.strategy]
        means = own.groupby("cycle")[["n_labels", "accuracy"]].mean()
        above = means[means["accuracy"] > expected]
        if len(above):
            assert row.labels_to_llm == above["n_labels"].iloc[0]
        else:
            assert math.isnan(row.labels_to_llm)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"LLM zero-shot (fake-chat) on the {len(truth)} test items: accuracy {expected:.3f}" in result.output
    assert "labels to pass the LLM" in result.output


def test_the_llm_line_and_labels_to_pass_it():
    """curves.png's lines: the target, and the LLM's accuracy with its model in the legend;
    labels_to_pass is the first mean n_labels whose mean accuracy is above it, else NaN."""
    llm = LLMBaseline(model="m", accuracy=0.8, macro_f1=0.7, n=40, usage={"requests": 40})
    assert reference_lines(0.9) == [(0.9 * 0.95, "95% of full pool (0.900)", "--")]
    assert reference_lines(0.9, llm)[1] == (0.8, "LLM zero-shot, m (0.800)", ":")
    curves = pd.DataFrame({"strategy": "s", "seed": [0, 1, 0, 1, 0, 1], "cycle": [0, 0, 1, 1, 2, 2],
                           "n_labels": [10, 10, 20, 20, 30, 30], "accuracy": [0.7, 0.9, 0.8, 0.8, 0.85, 0.95]})
    assert labels_to_pass(curves, 0.8) == 30  # cycle 0 and 1 only reach 0.8 (mean), cycle 2 passes it
    assert math.isnan(labels_to_pass(curves, 0.95))
    summary = with_llm(summarize(curves.assign(macro_f1=0.5), 0.9), curves, llm)
    assert summary.iloc[0][LLM_COLUMNS].tolist() == [0.8, 0.7, 30.0]
    markdown = summary_markdown(SimulationResult(curves, summary, 0.9, Path("."), llm))
    assert "LLM zero-shot (m) on the 40 test items: accuracy 0.800, macro F1 0.700" in markdown
    assert "| s | 30 |" in markdown


def test_simulate_refuses_embeddings_without_an_embedding_model(sms_sample, tmp_path):
    (tmp_path / "alflow.toml").write_text('[model]\nfeatures = "embeddings"\n', encoding="utf-8")
    result = runner.invoke(app, ["simulate", "--data", str(sms_sample), "--out", str(tmp_path / "o"),
                                 "--config", str(tmp_path / "alflow.toml"), "--jobs", "1", "--no-progress"])
    assert result.exit_code == 1
    assert "model.features = 'embeddings' needs [llm] base_url and embedding_model" in result.output
    assert len(result.output.strip().splitlines()) == 1
