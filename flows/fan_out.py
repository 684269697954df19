"""Where a screening run's chunks run: in this process, on a local Dask cluster, or on an existing one.

Chunks are pure functions of URIs (tasks/screen_chunks.py), so any Prefect task runner can take them;
each worker process loads the model once from the model store, never from the wire. Every task
reports to the flow's Prefect API, so the UI shows one run graph wherever its chunks ran.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from store import storage

__all__ = ["FanOutError", "chunk_runner", "local_worker_environment"]


class FanOutError(ValueError):
    """The chunks cannot run where they were asked to (deterministic: never retried)."""


def local_worker_environment(workers: int, cores: int | None = None) -> dict[str, str]:
    """Thread pools of one local worker process, so that ``workers`` of them share the cores.

    TensorFlow would otherwise give every process a pool as large as the machine, and N
    processes would fight over the cores; Dask's own default (one thread) would leave them idle.
    OpenVINO follows TensorFlow's figure (model/inference.py).
    """
    cores = cores or len(os.sched_getaffinity(0))
    threads = str(max(1, cores // workers))
    return {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "2", "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


@contextlib.contextmanager
def chunk_runner(workers: int | None = None, dask_address: str | None = None,
                 storage_uris: Sequence[str] = ()) -> Iterator[TaskRunner]:
    """The task runner for the chunks, entered; ``storage_uris`` are the locations every worker
    reads or writes (model store, results, incoming), checked for reach before anything starts.

    Unset: one chunk at a time in this process, as TensorFlow already uses every core here.
    """
    if workers is None and dask_address is None:
        with ThreadPoolTaskRunner(max_workers=1) as runner:
            yield runner
        return
    from prefect_dask import DaskTaskRunner

    api_url = get_current_settings().api.url
    if dask_address is not None and not _loopback(dask_address):
        local = [uri for uri in storage_uris if not storage.capabilities(uri).shared]
        if local:
            raise FanOutError(f"{local[0]} is a folder on this machine, which the workers of the Dask cluster at "
                              f"{dask_address} cannot reach: use s3:// locations with a remote cluster")
        if not api_url or _loopback(api_url):
            raise FanOutError(f"the workers of the Dask cluster at {dask_address} must report to a Prefect server "
                              f"they can reach: set PREFECT_API_URL (now {api_url or 'unset: a temporary server'})")
    if dask_address is not None:
        runner = DaskTaskRunner(address=dask_address, client_kwargs=_client_security(dask_address))
    else:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
            "dashboard_address": None, "env": local_worker_environment(workers)})
    # Without a configured API, this process runs a temporary server: workers must report to it
    # (the task runner passes them this process's settings), not each start one of their own.
    with temporary_settings({PREFECT_API_URL: api_url or _temporary_server_url()}), runner:
        try:
            runner.client  # connects (or starts the local cluster) now: a bad address fails before any work
        except OSError as error:  # TimeoutError and refused connections alike
            raise FanOutError(f"cannot reach the Dask scheduler at {dask_address or 'a new local cluster'}: {error}") from None
        yield runner


def _client_security(dask_address: str) -> dict:
    """The client certificate of ``CXR_DASK_TLS``, a folder with ``ca.pem``, ``client-cert.pem`` and
    ``client-key.pem`` (as ``cxr-screen stack up --workers`` makes them, or mounted from a site's
    own CA); without it, Dask's own TLS settings apply, if any. A cluster with certificates is
    never addressed over plain TCP: its scheduler would refuse it anyway, after a timeout."""
    folder = os.environ.get("CXR_DASK_TLS")
    if not folder:
        return {}
    if not dask_address.startswith("tls://"):
        raise FanOutError(f"CXR_DASK_TLS is set, and {dask_address} is not a tls:// address: the cluster's scheduler "
                          "takes TLS connections only")
    from flows.dask_tls import DaskCertificates

    certificates = DaskCertificates.in_folder(Path(folder))
    missing = [str(path) for path in (certificates.ca_file, *certificates.pair("client")) if not path.is_file()]
    if missing:
        raise FanOutError(f"CXR_DASK_TLS={folder}: missing {', '.join(missing)}")
    return {"security": certificates.security("client")}


def _temporary_server_url() -> str:
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
