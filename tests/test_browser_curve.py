"""The learning curve as a picture in the real Prefect UI, offline (issue 11, "Monitoring at
a glance"): Debian chromium, driven by Playwright, against a real `prefect server` on
127.0.0.1 that this file starts once.

    prefect server start (own PREFECT_HOME, free port)
    alflow run --auto --cycles 2      two flow runs, two versions of `alflow-learning-curve`
    chromium: the second run's Artifacts tab, its cycle summary, the Artifacts page and
              the page of the key `alflow-learning-curve` each show the curve: an <img>
              that loaded (naturalWidth > 0) and is visible, and is cycle 2's picture,
              the same bytes as the PNG written beside the database; no request leaves
              127.0.0.1.

What the UI (Prefect 3.9) does with a picture, as observed: markdown `![..](data:image/png;
base64,..)` renders as an <img> (so do data: SVG and image artifacts; an image artifact
also prints its whole URL as link text under the picture, so alflow uses markdown). A
run's Artifacts tab and the Artifacts page show each artifact's *description*, not its
body, so the keyed artifact carries its picture in the description.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from conftest import SMS_CSV, write_config
from test_browser import (
    CHROMIUM_ARGS,
    Processes,
    alflow_command,
    api_call,
    note_screenshot,
    require_browser,
    tail,
    wait_exit,
    real_prefect_server,
)

from alflow.tasks.report import LEARNING_CURVE_KEY, LEARNING_CURVE_PNG
from alflow.tasks.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ALT = "Learning curve: accuracy and macro F1 against labels"


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """One real `prefect server` for this file: (UI url, API url, the client environment)."""
    with real_prefect_server(tmp_path_factory.mktemp("prefect-ui")) as (ui_url, api_url, client_env, _):
        yield ui_url, api_url, client_env


def shown_image(page, scope, where: str) -> str:
    """The curve's <img> in ``scope``: present, loaded and visible; returns its src."""
    from playwright.sync_api import expect

    image = scope.get_by_role("img", name=ALT)
    expect(image).to_have_count(1)
    image.scroll_into_view_if_needed()
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete", arg=image.element_handle())
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert (width, height) == (480, 240), f"{where}: the picture did not load ({width}x{height})"
    box = image.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 50, f"{where}: the picture is not on screen: {box}"
    return image.get_attribute("src")


def png_of(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    return base64.b64decode(src[len(prefix):])


@pytest.mark.timeout(300)
def test_the_learning_curve_shows_in_the_prefect_ui_offline(prefect_ui, tmp_path: Path):
    chromium, sync_playwright = require_browser()
    from playwright.sync_api import expect

    ui_url, api_url, client_env = prefect_ui
    lines = SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:401]
    corpus = tmp_path / "sms_400.csv"
    corpus.write_text("".join(lines), encoding="utf-8")
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=corpus, batch_size=10)
    store = Store(tmp_path / "state" / "alflow.duckdb", lock_timeout=60)

    processes = Processes(tmp_path, client_env)
    try:
        run, log = processes.start("run-auto", alflow_command(config, "--auto", "--cycles", "2"))
        code = wait_exit(run, log, 180, "`alflow run --auto --cycles 2`")
        assert code == 0, f"`alflow run --auto --cycles 2` exited with {code}:\n{tail(log)}"
    finally:
        processes.stop_all()
    cycles = store.cycles()
    assert list(cycles["cycle"]) == [1, 2], cycles
    run_id = str(cycles["flow_run_id"].iloc[-1])
    picture = (store.path.parent / LEARNING_CURVE_PNG).read_bytes()
    summary = api_call("POST", f"{api_url}/artifacts/filter", timeout=10.0, json={
        "artifacts": {"key": {"any_": ["cycle-summary"]}, "flow_run_id": {"any_": [run_id]}}}).json()
    assert len(summary) == 1, summary

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        outside: list[str] = []
        local = (ui_url, f"blob:{ui_url}", "data:")  # the UI's workers load from blob: URLs
        page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
        try:
            # the run's Artifacts tab: the keyed artifact's card shows cycle 2's curve
            page.goto(f"{ui_url}/runs/flow-run/{run_id}", wait_until="domcontentloaded")
            page.get_by_text("Artifacts", exact=True).first.click()
            card = page.locator(".artifact-card").filter(has_text=LEARNING_CURVE_KEY)
            assert png_of(shown_image(page, card, "the run's Artifacts tab")) == picture
            expect(card).to_contain_text("cycle 2:")
            page.screenshot(path=str(tmp_path / "run-artifacts-tab.png"), full_page=True)

            # the run's cycle summary shows it above the table
            page.goto(f"{ui_url}/artifacts/artifact/{summary[0]['id']}", wait_until="domcontentloaded")
            assert png_of(shown_image(page, page, "the cycle summary")) == picture
            page.screenshot(path=str(tmp_path / "cycle-summary.png"), full_page=True)

            # the Artifacts page: the key's card shows the latest curve
            page.goto(f"{ui_url}/artifacts", wait_until="domcontentloaded")
            card = page.locator(".artifact-card").filter(has_text=LEARNING_CURVE_KEY)
            assert png_of(shown_image(page, card, "the Artifacts page")) == picture

            # the key's page: the latest version (cycle 2) on top, both versions listed
            page.goto(f"{ui_url}/artifacts/key/{LEARNING_CURVE_KEY}", wait_until="domcontentloaded")
            expect(page.locator(".artifact-timeline-item-content")).to_have_count(2)
            header = page.locator(".artifact-description").first
            assert png_of(shown_image(page, header, f"the page of key {LEARNING_CURVE_KEY}")) == picture
            expect(header).to_contain_text("cycle 2:")
            page.screenshot(path=str(tmp_path / "artifact-key.png"), full_page=True)
            assert not outside, f"the UI fetched from outside 127.0.0.1: {outside}"
        except BaseException as exc:
            note_screenshot(page, exc, tmp_path / "failure.png")
            raise
        finally:
            browser.close()
