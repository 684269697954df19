"""Start a deployment run through the API, follow it, and emit the dataset-updated event."""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.deployments import run_deployment
from prefect.events import emit_event

from deployments.deploy import DATASET_UPDATED, DATASET_URI_LABEL


def start_run(deployment: str, overrides: dict | None = None) -> FlowRun:
    """Create a run of ``deployment`` ('flow/deployment') and return at once.

    ``overrides`` change single fields of the flow's parameters model. The server would replace
    the deployment's whole ``params`` with a partial one, so they are merged here.
    """
    if not overrides:
        return run_deployment(deployment, timeout=0)
    with get_client(sync_client=True) as client:
        stored = client.read_deployment_by_name(deployment).parameters
    if "params" not in stored:
        raise RuntimeError(f"{deployment} was deployed by an older version (flat parameters): "
                           "run 'cxr-screen deploy' again")
    return run_deployment(deployment, parameters={"params": {**stored["params"], **overrides}}, timeout=0)


def follow_run(flow_run_id: UUID, echo: Callable[[str], None] = print, poll_seconds: float = 3.0,
               timeout: float | None = None) -> State:
    """Print each state change until the run reaches a final state; returns that state."""
    started, last = time.monotonic(), None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.name != last:
                last = run.state.name
                echo(f"{run.name}: {last}" + (f" ({run.state.message})" if run.state.message else ""))
            if run.state is not None and run.state.is_final():
                return run.state
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"flow run {flow_run_id} still {last} after {timeout:.0f} s")
            time.sleep(poll_seconds)


def emit_dataset_updated(dataset_uri: str) -> None:
    """The event the retrain deployment's trigger waits for; sent before returning."""
    from prefect.events.worker import EventsWorker

    name = dataset_uri.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    emit_event(event=DATASET_UPDATED, resource={"prefect.resource.id": f"cxr.dataset.{name}",
                                                DATASET_URI_LABEL: dataset_uri})
    EventsWorker.drain_all()
