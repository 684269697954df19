"""Screening fanned out over Dask, and its faults: the same rows as in process, every input exactly
once when a worker process is killed mid-chunk, a hung storage step stopped and retried."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flows.fan_out import FanOutError, chunk_runner, local_worker_environment
from screening import ledger
from screening.results import ResultsLayout
from store import storage
from tests.test_screen_flow import make_incoming, run_rows, run_screen

pytestmark = pytest.mark.slow


def by_uri(rows: list[dict]) -> dict[str, dict]:
    assert len(rows) == len({row["image_uri"] for row in rows}), "an input has more than one row"
    return {row["image_uri"]: row for row in rows}


def test_a_fanned_out_run_gives_the_rows_of_an_in_process_run(model_store, tmp_path):
    incoming = str(tmp_path / "incoming")
    expected = make_incoming(incoming, per_class=5)
    alone = run_screen(incoming, str(tmp_path / "alone"), model_store, engine="fp32", chunk_size=4)
    fanned = run_screen(incoming, str(tmp_path / "fanned"), model_store, engine="fp32", chunk_size=4, workers=2)

    assert (fanned.screened, fanned.flagged, fanned.rejected) == (alone.screened, alone.flagged, alone.rejected)
    assert fanned.screened == len(expected)
    one, other = by_uri(run_rows(str(tmp_path / "alone"))), by_uri(run_rows(str(tmp_path / "fanned")))
    assert one.keys() == other.keys() == expected.keys()
    for uri, row in one.items():
        twin = other[uri]
        assert (twin["status"], twin["predicted_class"], twin["flagged"], twin["engine"]) == \
               (row["status"], row["predicted_class"], row["flagged"], row["engine"]), uri
        probabilities = [name for name in row if name.startswith("prob_") and row[name]]
        assert probabilities or row["status"] == "rejected", uri
        for column in probabilities:
            # Rounded to 6 decimals: values equal to 1e-6 may round one step apart.
            assert abs(float(twin[column]) - float(row[column])) <= 1.5e-6, (uri, column)


def _worker_processes() -> list[int]:
    """This process's children that are Dask worker processes (spawned by a nanny)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if parent == os.getpid() and b"spawn_main" in command:
            found.append(int(entry.name))
    return found


def test_a_worker_killed_mid_chunk_leaves_every_input_with_exactly_one_row(model_store, s3_bucket, tmp_path):
    incoming, results = f"{s3_bucket}/incoming", f"{s3_bucket}/results"
    expected = make_incoming(str(tmp_path / "incoming"), per_class=8)
    for uri in list(expected):
        relative = storage.relative_to(uri, str(tmp_path / "incoming"))
        storage.write_bytes(storage.join(incoming, relative), storage.read_bytes(uri))
        expected[storage.join(incoming, relative)] = expected.pop(uri)
    killed: list[int] = []

    def in_progress() -> int:
        """Chunks started (their inputs recorded) whose rows are not written yet."""
        names = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(f"{results}/runs", missing_ok=True)]
        started = {name.split(".")[0] for name in names if name.endswith(".json") and name.startswith("chunk-")}
        return len(started - {name.split(".")[0] for name in names if name.endswith(".jsonl")})

    def kill_a_worker_while_both_screen() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            workers = _worker_processes()
            if len(workers) == 2 and in_progress():
                for pid in workers:  # freeze both, then look: no race with the chunks' progress
                    os.kill(pid, signal.SIGSTOP)
                if in_progress() == 2:  # each worker is inside a chunk
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_while_both_screen)
    killer.start()
    summary = run_screen(incoming, results, model_store, engine="fp32", chunk_size=4, explain="all", workers=2)
    killer.join()

    assert killed, "no worker was killed: the test did not test anything"
    assert summary.status == "completed"
    rows = by_uri(run_rows(results))
    assert rows.keys() == expected.keys()
    assert {uri: row["status"] for uri, row in rows.items()} == expected
    assert len(ledger.done_keys(results, summary.model_version)) == len(expected)
    # Each chunk's inputs were recorded, and the parts cover every claimed row once.
    parts = storage.list_files(ResultsLayout(results).run(summary.run_id).parts, {".jsonl"})
    assert sum(storage.read_bytes(uri).count(b"\n") for uri in parts) == len(expected)


def test_local_workers_share_the_cores_instead_of_each_taking_all():
    environment = local_worker_environment(workers=4, cores=16)
    assert environment["TF_NUM_INTRAOP_THREADS"] == environment["OMP_NUM_THREADS"] == "4"
    assert local_worker_environment(workers=3, cores=2)["TF_NUM_INTRAOP_THREADS"] == "1"


def test_a_remote_cluster_is_refused_local_folders_and_a_temporary_api(tmp_path, s3_bucket):
    with pytest.raises(FanOutError, match="folder on this machine.*use s3://"):
        with chunk_runner(dask_address="tcp://10.1.2.3:8786", storage_uris=[s3_bucket, str(tmp_path)]):
            pass
    with pytest.raises(FanOutError, match="PREFECT_API_URL"):
        with chunk_runner(dask_address="tcp://10.1.2.3:8786", storage_uris=[s3_bucket]):
            pass


def test_a_cluster_with_certificates_is_addressed_over_tls_with_them(tmp_path, monkeypatch):
    from flows.dask_tls import make_certificates

    monkeypatch.setenv("CXR_DASK_TLS", str(tmp_path / "dask-tls"))
    with pytest.raises(FanOutError, match=r"dask-tls: missing .*ca\.pem"):
        with chunk_runner(dask_address="tls://127.0.0.1:9"):
            pass
    make_certificates(tmp_path / "dask-tls")
    with pytest.raises(FanOutError, match="not a tls:// address"):
        with chunk_runner(dask_address="tcp://127.0.0.1:9"):
            pass


def test_an_unreachable_scheduler_is_one_clear_error(prefect_api):
    from dask import config

    started = time.monotonic()
    with config.set({"distributed.comm.timeouts.connect": "3s"}), pytest.raises(FanOutError, match="cannot reach"):
        with chunk_runner(dask_address="tcp://127.0.0.1:9"):
            pass
    assert time.monotonic() - started < 30


@pytest.fixture
def silent_s3(monkeypatch):
    """An S3 endpoint that accepts connections and never answers (a hung network share, a dead proxy)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(64)], daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    for key, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                           AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(key, value)
    yield
    server.close()


def test_a_hung_read_is_stopped_by_the_steps_time_limit_and_counts_as_transient(prefect_api, silent_s3):
    from prefect import flow

    from tasks.retrying import transient_only
    from tasks.screen_chunks import find_inputs

    assert find_inputs.timeout_seconds, "a step that reads storage has no time limit"

    @flow
    def listing():
        return find_inputs.with_options(timeout_seconds=2, retries=0)("s3://bucket/incoming")

    started = time.monotonic()
    state = listing(return_state=True)
    # The limit ends the step, at the latest when the S3 read in progress gives up (30 s: a blocked
    # socket read cannot always be interrupted); botocore alone would retry it 5 times, 30 s each.
    assert state.is_failed() and time.monotonic() - started < 45
    assert state.name == "TimedOut"
    # A hang may pass: the step's retry condition retries it (a missing folder would fail at once).
    assert transient_only(find_inputs, None, state)
