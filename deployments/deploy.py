"""The deployments: ``nightly-screening`` on the cpu pool, ``retrain`` and ``synthesize`` on the gpu pool;
and the automation that answers a screening run's drift alarm (the event ``cxr.screening.drift``)
with a notification through the site's notification block and, with ``CXR_PAUSE_ON_DRIFT=true``,
a paused nightly deployment, until a person resumes it.

A deploy script rather than prefect.yaml: parameters come typed from ``Settings`` (prefect.yaml
templating would hand the server strings for the integer parameters), and the schedule, the
concurrency limit and the retrain trigger sit beside them in one readable place.
"""

from __future__ import annotations

import json
from uuid import UUID

from prefect import flow
from prefect.automations import Automation
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger, EventTrigger
from prefect.events.actions import PauseDeployment, SendNotification
from prefect.schedules import Cron

from deployments.settings import Settings
from tasks.screen_steps import DRIFT_EVENT

DATASET_UPDATED = "cxr.dataset.updated"
DATASET_URI_LABEL = "cxr.dataset.uri"  # the resource label of the event that carries the dataset's URI
SCREENING, RETRAIN, SYNTHESIZE = "screen/nightly-screening", "train/retrain", "synthesize/synthesize"
DRIFT_AUTOMATION = "cxr-screening-drift"
_DRIFT_SUBJECT = "Drift alarm: screening run {{ event.payload.run_id }}"
_DRIFT_BODY = """Screening run {{ event.payload.run_id }} (model {{ event.payload.model_version }}) does not look like \
{{ "the site's last accepted nights" if event.payload.reference == "site nights" else "the model's test split" }}: \
drift score {{ event.payload.score }}; failing tests: {{ event.payload.failing | join(", ") }}.
Report: {{ event.payload.report }}
Once the change is understood and here to stay: cxr-screen drift accept {{ event.payload.run_id }}"""
_PAUSED = """
The nightly-screening deployment is paused until a person resumes it: cxr-screen drift resume (or its toggle in the UI)."""


def deploy_all(settings: Settings) -> dict[str, UUID]:
    """Every deployment, and the drift automation where asked for; a notification block that cannot
    be used is refused (ValueError) before anything is deployed."""
    notify = notification_block(settings.drift_notify_block) if settings.drift_notify_block else None
    common = dict(build=False, push=False, print_next_steps=False, ignore_warnings=True)
    screening = flow.from_source(settings.project_dir, "cli.flow_runs.screen").deploy(
        name="nightly-screening",
        work_pool_name=settings.cpu_pool,
        description="Screen the X-rays that arrived since the last run with the production model.",
        parameters={"params": settings.screen_parameters().model_dump(mode="json")},
        schedules=[Cron(settings.nightly_cron, timezone=settings.timezone)],
        # One run at a time: a run due while another is still going is cancelled, not queued.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        tags=["screening"],
        **common,
    )
    train_parameters = settings.train_parameters().model_dump(mode="json")
    retrain = flow.from_source(settings.project_dir, "cli.flow_runs.train").deploy(
        name="retrain",
        work_pool_name=settings.gpu_pool,
        description="Retrain on the current labelled dataset; promote the model if it beats production.",
        parameters={"params": train_parameters},
        # The event names the dataset that changed: train on that one (the setting when it names none).
        triggers=[DeploymentEventTrigger(
            name="retrain-when-dataset-updated", expect={DATASET_UPDATED}, match={"prefect.resource.id": "cxr.dataset.*"},
            parameters={"params": {**train_parameters, "dataset_uri": _from_event(DATASET_URI_LABEL, settings.dataset)}})],
        # One training at a time: a second event waits for the first run instead of racing it to production.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["training"],
        **common,
    )
    # Run by hand (no schedule, no trigger): a GAN is trained once and its images checked by a person
    # before any training uses them (train --synthetic).
    synthesize = flow.from_source(settings.project_dir, "cli.flow_runs.synthesize").deploy(
        name="synthesize",
        work_pool_name=settings.gpu_pool,
        description="Train a GAN on the training split of the dataset; publish synthetic images of one class and the "
                    "generator, unless its images copy patients' images.",
        parameters={"params": settings.synthesize_parameters().model_dump(mode="json")},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["training", "synthesis"],
        **common,
    )
    deployed = {SCREENING: screening, RETRAIN: retrain, SYNTHESIZE: synthesize}
    automation = drift_automation(settings, screening, notify)
    if automation is not None:
        deployed[DRIFT_AUTOMATION] = automation
    return deployed


def notification_block(name: str) -> UUID:
    """The id of the notification block ``name`` ("block-type/name", e.g. ``custom-webhook/cxr-drift``);
    ValueError names one that does not exist or is not a notification block."""
    if name.count("/") != 1:
        raise ValueError(f"CXR_DRIFT_NOTIFY_BLOCK {name!r}: give the block as block-type/name, "
                         "e.g. custom-webhook/cxr-drift")
    try:
        block = Block.load(name)
    except Exception as error:  # noqa: BLE001 - ValueError (no such block), or a block type not installed here
        raise ValueError(f"CXR_DRIFT_NOTIFY_BLOCK {name!r}: cannot be loaded from this Prefect server ({error}); "
                         "create it first (README, 'Drift alarms')") from None
    if not isinstance(block, NotificationBlock):
        raise ValueError(f"CXR_DRIFT_NOTIFY_BLOCK {name!r} is a {type(block).__name__}, not a notification block")
    return block._block_document_id


def drift_automation(settings: Settings, screening: UUID, notify: UUID | None) -> UUID | None:
    """The automation answering ``cxr.screening.drift`` (replacing one deployed before): a message
    through the notification block ``notify`` (``notification_block``) and, with
    ``settings.pause_on_drift``, the nightly deployment paused. None (and no automation) when
    neither is asked for: the alarm is then in the run's log, report, summary and Prefect event only."""
    actions: list = []
    if notify is not None:
        body = _DRIFT_BODY + (_PAUSED if settings.pause_on_drift else "")
        actions.append(SendNotification(block_document_id=notify, subject=_DRIFT_SUBJECT, body=body))
    if settings.pause_on_drift:
        actions.append(PauseDeployment(source="selected", deployment_id=screening))
    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(DRIFT_AUTOMATION):
            client.delete_automation(existing.id)
    if not actions:
        return None
    automation = Automation(
        name=DRIFT_AUTOMATION,
        description="A screening run's inputs do not look like the reference (screening/drift.py): tell the site "
                    + ("and pause nightly screening" if settings.pause_on_drift else ""),
        trigger=EventTrigger(expect={DRIFT_EVENT}, match={"prefect.resource.id": "cxr.screening.run.*"},
                             posture="Reactive", threshold=1, within=0),
        actions=actions,
    ).create()
    return automation.id


def _from_event(label: str, default: str) -> str:
    """A Prefect template that the automation renders from the triggering event: the event
    resource's ``label``, or ``default`` when the event has none."""
    return "{{ (event.resource.get(%s) or %s) }}" % (json.dumps(label), json.dumps(default))
