"""The review loop in a real browser: Debian chromium, driven by Playwright, resumes a paused
run from the Prefect UI of a real `prefect server` on 127.0.0.1 and the answer lands in DuckDB.

    prefect server start (own PREFECT_HOME, free port)
    alflow run --auto            cycle 1, simulated answers for the whole pool: model v1
    (5 messages full of markup are added to the source)
    alflow run                   cycle 2: ingests and pre-labels them, queries all 5, pauses
    chromium: the batch's table artifact and the Resume form show each text exactly as
              typed (no image, no javascript: link, no stray backslash); change item #1
              to the other class -> Submit
    alflow run exits 0           labels (origin 'ui', the pre-label shown), batch 'labeled'
    alflow serve                 cycle 3 as a deployed run (5 more messages): it *suspends*,
              its process exits; chromium resumes it from the UI (one label changed) ->
              the run replays and records the form's answers exactly once
    (meanwhile) a multi-label project: `alflow run --auto`, then `alflow run` pauses;
              chromium: one multi-select per item, the pre-label's tags chosen, none for
              the blind item; add a tag to one item -> Submit: the stored tag sets are
              the preselected ones ("" where none was selected) and the changed one

Needs Debian's chromium (``apt-get install chromium``; Playwright's own browser download is
never used). ``ALFLOW_SKIP_BROWSER_TESTS=1`` skips the test instead.
"""

from __future__ import annotations

import csv
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import SMS_CSV, chromium_path, write_config

from alflow.tasks.multilabel.tags import format_tags, parse_tags
from alflow.tasks.review import item_heading, shown_prelabel, trim
from alflow.tasks.store import Store, owner_gone

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
CLASSES = ["ham", "spam"]
BATCH_SIZE = 5
FLOW_NAME = "active-learning-cycle"
# The review batch: messages whose markup must show as typed, never as HTML or links.
NASTY_TEXTS = [
    "Win <img src=x onerror=alert(1)> now & claim [click](javascript:alert(1)) prize",
    "Meet at `noon` | bring *stars* and _under_ too, a|b|c",
    "# heading\nsecond line &amp; third &lt;b&gt; &#65;",
    "back\\slash \\* and ~~strike~~ <b>bold</b> www.example.com <!-- note -->",
    "1. first\n- item\n\n    > quote ![img](x.png) __dunder__",
]


# Cycle 3's review batch (plain messages, no gold label).
PLAIN_TEXTS = [
    "Are we still on for lunch tomorrow at the usual place?",
    "URGENT! You have won a 1 week FREE membership, call 09061701461 now to claim",
    "Sorry, I'll call you later, in a meeting right now",
    "Congratulations, your mobile number has been selected for a 2000 pound prize. Text CLAIM to 81010",
    "Can you pick up some milk on the way home",
]


# -- requirements -----------------------------------------------------------------------------
def require_browser() -> tuple[str, object]:
    """(chromium executable, playwright.sync_api.sync_playwright); a failure naming what to
    install when either is missing, a skip when ALFLOW_SKIP_BROWSER_TESTS=1."""
    if os.environ.get("ALFLOW_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("ALFLOW_SKIP_BROWSER_TESTS=1: browser tests skipped")
    chromium = chromium_path()
    if not chromium:
        pytest.fail("Debian's chromium is not installed (no `chromium` on PATH nor /usr/bin/chromium): "
                    "install it with `apt-get install chromium` (Playwright's browser download is not "
                    "used), or set ALFLOW_SKIP_BROWSER_TESTS=1 to skip this test", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install -e '.[test]' "
                    "(or set ALFLOW_SKIP_BROWSER_TESTS=1 to skip this test)", pytrace=False)
    return chromium, sync_playwright


# -- processes --------------------------------------------------------------------------------
def note_screenshot(page, exc: BaseException, path: Path) -> None:
    """Attach a screenshot of ``page`` to the error that is failing a browser test."""
    try:
        page.screenshot(path=str(path), full_page=True)
        exc.add_note(f"screenshot of the page: {path}")
    except Exception:  # noqa: BLE001 - the browser may be gone
        pass


def api_call(method: str, url: str, **kwargs) -> httpx.Response:
    """One call to a test server's Prefect API, retried while it answers 503: a loaded
    server's SQLite database answers so while busy (Prefect's own client retries it too)."""
    for attempt in range(8):
        response = httpx.request(method, url, **kwargs)
        if response.status_code != 503:
            return response
        time.sleep(0.5 * (attempt + 1))
    return response


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Processes:
    """Background processes in their own process groups, each logging to a file; all are
    stopped (group and children) by :meth:`stop_all`, whatever happened."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.directory = directory
        self.env = env
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.directory / f"{name}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env or self.env, cwd=self.directory,
                                       start_new_session=True)
        self.started.append(process)
        return process, log

    @staticmethod
    def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may outlive its leader (uvicorn workers, children)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for process in reversed(self.started):  # flow runs first, the server last
            self.stop(process)


@contextmanager
def real_prefect_server(directory: Path):
    """A real `prefect server` on a free port with its own PREFECT_HOME under ``directory``,
    stopped on exit with every process started through the yielded :class:`Processes`.

    Yields (UI url, API url, the environment for clients of this server, processes).
    """
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALFLOW_"))}
    base.update(PREFECT_HOME=str(directory / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(REPO))
    # Without PREFECT_SERVER_UI_API_URL the UI of a server off port 4200 calls :4200.
    server_env = dict(base, PREFECT_SERVER_UI_API_URL=api_url, PREFECT_UI_API_URL=api_url)
    client_env = dict(base, PREFECT_API_URL=api_url)
    prefect_cli = Path(sys.executable).with_name("prefect")
    command = [str(prefect_cli)] if prefect_cli.exists() else [sys.executable, "-m", "prefect"]
    command += ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
    processes = Processes(directory, client_env)
    try:
        server, log = processes.start("prefect-server", command, env=server_env)
        wait_healthy(api_url, server, log)
        yield f"http://127.0.0.1:{port}", api_url, client_env, processes
    finally:
        processes.stop_all()


def alflow_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alflow.flows.cli", "run", "--config", str(config), "--no-progress", *extra]


def wait_healthy(api_url: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with code {server.returncode}:\n{tail(log)}", pytrace=False)
        try:
            if httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server did not answer on {api_url} within {timeout:.0f} s:\n{tail(log)}", pytrace=False)


def wait_paused_run(api_url: str, run: subprocess.Popen, log: Path, timeout: float = 120.0) -> str:
    """The id of the flow run of the cycle flow that is Paused (asking the API, not DuckDB)."""
    query = {"flows": {"name": {"any_": [FLOW_NAME]}},
             "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.poll() is not None:
            pytest.fail(f"`alflow run` exited with code {run.returncode} instead of pausing:\n{tail(log)}",
                        pytrace=False)
        try:
            response = api_call("POST", f"{api_url}/flow_runs/filter", json=query, timeout=5.0)
            response.raise_for_status()
            runs = response.json()
        except httpx.HTTPError:
            runs = []
        if runs:
            assert len(runs) == 1, f"expected one paused run, found {len(runs)}"
            return runs[0]["id"]
        time.sleep(0.5)
    pytest.fail(f"no run of {FLOW_NAME} paused within {timeout:.0f} s:\n{tail(log)}", pytrace=False)


def start_served_cycle(api_url: str, config: Path, served: subprocess.Popen, log: Path,
                       timeout: float = 120.0) -> str:
    """Once `alflow serve` has registered the cycle deployment of ``config``, start a run of
    it (as the UI's Run button does); returns the flow run id."""
    from alflow.config import load_config
    from alflow.flows.serve import project_name

    name = f"{FLOW_NAME}/{project_name(load_config(config, environ={}))}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.poll() is not None:
            pytest.fail(f"`alflow serve` exited with code {served.returncode}:\n{tail(log)}", pytrace=False)
        response = api_call("GET", f"{api_url}/deployments/name/{name}", timeout=5.0)
        if response.status_code == 200:
            created = api_call("POST", f"{api_url}/deployments/{response.json()['id']}/create_flow_run", json={},
                                 timeout=10.0)
            created.raise_for_status()
            return created.json()["id"]
        time.sleep(0.5)
    pytest.fail(f"`alflow serve` registered no deployment {name} within {timeout:.0f} s:\n{tail(log)}", pytrace=False)


def run_states(api_url: str, flow_run_id: str) -> list[str]:
    """The names of a flow run's states, oldest first."""
    response = api_call("GET", f"{api_url}/flow_run_states/", params={"flow_run_id": flow_run_id}, timeout=5.0)
    response.raise_for_status()
    return [s["name"] for s in sorted(response.json(), key=lambda s: s["timestamp"])]


def wait_suspended_batch(api_url: str, store: Store, flow_run_id: str, served: subprocess.Popen, log: Path,
                         timeout: float = 120.0) -> dict:
    """The batch of a served cycle run once the run is Suspended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.poll() is not None:
            pytest.fail(f"`alflow serve` exited with code {served.returncode}:\n{tail(log)}", pytrace=False)
        state = api_call("GET", f"{api_url}/flow_runs/{flow_run_id}", timeout=5.0).json()["state"]
        if state and state["name"] == "Suspended":
            batch = store.batch_for_run(flow_run_id)
            assert batch is not None and batch["status"] == "open", batch
            return batch
        if state and state["type"] in ("FAILED", "CRASHED", "COMPLETED", "CANCELLED"):
            pytest.fail(f"the served cycle ended {state['name']} instead of suspending:\n{tail(log, 40)}",
                        pytrace=False)
        time.sleep(0.5)
    pytest.fail(f"the served cycle did not suspend within {timeout:.0f} s:\n{tail(log, 40)}", pytrace=False)


def wait_run_final(api_url: str, flow_run_id: str, served: subprocess.Popen, log: Path,
                   timeout: float = 120.0) -> list[str]:
    """A flow run's state names once it has ended (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api_call("GET", f"{api_url}/flow_runs/{flow_run_id}", timeout=5.0).json()["state"]
        if state and state["type"] in ("FAILED", "CRASHED", "COMPLETED", "CANCELLED"):
            return run_states(api_url, flow_run_id)
        time.sleep(0.5)
    pytest.fail(f"flow run {flow_run_id} did not end within {timeout:.0f} s:\n{tail(log, 40)}", pytrace=False)


def wait_gone(owner: str, timeout: float = 30.0) -> bool:
    """True once the process ``owner`` (host:pid) has ended (bounded)."""
    deadline = time.monotonic() + timeout
    while not owner_gone(owner):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def wait_exit(process: subprocess.Popen, log: Path, timeout: float, what: str) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} still running after {timeout:.0f} s:\n{tail(log)}", pytrace=False)


def as_typed(text: str, limit: int) -> str:
    """What the UI must show for an item's text: exactly the text, whitespace runs as one
    space, trimmed to ``limit`` characters (as every UI surface trims it)."""
    return trim(text, limit)


def assert_no_injection(page, scope, where: str) -> None:
    images = scope.locator("img").count()
    assert images == 0, f"{where}: item text created {images} <img> elements"
    links = page.locator('a[href^="javascript"]').count()
    assert links == 0, f"{where}: item text created {links} javascript: links"


# -- the browser ------------------------------------------------------------------------------
def _shows(locator, timeout_ms: int) -> bool:
    try:
        locator.first.wait_for(state="visible", timeout=timeout_ms)
        return True
    except Exception:  # noqa: BLE001 - playwright's TimeoutError
        return False


def choose(page, select_button, value: str) -> None:
    """Pick ``value`` in one of the Resume form's selects. It is a `p-select` button: a mouse
    click only focuses it and Space opens its options in a pop-over."""
    options = page.locator(".p-pop-over-content [role=option]")
    for _ in range(3):
        select_button.click()
        if not _shows(options, 500):
            select_button.press("Space")
        if _shows(options, 5000):
            break
        page.keyboard.press("Escape")
    else:
        raise AssertionError(f"the select's options never opened (wanted {value!r})")
    offered = [text.strip() for text in options.all_inner_texts()]
    assert value in offered, f"{value!r} is not among the select's options {offered}"
    page.locator(".p-pop-over-content").get_by_role("option", name=value, exact=True).click()


# What the test's reviewer chooses for the blind control item (the form offers nothing).
BLIND_ANSWER = "ham"


def batch_prelabels_ok(batch) -> bool:
    """Every active pick shows a pre-label; the control slice (picked_by control) none."""
    control = batch["picked_by"] == "control"
    return bool(batch.loc[~control, "prelabel"].isin(CLASSES).all() and batch.loc[control, "prelabel"].isna().all())


def check_table_artifact(page, artifact_url: str, batch) -> None:
    """The batch's table artifact shows each item's text, trimmed as typed, in its cell."""
    from playwright.sync_api import expect

    page.goto(artifact_url, wait_until="domcontentloaded")
    table = page.locator("table").filter(has=page.locator("th", has_text="text")).first
    expect(table.locator("tbody tr")).to_have_count(len(batch))
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    column = headers.index("text")
    cells = [row.locator("td").nth(column).inner_text().strip() for row in table.locator("tbody tr").all()]
    assert cells == [as_typed(text, 160) for text in batch["text"]], cells
    assert_no_injection(page, table, "the table artifact")


def resume_in_browser(sync_playwright, chromium: str, run_url: str, batch, changed_rank: int,
                      new_label: str, shots: Path, artifact_url: str | None = None,
                      text_chars: int = 600, state_name: str = "Paused", heading: str = "") -> None:
    """Resume the paused run at ``run_url`` from its Resume form, checking what the form
    shows: ``heading`` (the batch and its size) above the fields; one field per item,
    titled '#N · ...', its text as typed, its pre-label preselected; a blind item left
    empty is refused on Submit with a message naming it '#N'; then item ``changed_rank``
    changed to ``new_label`` and submitted."""
    from playwright.sync_api import expect

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(30_000)
        alerts: list[str] = []
        page.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
        try:
            if artifact_url:
                check_table_artifact(page, artifact_url, batch)
                page.screenshot(path=str(shots / "table-artifact.png"), full_page=True)
            page.goto(run_url, wait_until="domcontentloaded")
            resume = page.get_by_role("button", name="Resume", exact=True).first
            try:
                resume.wait_for(state="visible", timeout=60_000)
            except Exception:
                if page.get_by_text("Can't connect to Server API").count():
                    raise AssertionError("the UI cannot reach the API (PREFECT_SERVER_UI_API_URL?)") from None
                raise
            expect(page.get_by_text(state_name, exact=True).first).to_be_visible()
            resume.click()

            dialog = page.get_by_role("dialog").filter(has_text="Resume Flow Run")
            expect(dialog).to_be_visible()
            expect(dialog).to_contain_text(heading)  # the form's description, above the fields
            expect(dialog).to_contain_text("pre-label is preselected")
            fields = dialog.locator(".schema-form-property")
            blind = []  # (rank, field, select) of the items shown with nothing preselected
            # one field per item, in rank order, then the annotator
            expect(fields).to_have_count(len(batch) + 1)
            for row in batch.itertuples(index=False):
                field = fields.filter(has=page.locator(".schema-form-property__label",
                                                       has_text=f"#{row.rank} · "))
                expect(field).to_have_count(1)
                # the title names rank, source and pre-label (plain text); the item text is
                # the description (Markdown): both show exactly what was typed
                expect(field.locator(".schema-form-property__label")).to_contain_text(item_heading(row))
                description = field.locator(".schema-form-property__description")
                expect(description).to_be_visible()
                shown = description.inner_text().strip()
                assert shown == as_typed(row.text, text_chars), f"#{row.rank} shows {shown!r}"
                assert_no_injection(page, description, f"the Resume form, item #{row.rank}")
                select = field.locator("button.p-select-button__control")
                if isinstance(row.prelabel, str):  # the pre-label is preselected
                    expect(select).to_have_text(row.prelabel)
                else:  # a control item is blind: nothing preselected, the reviewer must choose
                    assert row.picked_by == "control", row
                    for label in CLASSES:
                        expect(select).not_to_have_text(label)
                    blind.append((row.rank, field, select))
            # Submitting with a blind item unanswered is refused, naming it as the reviewer
            # numbers it (the field is '#N', not an internal name); then it is answered.
            assert blind, "the batch has no blind control item (query.control_share > 0 draws one)"
            dialog.get_by_role("button", name="Submit").click()
            for rank, field, select in blind:
                expect(field).to_contain_text(f"'#{rank}' is a required property")
            expect(dialog).not_to_contain_text("item_")
            for rank, field, select in blind:
                choose(page, select, BLIND_ANSWER)
                expect(select).to_have_text(BLIND_ANSWER)
            annotator = fields.filter(has=page.locator(".schema-form-property__label", has_text="Annotator"))
            expect(annotator).to_have_count(1)

            target = fields.filter(has=page.locator(".schema-form-property__label",
                                                    has_text=f"#{changed_rank} · "))
            select = target.locator("button.p-select-button__control")
            choose(page, select, new_label)
            expect(select).to_have_text(new_label)
            page.screenshot(path=str(shots / f"resume-form-{state_name.lower()}.png"), full_page=True)
            assert not alerts, f"item text ran script: {alerts}"

            for _ in range(3):  # a loaded test server may answer 503: the reviewer presses Submit again
                with page.expect_response(lambda r: r.request.method == "POST"
                                          and r.url.endswith("/resume")) as resumed:
                    dialog.get_by_role("button", name="Submit").click()
                response = resumed.value
                if response.status != 503:
                    break
                page.wait_for_timeout(2000)
            assert response.ok, f"the resume request failed: {response.status} {response.text()[:500]}"
            expect(dialog).to_be_hidden()
        except BaseException as exc:
            note_screenshot(page, exc, shots / "failure.png")
            raise
        finally:
            browser.close()


# -- multi-label (issue 25): the form's multi-selects ------------------------------------------
TAGS = ["business", "scitech", "sports", "world"]


def multilabel_project(directory: Path, n_rows: int = 60) -> Path:
    """A multi-label project (task = "multi_label", 4 tags) over ``n_rows`` of the bundled
    multi-label sample, its state under ``directory``; returns its config."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(REPO / "data" / "ag_news_multilabel.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:n_rows]
    source = directory / "tags.csv"
    with open(source, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    config = directory / "alflow.toml"
    config.write_text("\n".join([
        'task = "multi_label"', f"labels = {TAGS!r}".replace("'", '"'), 'database = "state/alflow.duckdb"',
        'models_dir = "state/models"', "seed = 7", "[model]", "self_training = 0", "[query]", 'strategy = "mean_margin"', f"batch_size = {BATCH_SIZE}",
        "[review]", "poll_interval_seconds = 1", "[evaluation]", 'method = "holdout"', "holdout_fraction = 0.2",
        'metric = "micro_f1"', "[[sources]]", 'type = "files"', 'name = "news"', f'path = "{source.as_posix()}"',
        'text_column = "text"', 'label_column = "labels"', ""]), encoding="utf-8")
    return config


def wait_paused_batch_run(api_url: str, store: Store, run: subprocess.Popen, log: Path,
                          timeout: float = 180.0) -> str:
    """The flow run id of ``store``'s batch once its run is Paused for review (other
    projects' runs may be paused or suspended on the same server meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.poll() is not None:
            pytest.fail(f"`alflow run` exited with code {run.returncode} instead of pausing:\n{tail(log)}",
                        pytrace=False)
        try:
            offered = store.query_df("SELECT flow_run_id FROM batches WHERE status = 'open' AND offered_at IS NOT NULL")
        except Exception:  # noqa: BLE001 - the database may not exist yet, or be locked a moment
            offered = None
        if offered is not None and len(offered):
            run_id = offered["flow_run_id"].iloc[0]
            state = api_call("GET", f"{api_url}/flow_runs/{run_id}", timeout=5.0).json()["state"]
            if state and state["name"] == "Paused":
                return run_id
        time.sleep(0.5)
    pytest.fail(f"the multi-label run did not pause within {timeout:.0f} s:\n{tail(log)}", pytrace=False)


def selected_tags(select) -> list[str]:
    """The tags a multi-select shows as chosen (its dismissible tags), sorted."""
    return sorted(t.strip() for t in select.locator(".p-tag").all_text_contents() if t.strip())


def toggle_tag(page, select, tag: str) -> None:
    """Toggle ``tag`` in a multi-select: open its options, click the tag, close them."""
    options = page.locator(".p-pop-over-content [role=option]")
    for _ in range(3):
        select.click()
        if not _shows(options, 500):
            select.press("Space")
        if _shows(options, 5000):
            break
        page.keyboard.press("Escape")
    else:
        raise AssertionError(f"the multi-select's options never opened (wanted {tag!r})")
    page.locator(".p-pop-over-content").get_by_role("option", name=tag, exact=True).click()
    page.keyboard.press("Escape")


def resume_multilabel_in_browser(sync_playwright, chromium: str, run_url: str, batch, toggled_rank: int,
                                 tag: str, shots: Path) -> None:
    """Resume a paused multi-label run from its Resume form, checking one multi-select per
    item with the offered pre-label's tags chosen (nothing for the blind control item) and
    the model's per-tag probabilities above an offered one only; toggle ``tag`` on item
    ``toggled_rank``, accept everything else as shown, Submit."""
    from playwright.sync_api import expect

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(30_000)
        try:
            page.goto(run_url, wait_until="domcontentloaded")
            resume = page.get_by_role("button", name="Resume", exact=True).first
            resume.wait_for(state="visible", timeout=60_000)
            resume.click()
            dialog = page.get_by_role("dialog").filter(has_text="Resume Flow Run")
            expect(dialog).to_be_visible()
            expect(dialog).to_contain_text("Choose every tag that applies")
            fields = dialog.locator(".schema-form-property")
            expect(fields).to_have_count(len(batch) + 1)
            blind = 0
            for row in batch.itertuples(index=False):
                field = fields.filter(has=page.locator(".schema-form-property__label", has_text=f"#{row.rank} · "))
                expect(field).to_have_count(1)
                select = field.locator("button.p-select-button__control")
                offered = shown_prelabel(row)
                description = field.locator(".schema-form-property__description")
                if offered is None:
                    blind += row.picked_by == "control"
                    expect(select).to_contain_text("No items selected")
                    expect(description).not_to_contain_text("Model:")
                else:
                    expect(description).to_contain_text("Model: business ")
                    assert selected_tags(select) == sorted(parse_tags(offered)), f"#{row.rank}: {offered!r}"
            assert blind, "the batch has no blind control item"
            target = fields.filter(has=page.locator(".schema-form-property__label", has_text=f"#{toggled_rank} · "))
            select = target.locator("button.p-select-button__control")
            before = set(selected_tags(select))
            toggle_tag(page, select, tag)
            expect(select.locator(".p-tag")).to_have_count(len(before ^ {tag}))
            assert set(selected_tags(select)) == before ^ {tag}
            page.screenshot(path=str(shots / "resume-form-multilabel.png"), full_page=True)
            for _ in range(3):  # a loaded test server may answer 503: the reviewer presses Submit again
                with page.expect_response(lambda r: r.request.method == "POST"
                                          and r.url.endswith("/resume")) as resumed:
                    dialog.get_by_role("button", name="Submit").click()
                response = resumed.value
                if response.status != 503:
                    break
                page.wait_for_timeout(2000)
            assert response.ok, f"the resume request failed: {response.status} {response.text()[:500]}"
            expect(dialog).to_be_hidden()
        except BaseException as exc:
            note_screenshot(page, exc, shots / "failure-multilabel.png")
            raise
        finally:
            browser.close()


# -- the test ---------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_resume_in_the_prefect_ui_records_the_changed_label(tmp_path: Path):
    chromium, sync_playwright = require_browser()

    lines = SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:401]
    corpus = tmp_path / "sms_400.csv"
    corpus.write_text("".join(lines), encoding="utf-8")
    assert {"ham", "spam"} <= {line.rsplit(",", 1)[-1].strip() for line in lines[1:]}
    assert len(NASTY_TEXTS) == BATCH_SIZE
    config = write_config(tmp_path, labels=CLASSES, source_path=corpus, batch_size=BATCH_SIZE)
    store = Store(tmp_path / "state" / "alflow.duckdb", lock_timeout=60)

    with real_prefect_server(tmp_path) as (ui_url, api_url, client_env, processes):
        # Cycle 1, simulated answers for the whole pool (both classes): model v1.
        first, first_log = processes.start("run-auto", alflow_command(config, "--auto"),
                                           env=dict(client_env, ALFLOW_QUERY__BATCH_SIZE="500"))
        code = wait_exit(first, first_log, 180, "`alflow run --auto`")
        assert code == 0, f"`alflow run --auto` exited with {code}:\n{tail(first_log)}"
        assert "model v1" in first_log.read_text(errors="replace"), tail(first_log)
        assert store.counts(0.2)["pool"] == 0

        # New messages full of markup (no gold label, so none is held out) are the pool now.
        with open(corpus, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([text, ""] for text in NASTY_TEXTS)

        # Cycle 2 ingests them and pauses for review with model v1's pre-labels as defaults.
        second, second_log = processes.start("run-review", alflow_command(config))
        run_id = wait_paused_run(api_url, second, second_log)
        batch_row = store.batch_for_run(run_id)
        assert batch_row is not None and batch_row["status"] == "open", batch_row
        batch_id = batch_row["batch_id"]
        batch = store.batch_items(batch_id)
        assert len(batch) == BATCH_SIZE and batch_prelabels_ok(batch), batch
        assert sorted(batch["text"]) == sorted(" ".join(t.split()) for t in NASTY_TEXTS)  # as ingested
        assert batch["answer"].isna().all()
        changed = batch.iloc[0]
        assert changed["rank"] == 1
        new_label = next(c for c in CLASSES if c != changed["prelabel"])

        artifacts = api_call("POST", f"{api_url}/artifacts/filter", timeout=10.0, json={
            "artifacts": {"key": {"any_": ["review-batch"]}, "flow_run_id": {"any_": [run_id]}}}).json()
        assert len(artifacts) == 1, artifacts
        resume_in_browser(sync_playwright, chromium, f"{ui_url}/runs/flow-run/{run_id}",
                          batch, int(changed["rank"]), new_label, tmp_path,
                          artifact_url=f"{ui_url}/artifacts/artifact/{artifacts[0]['id']}",
                          heading=f"Batch {batch_id}: {BATCH_SIZE} items.")

        code = wait_exit(second, second_log, 120, "`alflow run`, resumed,")
        assert code == 0, f"`alflow run` exited with {code} after the resume:\n{tail(second_log)}"
        # the batch's table artifact, updated in place, now says the batch is labeled
        finished = api_call("GET", f"{api_url}/artifacts/{artifacts[0]['id']}", timeout=10.0).json()
        assert finished["description"].startswith(f"Batch {batch_id}: {BATCH_SIZE} items, labeled: "
                                                  f"{BATCH_SIZE} answers, "), finished["description"]
        assert finished["description"].endswith("(from the Resume form)."), finished["description"]

        # Meanwhile a multi-label project (issue 25) trains model v1 from gold tag sets and
        # pauses its cycle 2 for review (in the background, while cycle 3 runs).
        ml_config = multilabel_project(tmp_path / "multi-label")
        ml_chain = (f"ALFLOW_QUERY__BATCH_SIZE=35 {shlex.join(alflow_command(ml_config, '--auto'))} && "
                    f"{shlex.join(alflow_command(ml_config))}")
        ml_run, ml_log = processes.start("run-multilabel", ["sh", "-c", ml_chain])

        # Cycle 3 is a deployed run of `alflow serve`: it suspends (no process waits) and
        # the Resume form's submission replays it from the top.
        with open(corpus, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([text, ""] for text in PLAIN_TEXTS)
        served, served_log = processes.start("serve", [sys.executable, "-m", "alflow.flows.cli", "serve", "--config",
                                                       str(config)], env=dict(client_env, PREFECT_RUNNER_POLL_FREQUENCY="1"))
        suspended_id = start_served_cycle(api_url, config, served, served_log)
        suspended_batch = wait_suspended_batch(api_url, store, suspended_id, served, served_log)
        assert wait_gone(suspended_batch["owner"]), f"the suspended run's process {suspended_batch['owner']} still runs"
        # The multi-label run's form (its run retrains while cycle 3 goes on): accept every
        # preselected set, add one tag to one item.
        ml_store = Store(ml_config.parent / "state" / "alflow.duckdb", lock_timeout=60)
        ml_run_id = wait_paused_batch_run(api_url, ml_store, ml_run, ml_log)
        ml_batch_id = ml_store.batch_for_run(ml_run_id)["batch_id"]
        ml_batch = ml_store.batch_items(ml_batch_id)
        ml_first = next(r for r in ml_batch.itertuples(index=False) if shown_prelabel(r) is not None)
        added = next(t for t in TAGS if t not in parse_tags(ml_first.prelabel))
        resume_multilabel_in_browser(sync_playwright, chromium, f"{ui_url}/runs/flow-run/{ml_run_id}", ml_batch,
                                     int(ml_first.rank), added, tmp_path)

        batch3 = store.batch_items(suspended_batch["batch_id"])
        assert len(batch3) == BATCH_SIZE and batch_prelabels_ok(batch3), batch3
        changed3 = batch3.iloc[0]
        new_label3 = next(c for c in CLASSES if c != changed3["prelabel"])
        resume_in_browser(sync_playwright, chromium, f"{ui_url}/runs/flow-run/{suspended_id}",
                          batch3, 1, new_label3, tmp_path, state_name="Suspended",
                          heading=f"Batch {suspended_batch['batch_id']}: {BATCH_SIZE} items.")
        states = wait_run_final(api_url, suspended_id, served, served_log)

    ml_labels = ml_store.query_df("SELECT item_id, label, origin FROM labels WHERE batch_id = ?", [ml_batch_id])
    assert set(ml_labels["origin"]) == {"ui"} and ml_labels["item_id"].is_unique, ml_labels
    # every preselected set exactly as shown ("" for nothing selected: none apply), one with the tag added
    expected = {r.item_id: shown_prelabel(r) or "" for r in ml_batch.itertuples(index=False)}
    expected[ml_first.item_id] = format_tags(parse_tags(ml_first.prelabel) | {added})
    assert dict(zip(ml_labels["item_id"], ml_labels["label"])) == expected

    assert states[-1] == "Completed", f"the resumed run ended {states[-1]}:\n{tail(served_log, 40)}"
    assert "Suspended" in states and "Resuming" in states, states  # it was rescheduled and replayed
    labels3 = store.query_df("SELECT * FROM labels WHERE batch_id = ? ORDER BY label_id",
                             [suspended_batch["batch_id"]])
    assert len(labels3) == BATCH_SIZE and labels3["item_id"].is_unique, labels3  # once, despite the replay
    assert set(labels3["origin"]) == {"ui"} and set(labels3["flow_run_id"]) == {suspended_id}
    got3 = dict(zip(labels3["item_id"], labels3["label"]))
    offered3 = {i: p if isinstance(p, str) else BLIND_ANSWER for i, p in zip(batch3["item_id"], batch3["prelabel"])}
    assert got3 == {**offered3, changed3["item_id"]: new_label3}
    assert store.batch(suspended_batch["batch_id"])["status"] == "labeled"
    assert (store.cycles()["flow_run_id"] == suspended_id).sum() == 1

    labels = store.query_df("SELECT * FROM labels WHERE batch_id = ? ORDER BY label_id", [batch_id])
    assert len(labels) == BATCH_SIZE, labels
    assert set(labels["origin"]) == {"ui"}
    assert set(labels["annotator"]) == {"annotator"}
    assert set(labels["flow_run_id"]) == {run_id}
    assert labels["item_id"].is_unique
    got = dict(zip(labels["item_id"], labels["label"]))
    assert got[changed["item_id"]] == new_label
    for row in batch.iloc[1:].itertuples(index=False):
        expected = row.prelabel if isinstance(row.prelabel, str) else BLIND_ANSWER  # control: the choice made
        assert got[row.item_id] == expected, f"item #{row.rank} should keep its pre-label"
    shown = {i: v if isinstance(v, str) else None for i, v in zip(labels["item_id"], labels["prelabel_shown"])}
    assert shown == {i: v if isinstance(v, str) else None for i, v in zip(batch["item_id"], batch["prelabel"])}
    assert store.batch(batch_id)["status"] == "labeled"
    cycles = store.cycles()
    assert (cycles["flow_run_id"] == run_id).sum() == 1, cycles
