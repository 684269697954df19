"""The deployments: ``nightly-screening`` on the cpu pool, ``retrain`` and ``synthesize`` on the gpu pool.

A deploy script rather than prefect.yaml: parameters come typed from ``Settings`` (prefect.yaml
templating would hand the server strings for the integer parameters), and the schedule, the
concurrency limit and the retrain trigger sit beside them in one readable place.
"""

from __future__ import annotations

import json
from uuid import UUID

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from deployments.settings import Settings

DATASET_UPDATED = "cxr.dataset.updated"
DATASET_URI_LABEL = "cxr.dataset.uri"  # the resource label of the event that carries the dataset's URI
SCREENING, RETRAIN, SYNTHESIZE = "screen/nightly-screening", "train/retrain", "synthesize/synthesize"


def deploy_all(settings: Settings) -> dict[str, UUID]:
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
    return {SCREENING: screening, RETRAIN: retrain, SYNTHESIZE: synthesize}


def _from_event(label: str, default: str) -> str:
    """A Prefect template that the automation renders from the triggering event: the event
    resource's ``label``, or ``default`` when the event has none."""
    return "{{ (event.resource.get(%s) or %s) }}" % (json.dumps(label), json.dumps(default))
