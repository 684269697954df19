"""The local stack on PostgreSQL ('stack up --database postgres'), for real: the stack makes a
cluster in its folder and starts PostgreSQL on 127.0.0.1 with a generated password; nightly
screening fanned out to 2 Dask workers and a retrain run at once on it without a database error;
'stack down' keeps the database and '--wipe' removes it.

(As root, the stack runs PostgreSQL in a user namespace: the test skips with the reason where the
machine forbids one, or where Debian's postgresql is not installed.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.test_stack import (
    LOOPBACK,
    ROOT,
    api,
    cli,
    environments,
    free_port,
    listening,
    private,
    runs_of,
    s3_client,
    stack_environment,
    upload_phantoms,
)

pytestmark = [pytest.mark.slow, pytest.mark.stack]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from deployments import postgres

    try:
        postgres.require()
    except postgres.PostgresError as error:
        pytest.skip(f"PostgreSQL cannot run here: {error}")
    folder = tmp_path_factory.mktemp("stack-postgres")
    port, s3_port, dask_port, database_port = free_port(), free_port(), free_port(), free_port()
    environment = stack_environment(folder)
    environment.update(CXR_WEIGHTS="none", CXR_TRAIN_INPUT_SIZE="32", CXR_TRAIN_EPOCHS="1", CXR_SCREEN_CHUNK_SIZE="4",
                       PREFECT_WORKER_QUERY_SECONDS="2",
                       # The site's opt-out: what retrain trains is promoted without a person.
                       CXR_TRAIN_REQUIRE_APPROVAL="false")
    arguments = ("stack", "up", "--database", "postgres", "--database-port", str(database_port), "--port", str(port),
                 "--s3-port", str(s3_port), "--workers", "2", "--dask-port", str(dask_port))
    shown = cli(*arguments, environment=environment, timeout=300).stdout
    state = json.loads((folder / "stack.json").read_text())
    client = {**environment, **{key: value for key, value in state["environment"].items() if key != "PREFECT_HOME"}}
    stack = {"folder": folder, "environment": environment, "client": client, "api": state["environment"]["PREFECT_API_URL"],
             "auth": state["environment"]["PREFECT_API_AUTH_STRING"], "s3": state["environment"]["AWS_ENDPOINT_URL"],
             "up": arguments, "shown": shown, "database_port": database_port}
    try:
        yield stack
    finally:
        cli("stack", "down", environment=environment, timeout=120)


def server_log(stack) -> str:
    return (stack["folder"] / "logs" / "server.log").read_text(errors="replace")


def test_prefect_runs_on_the_stacks_postgresql_on_loopback_with_a_password(stack):
    folder = stack["folder"]
    assert f"PostgreSQL, on 127.0.0.1:{stack['database_port']}" in stack["shown"], stack["shown"]
    password = (folder / "postgres-password").read_text().strip()
    assert private(folder / "postgres-password") and (folder / "postgres").stat().st_mode & 0o777 == 0o700
    assert password not in stack["shown"] + (folder / "env").read_text() + (folder / "stack.json").read_text()
    variables = environments(folder)
    # The URL with the password goes to the Prefect server alone.
    assert [name for name, values in variables.items()
            if any(password in value for value in values.values())] == ["server"]
    assert f"127.0.0.1:{stack['database_port']}/prefect" in variables["server"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert not [key for key in variables["postgres"] if key.startswith(("AWS_", "PREFECT_", "CXR_"))]
    pid = json.loads((folder / "stack.json").read_text())["processes"]["postgres"]["pid"]
    addresses = listening([pid])
    assert addresses and all(address.startswith(LOOPBACK) for address in addresses), addresses
    # Not SQLite: Prefect made no database file, and PostgreSQL holds its tables.
    assert not (folder / "prefect" / "prefect.db").exists()
    assert httpx.get(stack["api"] + "/deployments/name/screen/nightly-screening", timeout=30).status_code == 401
    assert api(stack, "GET", "/deployments/name/screen/nightly-screening")["name"] == "nightly-screening"


def test_nightly_screening_on_two_dask_workers_and_a_retrain_at_once(stack):
    """The load SQLite is documented as unfit for: two flow runs, two process workers and two Dask
    workers writing task-run states at the same time."""
    upload_phantoms(stack, "datasets/current", per_class=12, seed=0)
    incoming = upload_phantoms(stack, "incoming/night-1", per_class=4, seed=1)
    cli("retrain", environment=stack["environment"])  # a production model for the night (no approval here)
    start = ("from deployments.follow import start_run; import sys; "
             "print(' '.join(str(start_run(name).id) for name in sys.argv[1:]))")
    created = subprocess.run([sys.executable, "-c", start, "screen/nightly-screening", "train/retrain"],
                             env=stack["client"], cwd=ROOT, check=True, capture_output=True, text=True,
                             timeout=120).stdout.split()[-2:]
    deadline, runs = time.monotonic() + 600, []
    while time.monotonic() < deadline:
        runs = [api(stack, "GET", f"/flow_runs/{run_id}") for run_id in created]
        if all(run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs):
            break
        time.sleep(2)
    assert [run["state_type"] for run in runs] == ["COMPLETED", "COMPLETED"], [run["state"] for run in runs]
    screening, retrain = runs
    assert screening["start_time"] < retrain["end_time"] and retrain["start_time"] < screening["end_time"], \
        "the two runs did not run at the same time"
    log = server_log(stack)
    assert not [line for line in log.splitlines() if "database is locked" in line or "asyncpg" in line.lower()
                or "Traceback" in line], log[-4000:]
    chunks = api(stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [created[0]]}},
                                                      "task_runs": {"name": {"like_": "screen-chunk-"}}})
    assert len(chunks) == 2 and {run["state_type"] for run in chunks} == {"COMPLETED"}
    client = s3_client(stack)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="cxr", Prefix="results/runs/")["Contents"]]
    (predictions,) = [key for key in keys if key.endswith("predictions.csv")]
    assert client.get_object(Bucket="cxr", Key=predictions)["Body"].read().decode().count("\n") == incoming + 1
    stack["runs"] = created


def test_down_keeps_the_database_and_wipe_removes_it(stack):
    if "runs" not in stack:
        pytest.skip("the runs test did not complete")
    folder, environment = stack["folder"], stack["environment"]
    assert "postgres" in cli("stack", "down", environment=environment, timeout=120).stdout
    assert (folder / "postgres" / "PG_VERSION").exists()
    cli(*stack["up"], environment=environment, timeout=300)
    kept = {run["id"] for run in runs_of(stack, "screen/nightly-screening") + runs_of(stack, "train/retrain")}
    assert set(stack["runs"]) <= kept, "the run history did not survive 'stack down' and 'stack up'"
    shown = cli("stack", "down", "--wipe", environment=environment, timeout=120).stdout
    assert f"Removed Prefect's PostgreSQL database (flow runs, logs, artifacts), in {folder / 'postgres'}" in shown, shown
    assert not (folder / "postgres").exists()


def test_a_taken_port_or_a_lost_password_is_refused_before_anything_starts(tmp_path):
    import socket

    from deployments import postgres, stack_secrets

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(postgres.PostgresError, match=f"127.0.0.1:{taken.getsockname()[1]} is taken"):
            postgres.require_free_port(taken.getsockname()[1])
    (tmp_path / "postgres").mkdir()
    (tmp_path / "postgres" / "PG_VERSION").write_text("15\n")
    with pytest.raises(stack_secrets.StackStateError, match="postgres-password: missing, and the cluster .* was made with it"):
        stack_secrets.postgres_password(tmp_path)
