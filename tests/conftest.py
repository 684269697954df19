"""Shared fixtures: an isolated Prefect home, a real moto S3 server over HTTP, a fresh local or S3
location, one trained model for the session, the shared data."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Prefect reads its settings at import: isolate it before any test module imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="cxr-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# auto's measured engine speeds (screening/engine_speeds.py): kept per test session, not in ~/.cache.
os.environ["CXR_ENGINE_SPEEDS"] = str(Path(_PREFECT_HOME) / "engine-speeds.json")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One OpenBLAS thread (read when numpy loads; subprocesses inherit it). Training's head selection
# is hundreds of small scikit-learn solves: two OpenBLAS threads spin against TensorFlow's threads
# and everything else on a 2-core machine, and the same solves take about ten times as long.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cli import bootstrap  # noqa: E402

# TensorFlow's runtime options as in production, set before TensorFlow loads; no local settings file.
bootstrap(settings_file=False)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CXR = SHARED_DATA / "cxr"
CXR_FULLSIZE = SHARED_DATA / "cxr-fullsize"


def require_shared_data(path: Path = CXR) -> Path:
    if not path.is_dir():
        pytest.skip(f"real chest X-rays not found at {path} (see ../shared/data/README.md)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server in its own process on 127.0.0.1; AWS_* variables point boto3 at it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(Path(_PREFECT_HOME) / "moto.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start; see {log.name}") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    process.terminate()
    process.wait(timeout=10)
    log.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A fresh, empty bucket on the moto server; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    """A fresh, empty root, once as a local folder and once as a prefix of a new bucket on the moto
    server: a test that takes it runs on both (ids ``[local]`` and ``[s3]``)."""
    if request.param == "local":
        return str(tmp_path / "location")
    return request.getfixturevalue("s3_bucket") + "/location"


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for the whole session (starting one costs ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass(frozen=True)
class TrainedModel:
    """The session's trained model. Read it; never change it: a test that changes a store or a
    dataset works on its own copy (``copy_tree``)."""

    store: str  # a model store whose production version is the model
    version: str
    dataset: str  # the phantoms it was trained on


@pytest.fixture(scope="session")
def trained_model(prefect_api, tmp_path_factory) -> TrainedModel:
    """A tiny trained model (32 px, weights none, 3 epochs on 32 phantoms), registered as
    production: a bundle as training writes it. Trained once for the whole session; at its end
    every file of the store and the dataset must be as training left it."""
    from flows.parameters import TrainParameters
    from flows.train import train
    from store.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("trained-model")
    write_phantom_dataset(str(root / "dataset"), per_class=16, size=96, seed=11)
    trained = train(TrainParameters(dataset_uri=str(root / "dataset"), model_store_uri=str(root / "models"),
                                    input_size=32, weights="none", epochs=3, augment_draws=1, batch_size=8))
    assert trained.promoted, f"the fixture's model was not promoted: {trained.reason}"
    as_trained = _file_hashes(root)
    yield TrainedModel(str(root / "models"), trained.version, str(root / "dataset"))
    changed = sorted(set(as_trained.items()) ^ set(_file_hashes(root).items()))
    assert not changed, f"a test changed the session's trained model or its dataset (copy_tree them first): {changed}"


@pytest.fixture(scope="session")
def model_store(trained_model) -> str:
    """The session's trained model's store (read-only: see TrainedModel)."""
    return trained_model.store


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def copy_tree(source: str, target: str) -> None:
    """Every file under ``source`` (folder or s3://) to the same place under ``target``."""
    from store import storage

    for uri in storage.list_files(source):
        storage.write_bytes(storage.join(target, storage.relative_to(uri, source)), storage.read_bytes(uri))


def flow_run_artifacts(flow_run_id) -> dict:
    """Artifacts of a flow run (and its task runs), by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in artifacts}
