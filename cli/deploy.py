"""Create the work pools (and, for a local S3 endpoint, the buckets) and deploy, against the
Prefect API in the environment: ``python -m cli.deploy [--buckets]``."""

from __future__ import annotations

import sys

from cli import bootstrap

bootstrap()

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.exceptions import ObjectNotFound  # noqa: E402

from deployments.deploy import deploy_all  # noqa: E402
from deployments.settings import Settings  # noqa: E402
from store import s3  # noqa: E402


def ensure_work_pools(settings: Settings) -> None:
    with get_client(sync_client=True) as client:
        for name in (settings.cpu_pool, settings.gpu_pool):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def ensure_buckets(settings: Settings) -> None:
    import boto3

    client = boto3.client("s3")
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for uri in (settings.incoming, settings.results, settings.model_store, settings.dataset):
        bucket = s3.bucket_of(uri)
        if bucket is not None and bucket not in existing:
            client.create_bucket(Bucket=bucket)
            existing.add(bucket)


def main() -> None:
    settings = Settings()
    if "--buckets" in sys.argv:
        ensure_buckets(settings)
    ensure_work_pools(settings)
    for name, deployment_id in deploy_all(settings).items():
        print(f"deployed {name} ({deployment_id})")


if __name__ == "__main__":
    main()
