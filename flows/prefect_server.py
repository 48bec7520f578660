"""Make sure a Prefect API with a UI is reachable before a run that pauses for review.

A paused run is resumed from the Prefect UI, so it needs a server that outlives the run:
Prefect's ephemeral mode (no PREFECT_API_URL) dies with the process. If the configured API
(or, with none configured, http://127.0.0.1:4200/api) answers, it is used; otherwise
`prefect server start` is launched on 127.0.0.1 in the background, its log in the state
folder, and awaited. The server it launches sends no telemetry (``NO_TELEMETRY``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

DEFAULT_PORT = 4200
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

# Prefect calls home unless told not to: the server posts a telemetry heartbeat on start and
# every 10 minutes and lets the UI send analytics (PREFECT_SERVER_ANALYTICS_ENABLED); the UI
# shows upgrade prompts and banners (PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT); the SDK
# sends usage events from every process that imports it (DO_NOT_TRACK, read on import).
# A user who sets one of them keeps their value.
NO_TELEMETRY = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "DO_NOT_TRACK": "1",
}


class ServerError(RuntimeError):
    """No Prefect API could be reached or started; the message says what to do."""


@dataclass(frozen=True)
class ServerInfo:
    api_url: str
    ui_url: str
    started: bool  # True when this call launched it
    log_path: Path | None = None


def without_telemetry(env: dict[str, str]) -> dict[str, str]:
    """``env`` with Prefect's outbound telemetry off, except where it sets those variables itself."""
    return {**NO_TELEMETRY, **env}


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def configured_api_url() -> str | None:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url).rstrip("/") if url else None


def ui_url_for(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "prefect-server.pid"


def start_server(state_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 wait_seconds: float = 240.0, echo=print) -> ServerInfo:
    """Launch `prefect server start` detached, log to ``state_dir``, wait for /api/health."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "prefect-server.log"
    api_url = f"http://{host}:{port}/api"
    env = without_telemetry(dict(os.environ))
    env.pop("PREFECT_API_URL", None)  # the server must not try to reach itself as a client
    # The UI asks this address for the API; without it the UI calls :4200.
    env.setdefault("PREFECT_SERVER_UI_API_URL", api_url)
    env.setdefault("PREFECT_UI_API_URL", api_url)
    prefect_cli = Path(sys.executable).with_name("prefect")
    command = [str(prefect_cli)] if prefect_cli.exists() else [sys.executable, "-m", "prefect"]
    command += ["server", "start", "--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    _pid_file(state_dir).write_text(str(process.pid))
    echo(f"Starting a Prefect server on {ui_url_for(api_url)} (log: {log_path}); "
         "its first start migrates a database and can take a minute.")
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ServerError(f"prefect server exited with code {process.returncode}; log {log_path}: "
                              + " | ".join(tail))
        if healthy(api_url):
            return ServerInfo(api_url, ui_url_for(api_url), True, log_path)
        time.sleep(1.0)
    raise ServerError(f"prefect server did not answer on {api_url} within {wait_seconds:.0f} s; see {log_path}")


def ensure_server(state_dir: Path, echo=print) -> ServerInfo:
    """A reachable Prefect API: the configured one, a local one already up, or a new one."""
    api_url = configured_api_url()
    if api_url:
        if healthy(api_url):
            return ServerInfo(api_url, ui_url_for(api_url), False)
        parsed = urlparse(api_url)
        if parsed.hostname not in LOCAL_HOSTS:
            raise ServerError(f"PREFECT_API_URL={api_url} does not answer; start that server or unset it")
        return start_server(state_dir, parsed.hostname, parsed.port or DEFAULT_PORT, echo=echo)
    local = f"http://127.0.0.1:{DEFAULT_PORT}/api"
    if healthy(local):
        return ServerInfo(local, ui_url_for(local), False)
    return start_server(state_dir, echo=echo)


def stop_server(state_dir: Path) -> int | None:
    """Stop a server that `alflow` started (by its pid file); returns the pid or None."""
    pid_file = _pid_file(state_dir)
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().strip())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid = None
    pid_file.unlink(missing_ok=True)
    return pid
