"""The learning curve as a picture (issue 11, "Monitoring at a glance"): the plot itself,
the cycle summary that shows it, and the keyed artifact `alflow-learning-curve` that every
cycle adds a version to, through real `alflow run` cycles under the Prefect test server."""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pandas as pd
import pytest
from conftest import write_config
from markdown_it import MarkdownIt
from PIL import Image
from typer.testing import CliRunner

from alflow.tasks.plots import learning_curve_figure, learning_curve_png
from alflow.tasks.report import (
    LEARNING_CURVE_KEY,
    LEARNING_CURVE_PNG,
    cycle_markdown,
    data_url,
)

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URL = re.compile(r"!\[[^\]]*\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)")


def cycles_frame(**overrides) -> pd.DataFrame:
    """Five cycles as the store returns them; cycle 1 (cv, too few labels) has no macro F1
    and cycle 4's model was not promoted."""
    frame = pd.DataFrame({
        "cycle": [1, 2, 3, 4, 5],
        "n_labels": [20, 40, 60, 80, 100],
        "accuracy": [0.846, 0.918, 0.948, 0.940, 0.962],
        "macro_f1": [np.nan, 0.824, 0.894, 0.880, 0.924],
        "model_version": [1, 2, 3, 4, 5],
        "promoted": [True, True, True, False, True],
    })
    return frame.assign(**overrides)


def line(fig, gid: str):
    (found,) = [artist for artist in fig.axes[0].lines if artist.get_gid() == gid]
    return found


def decode(url: str) -> bytes:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return base64.b64decode(url.split(",", 1)[1], validate=True)


def render(markdown: str) -> str:
    """HTML as a CommonMark renderer with GFM tables renders it (the UI uses marked)."""
    return MarkdownIt("commonmark").enable(["table"]).render(markdown)


def shown_text(markdown: str) -> str:
    """What a reader sees of ``markdown``: its rendered text, tags dropped."""
    return html.unescape(re.sub(r"<[^>]+>", "", render(markdown)))


# -- the picture -------------------------------------------------------------------------------
def test_one_line_per_metric_against_labels_with_promoted_models_ringed():
    cycles = cycles_frame()
    fig = learning_curve_figure(cycles, "macro_f1")
    accuracy, macro_f1 = line(fig, "accuracy"), line(fig, "macro_f1")
    assert list(accuracy.get_xdata()) == [20, 40, 60, 80, 100]
    assert list(accuracy.get_ydata()) == pytest.approx([0.846, 0.918, 0.948, 0.940, 0.962])
    # a cycle without a score is left out, not drawn as 0
    assert list(macro_f1.get_xdata()) == [40, 60, 80, 100]
    assert list(macro_f1.get_ydata()) == pytest.approx([0.824, 0.894, 0.880, 0.924])
    # the metric that decides promotion is the thicker line
    assert macro_f1.get_linewidth() > accuracy.get_linewidth()
    # rings on the promoted models only (cycle 4's was not)
    assert list(line(fig, "accuracy-promoted").get_xdata()) == [20, 40, 60, 100]
    assert list(line(fig, "macro_f1-promoted").get_xdata()) == [40, 60, 100]
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend == ["accuracy", "macro F1", "model promoted"]
    assert fig.axes[0].get_xlabel() == "labels"
    assert "cycle 5 (100 labels)" in fig.axes[0].get_title()


def test_png_is_small_and_changes_with_the_curve():
    png = learning_curve_png(cycles_frame(), "accuracy")
    assert png.startswith(PNG_SIGNATURE)
    assert len(png) < 10_000, f"{len(png)} bytes: it travels base64 in two artifacts a cycle"
    image = Image.open(io.BytesIO(png))
    assert image.size == (480, 240)
    # not a blank canvas: the two line colours are in it
    colours = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=256)}
    assert any(r < 80 and b > 150 for r, g, b in colours), "no blue (accuracy) pixels"
    assert any(r > 200 and 80 < g < 170 and b < 80 for r, g, b in colours), "no orange (macro F1) pixels"
    assert learning_curve_png(cycles_frame(), "accuracy") == png  # deterministic
    other = cycles_frame(accuracy=[0.5, 0.6, 0.7, 0.8, 0.9])
    assert learning_curve_png(other, "accuracy") != png


def test_a_single_cycle_plots_and_no_cycle_is_refused():
    one = cycles_frame().iloc[:1]
    assert learning_curve_png(one).startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="no cycle recorded yet"):
        learning_curve_figure(cycles_frame().iloc[:0])


# -- the cycle summary ----------------------------------------------------------------------------
COUNTS = {"pool": 900, "items": 1000, "holdout": 100, "labeled": 100, "skipped": 0}


def test_cycle_summary_shows_the_picture_above_the_table():
    cycles = cycles_frame()
    url = data_url(learning_curve_png(cycles, "macro_f1"))
    markdown = cycle_markdown(COUNTS, cycles, None, None, "", "macro_f1", curve_url=url)
    rendered = render(markdown)
    images = re.findall(r'<img src="([^"]+)" alt="([^"]*)"', rendered)
    assert images == [(url, "Learning curve: accuracy and macro F1 against labels")]
    heading, image, table = (rendered.index(s) for s in ("<h2>Learning curve (macro_f1)</h2>", "<img", "<table>"))
    assert heading < image < table
    assert ">0.962</td>" in rendered and ">v5</td>" in rendered  # the numbers stay
    # without a picture the summary is what it was
    assert "<img" not in render(cycle_markdown(COUNTS, cycles, None, None, "", "macro_f1"))


# -- through `alflow run` under the Prefect test server -----------------------------------------
def curve_versions(run_ids: list[str]) -> dict[str, object]:
    """The `alflow-learning-curve` artifacts created by these flow runs, by flow run id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[LEARNING_CURVE_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)))
    by_run = {str(a.flow_run_id): a for a in found}
    assert len(by_run) == len(found), "a run created the curve more than once"
    return by_run


def latest_curve():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactCollectionFilter,
        ArtifactCollectionFilterKey,
    )

    with get_client(sync_client=True) as client:
        (latest,) = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=[LEARNING_CURVE_KEY])))
    return latest


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_every_cycle_updates_the_keyed_curve_and_its_summary_shows_it(tmp_path, small_csv):
    """Cycle 1 creates `alflow-learning-curve`; cycle 2 adds a new version under the same
    key (the latest is cycle 2's). Each picture is the PNG written beside the database at
    that cycle, and each run's cycle summary shows its own picture."""
    from test_flows import run_artifacts, store_for

    from alflow.flows.cli import app

    config = write_config(tmp_path, labels=["ham", "spam"], source_path=small_csv)
    store = store_for(config)
    png_file = store.path.parent / LEARNING_CURVE_PNG
    pictures = []
    for cycle in (1, 2):
        result = runner.invoke(app, ["run", "--config", str(config), "--auto", "--cycles", "1", "--no-progress"])
        assert result.exit_code == 0, result.output
        cycles = store.cycles()
        assert list(cycles["cycle"]) == list(range(1, cycle + 1))
        run_ids = [str(r) for r in cycles["flow_run_id"]]

        versions = curve_versions(run_ids)
        assert sorted(versions) == sorted(run_ids), "one version of the curve per cycle"
        latest = latest_curve()
        assert str(latest.latest_id) == str(versions[run_ids[-1]].id)
        assert str(latest.flow_run_id) == run_ids[-1]
        assert latest.type == "markdown"
        last = cycles.iloc[-1]
        assert f"**cycle {cycle}**: {last['n_labels']} labels · accuracy {last['accuracy']:.3f}" \
            in latest.description
        (url,) = DATA_URL.findall(latest.description)
        picture = decode(url)
        assert picture.startswith(PNG_SIGNATURE)
        assert png_file.read_bytes() == picture  # the file beside the database is this cycle's
        assert picture == learning_curve_png(cycles, "macro_f1")  # of every cycle so far
        # the body: the numbers behind the picture and where the file is
        assert f"| {cycle} | {last['n_labels']} |" in latest.data
        assert f"PNG: {png_file}" in shown_text(latest.data)

        summary = run_artifacts(run_ids[-1])["cycle-summary"].data
        assert DATA_URL.findall(summary) == [url]
        pictures.append(picture)

    assert pictures[0] != pictures[1]
    first, second = (versions[r] for r in run_ids)
    assert first.key == second.key == LEARNING_CURVE_KEY and first.id != second.id
    assert "**cycle 1**" in first.description and decode(DATA_URL.findall(first.description)[0]) == pictures[0]
    assert not list(png_file.parent.glob(".*.partial"))
