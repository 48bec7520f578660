"""`alflow serve`: the cycle and ingest flows as two deployments of one long-running process.

    alflow serve  ->  Prefect server (found or started)
                  ->  deployments active-learning-cycle/<project> and ingest/<project>,
                      cron schedules from [schedules] (none for "")
                  ->  runs each scheduled (or UI-started, or resumed) run in a subprocess

``<project>`` is the config file's folder name, so two projects served on one Prefect server
get two pairs of deployments. A cycle that stops for review *suspends*: its subprocess exits
and nothing is held while the batch waits; resuming it (UI, `alflow resume`, `alflow label`)
reschedules it and this process replays it. On Ctrl-C or SIGTERM the runner stops and pauses
the schedules (the UI shows them paused until `alflow serve` runs again).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from alflow.config import CONFIG_FILENAME, Settings

CYCLE_FLOW = "active-learning-cycle"
INGEST_FLOW = "ingest"


@dataclass(frozen=True)
class Served:
    """One deployment as `alflow serve` registered it."""

    flow: str
    name: str
    cron: str | None
    timezone: str
    next_run: datetime | None
    url: str | None

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"

    def line(self) -> str:
        when = (f'cron "{self.cron}" ({self.timezone}), next run {self.next_run:%Y-%m-%d %H:%M %Z}'
                if self.cron else "no schedule (start runs from the UI)")
        return f"{self.full_name}: {when}" + (f"\n    {self.url}" if self.url else "")


def project_name(settings: Settings) -> str:
    """The deployments' name: the config file's folder name, e.g. 'sms-filter'."""
    name = re.sub(r"[^\w.-]+", "-", Path(settings.config_path).parent.name).strip("-")
    return name or "alflow"


def next_run(cron: str, timezone: str) -> datetime:
    """The next time ``cron`` fires in ``timezone``, computed as the Prefect server will."""
    from prefect.server.schemas.schedules import CronSchedule

    return asyncio.run(CronSchedule(cron=cron, timezone=timezone).get_dates(n=1))[0]


def build_deployments(settings: Settings) -> list:
    """The two RunnerDeployments (cycle, ingest) of this config, with its schedules.

    Entrypoints are module paths (``alflow.flows.cycle.active_learning_cycle``): the
    runner's subprocesses import the installed package from any working directory.
    """
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from alflow.flows.cycle import active_learning_cycle
    from alflow.flows.ingest import ingest

    schedules = settings.schedules
    parameters = {"config_path": str(settings.config_path)}
    name = project_name(settings)
    made = []
    for flow, cron, description in (
        (active_learning_cycle, schedules.cycle,
         "Ingest, pre-label, query a batch, suspend for review, retrain (alflow serve)."),
        (ingest, schedules.ingest, "Fetch every source into the store (alflow serve)."),
    ):
        made.append(flow.to_deployment(
            name=name, schedules=[Cron(cron, timezone=schedules.timezone)] if cron else [],
            paused=False, parameters=parameters, description=description, tags=["alflow"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return made


def register(deployments: list, settings: Settings, ui_url: str | None) -> list[Served]:
    """Create or update the deployments on the Prefect API; what each one is."""
    served = []
    for deployment, cron in zip(deployments, (settings.schedules.cycle, settings.schedules.ingest)):
        deployment_id = deployment.apply()
        served.append(Served(
            flow=deployment.flow_name, name=deployment.name, cron=cron or None,
            timezone=settings.schedules.timezone,
            next_run=next_run(cron, settings.schedules.timezone) if cron else None,
            url=f"{ui_url.rstrip('/')}/deployments/deployment/{deployment_id}" if ui_url else None,
        ))
    return served


def serve_deployments(deployments: list) -> None:
    """Run the deployments' scheduled runs until Ctrl-C or SIGTERM; then their schedules
    are paused (nothing would run them)."""
    import signal
    import threading

    from prefect import serve

    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops it even when it was started with SIGINT ignored (a background job
        # of a script inherits that, and Python then raises no KeyboardInterrupt).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    serve(*deployments, pause_on_shutdown=True, print_starting_message=False)


def deployment_config(deployment) -> Path | None:
    """The config file a deployment's runs load: its ``config_path`` parameter (default
    alflow.toml), a relative one taken from the working directory its pull step sets
    (deployments/prefect.yaml: the repository, resolved at deploy time) or its ``path``;
    None when that directory is unknown."""
    path = Path((deployment.parameters or {}).get("config_path") or CONFIG_FILENAME).expanduser()
    if path.is_absolute():
        return path.resolve()
    base = deployment.path
    for step in deployment.pull_steps or []:
        directory = (step.get("prefect.deployments.steps.set_working_directory") or {}).get("directory")
        if directory:
            base = directory
    if not base or "{{" in str(base) or not Path(base).is_absolute():
        return None
    return (Path(base) / path).resolve()


def served_schedules(settings: Settings, ui_url: str | None) -> list[dict]:
    """The deployments of the cycle and ingest flows on the current Prefect API that run
    this config (:func:`deployment_config`), with their schedules and next runs.

    Each: ``{deployment, schedule, timezone, active, next_run, url}``; a deployment without
    a schedule has ``schedule`` None.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    config = Path(settings.config_path).resolve()
    rows = []
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[CYCLE_FLOW, INGEST_FLOW])))}
        if not flows:
            return rows
        for deployment in client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[CYCLE_FLOW, INGEST_FLOW]))):
            if deployment_config(deployment) != config:
                continue
            upcoming = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1,
            )
            when = upcoming[0].expected_start_time if upcoming else None
            described = [(_describe(s.schedule), getattr(s.schedule, "timezone", None), s.active)
                         for s in deployment.schedules] or [(None, None, False)]
            for schedule, timezone, active in described:
                rows.append({
                    "deployment": f"{flows.get(deployment.flow_id, '?')}/{deployment.name}",
                    "schedule": schedule, "timezone": timezone,
                    "active": bool(active and not deployment.paused and schedule),
                    "next_run": when.isoformat() if when and active and not deployment.paused else None,
                    "url": f"{ui_url.rstrip('/')}/deployments/deployment/{deployment.id}" if ui_url else None,
                })
    return sorted(rows, key=lambda r: r["deployment"])


def _describe(schedule) -> str:
    """A schedule as its cron string, 'every N s' or its rrule."""
    if getattr(schedule, "cron", None):
        return schedule.cron
    if getattr(schedule, "interval", None):
        return f"every {schedule.interval.total_seconds():g} s"
    return str(getattr(schedule, "rrule", schedule))
