"""The local stack for real: Prefect server, moto S3, a Dask scheduler and workers, cpu and gpu
process workers, deployments, Orthanc as the site's PACS (where Debian's orthanc and orthanc-dicomweb
are installed); and the local S3 alone, kept across 'stack down' and 'stack up'.

Everything goes through processes and HTTP, as an operator's would: the CLI starts the stack and
the runs, the checks read the Prefect REST API, S3 and the UI in a headless Chromium.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.stack]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
DASK_WORKERS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*arguments: str, environment: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cli.main", *arguments], env=environment, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"cxr-screen {' '.join(arguments)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def stack_environment(folder: Path) -> dict[str, str]:
    """The CLI's environment for a stack in ``folder``: no settings file, nothing from other tests' harness
    (no signing key either: the stack makes its own)."""
    (folder / "empty.env").write_text("")
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("PREFECT_", "AWS_")) and key != "CXR_MODEL_SIGNING_KEY"}
    environment.update(CXR_STACK_DIR=str(folder), CXR_SETTINGS=str(folder / "empty.env"), COLUMNS="200",
                       PREFECT_HOME=str(folder / "client-home"))
    return environment


def orthanc_missing() -> str | None:
    """Why the stack cannot start its PACS here, or None."""
    from deployments import orthanc

    try:
        orthanc.require({})
    except orthanc.OrthancError as error:
        return str(error)
    return None


def private(path: Path) -> bool:
    return path.stat().st_mode & 0o777 == 0o600


def signing_keys(folder: Path) -> dict[str, str | None]:
    """The signing key each of the stack's recorded processes was given, by name."""
    keys = {}
    for name, entry in json.loads((folder / "stack.json").read_text())["processes"].items():
        variables = Path(f"/proc/{entry['pid']}/environ").read_bytes().split(b"\0")
        given = [item.split(b"=", 1)[1].decode() for item in variables if item.startswith(b"CXR_MODEL_SIGNING_KEY=")]
        keys[name] = given[0] if given else None
    return keys


def environments(folder: Path) -> dict[str, dict[str, str]]:
    """The environment each of the stack's recorded processes runs with, by name."""
    found = {}
    for name, entry in json.loads((folder / "stack.json").read_text())["processes"].items():
        items = Path(f"/proc/{entry['pid']}/environ").read_bytes().split(b"\0")
        found[name] = dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)
    return found


def listening(pids: list[int]) -> list[str]:
    """The addresses the processes ``pids`` listen on (TCP, IPv4 and IPv6), as hex "address:port"."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(fields[1])
    return found


LOOPBACK = ("0100007F:", "00000000000000000000000001000000:")  # 127.0.0.1 and ::1 as /proc/net shows them


def the_key(folder: Path, *shown: str) -> str:
    """The stack's signing key: private, 64 hex digits, never printed, never copied into its other files."""
    path = folder / "signing-key"
    key = path.read_text().strip()
    assert private(path) and len(key) == 64 and private(folder / "stack.json")
    assert not [text for text in (*shown, (folder / "stack.json").read_text(), (folder / "env").read_text())
                if key in text], "the signing key was printed or copied"
    return key


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    port, s3_port, dask_port = free_port(), free_port(), free_port()
    environment = stack_environment(folder)
    environment.update(
        CXR_WEIGHTS="none", CXR_TRAIN_INPUT_SIZE="32", CXR_TRAIN_EPOCHS="2", CXR_TIMEZONE="Europe/Zurich",
        CXR_SCREEN_CHUNK_SIZE="4",  # the night's 8 images make 2 chunks, for the 2 Dask workers
        # The process workers ask for due runs every 2 s instead of every 10 s: the tests start seven runs.
        PREFECT_WORKER_QUERY_SECONDS="2",
        CXR_DEIDENTIFY_KEY="the site's de-identification key, for the workers only",
        OTHER_SERVICE_TOKEN="a secret of the operator's shell that no process of the stack needs",
    )
    # Orthanc, where installed: its checks ride on this stack (one stack start less for the suite).
    pacs_ports = () if orthanc_missing() else (free_port(), free_port())
    pacs_arguments = ("--pacs", "--pacs-port", str(pacs_ports[0]), "--pacs-dicom-port", str(pacs_ports[1])) if pacs_ports else ()
    environment["CXR_DICOMWEB_TOKEN"] = "another PACS's token, which the stack's PACS replaces for the workers"
    shown_up = cli("stack", "up", "--port", str(port), "--s3-port", str(s3_port), "--workers", str(DASK_WORKERS),
                   "--dask-port", str(dask_port), *pacs_arguments, environment=environment, timeout=300).stdout
    try:
        state = json.loads((folder / "stack.json").read_text())
        env_file = folder / "env"
        assert f"source {shlex.quote(str(env_file))}\n" in shown_up and private(env_file), shown_up
        assert f"export PREFECT_API_URL={state['environment']['PREFECT_API_URL']}\n" in env_file.read_text()
        pids = [entry["pid"] for entry in state["processes"].values()]
        dask = state["environment"]["CXR_DASK_ADDRESS"]
        pids += dask_worker_pids(dask, folder)  # the processes the workers' nannies started, not named in stack.json
        shown = cli("stack", "status", environment=environment).stdout
        names = ("server", "s3", "dask-scheduler", *(f"dask-worker-{n}" for n in range(1, DASK_WORKERS + 1)),
                 "worker-cpu", "worker-gpu", *(("orthanc",) if pacs_ports else ()))
        assert all(name in shown for name in names) and "stopped" not in shown, shown
        # Signed by default: what trains and screens (process workers, Dask workers) has the key; servers do not.
        key = the_key(folder, shown_up, shown)
        auth = state["environment"]["PREFECT_API_AUTH_STRING"]
        assert private(folder / "prefect-auth") and (folder / "prefect-auth").read_text() == auth + "\n"
        assert auth not in shown_up + shown and f"export PREFECT_API_AUTH_STRING={auth}\n" in env_file.read_text()
        assert signing_keys(folder) == {name: key if name.startswith(("worker-", "dask-worker-")) else None
                                        for name in names}
        # Nothing of the stack listens beyond this machine (Dask serves HTTP even with --no-dashboard),
        # but Orthanc, which cannot bind to one address: on its two ports alone.
        pacs_pid = state["processes"]["orthanc"]["pid"] if pacs_ports else None
        addresses = listening([pid for pid in pids if pid != pacs_pid])
        assert addresses and all(address.startswith(LOOPBACK) for address in addresses), addresses
        if pacs_ports:
            assert sorted({int(address.rsplit(":", 1)[1], 16) for address in listening([pacs_pid])}) == sorted(pacs_ports)
            pacs_password = (folder / "pacs-password").read_text().strip()
            assert private(folder / "pacs-password") and len(pacs_password) == 43
            assert pacs_password not in shown_up + shown and private(folder / "orthanc" / "orthanc.json")
            assert (folder / "orthanc").stat().st_mode & 0o777 == 0o700
        # What the stack and its servers write is private: logs, Prefect's database, the S3 data.
        assert all(private(log) for log in (folder / "logs").iterdir())
        assert private(folder / "prefect" / "prefect.db") and (folder / "logs").stat().st_mode & 0o777 == 0o700
        # The servers get an allow-list: no credential or key of any kind (the workers need theirs).
        for name, variables in environments(folder).items():
            assert "OTHER_SERVICE_TOKEN" not in variables, name  # workers too get an allow-list
            secrets = sorted(key for key in variables if key.startswith("AWS_SECRET") or
                             (key.startswith("CXR_") and key.endswith("_KEY")))
            if name.startswith(("worker-", "dask-worker-")):
                assert {"AWS_SECRET_ACCESS_KEY", "CXR_DEIDENTIFY_KEY"} <= set(secrets), (name, secrets)
            else:
                assert not secrets, (name, secrets)
            # The API's credentials: the server checks them, the scheduler and S3 never see them.
            assert variables.get("PREFECT_SERVER_API_AUTH_STRING") == (auth if name == "server" else None), name
            assert variables.get("PREFECT_API_AUTH_STRING") == (None if name in ("server", "s3", "dask-scheduler", "orthanc")
                                                                else auth), name
            if pacs_ports and name.startswith(("worker-", "dask-worker-")):  # they screen from it and deliver to it
                assert (variables["CXR_DICOMWEB_USER"], variables["CXR_DICOMWEB_PASSWORD"]) == ("cxr", pacs_password)
                assert "CXR_DICOMWEB_TOKEN" not in variables, name  # it would be sent instead
            elif pacs_ports:  # the servers, Orthanc itself included, never see the PACS's password
                assert not [key for key, value in variables.items() if pacs_password in value], name
    except BaseException:
        cli("stack", "down", environment=environment, timeout=120)
        raise
    yield {"folder": folder, "environment": environment, "api": state["environment"]["PREFECT_API_URL"], "auth": auth,
           # What a shell that sourced the stack's env file has (the API with its credentials, S3).
           "client": {**environment, **{key: value for key, value in state["environment"].items() if key != "PREFECT_HOME"}},
           "ui": state["ui"], "s3": state["environment"]["AWS_ENDPOINT_URL"], "dask": dask, "pacs": bool(pacs_ports),
           "pacs_location": f"dicomweb+http://127.0.0.1:{pacs_ports[0]}/dicom-web" if pacs_ports else None}
    shown_down = cli("stack", "down", environment=environment, timeout=120).stdout
    assert not [pid for pid in pids if running(pid)], "stack down left processes running"  # Orthanc's too
    assert not (folder / "stack.json").exists() and not env_file.exists()
    # What the runs wrote stays for the next 'stack up' (test_the_local_s3_keeps_its_objects_across_down_and_up).
    assert "S3 data kept for the next 'stack up': cxr (" in shown_down and (folder / "s3" / "state.pickle").exists()
    assert not pacs_ports or "PACS studies kept in" in shown_down and (folder / "orthanc" / "db").is_dir()
    shown_wipe = cli("stack", "down", "--wipe", environment=environment).stdout
    assert "Nothing was running" in shown_wipe and not (folder / "s3").exists()
    assert not pacs_ports or f"Removed the PACS's studies (Orthanc), in {folder / 'orthanc'}" in shown_wipe, shown_wipe
    assert not (folder / "orthanc").exists()


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status may wait for a busy init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def dask_security(folder: Path):
    from flows.dask_tls import DaskCertificates

    return DaskCertificates.in_folder(folder / "dask-tls").security()


def dask_worker_pids(address: str, folder: Path) -> list[int]:
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False, security=dask_security(folder)) as client:
        pids = client.run(os.getpid)
    assert len(pids) == DASK_WORKERS and all(host.startswith("tls://127.0.0.1:") for host in pids), pids
    return list(pids.values())


def s3_client(stack):
    import boto3

    client = stack["client"]
    return boto3.client("s3", endpoint_url=stack["s3"], aws_access_key_id=client["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=client["AWS_SECRET_ACCESS_KEY"], region_name=client["AWS_DEFAULT_REGION"])


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def api(stack, method: str, path: str, body: dict | None = None):
    """A call to the stack's API as a client of its own would make it: with the credentials, and a
    CSRF token for a call that changes something."""
    headers = basic(stack["auth"])
    if method != "GET":
        if "csrf" not in stack:
            response = httpx.get(f"{stack['api']}/csrf-token", params={"client": "cxr-tests"}, headers=headers, timeout=30)
            response.raise_for_status()
            stack["csrf"] = response.json()["token"]
        headers.update({"Prefect-Csrf-Token": stack["csrf"], "Prefect-Csrf-Client": "cxr-tests"})
    response = httpx.request(method, stack["api"] + path, json=body, timeout=30, headers=headers)
    response.raise_for_status()
    return response.json()


def runs_of(stack, deployment: str) -> list[dict]:
    deployment_id = api(stack, "GET", f"/deployments/name/{deployment}")["id"]
    return api(stack, "POST", "/flow_runs/filter",
               {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_DESC"})


def artifacts_of(stack, flow_run_id: str) -> dict[str, dict]:
    found = api(stack, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {artifact["key"]: artifact for artifact in found if artifact.get("key")}


def upload_phantoms(stack, prefix: str, per_class: int, seed: int) -> int:
    import cv2
    import numpy as np

    from store.phantoms import chest_phantom

    client, rng, count = s3_client(stack), np.random.default_rng(seed), 0
    for label, opacities in (("normal", False), ("covid", True)):
        for number in range(per_class):
            png = cv2.imencode(".png", chest_phantom(rng, 96, opacities))[1].tobytes()
            client.put_object(Bucket="cxr", Key=f"{prefix}/{label}/{seed}-{number}.png", Body=png)
            count += 1
    return count


def test_deployments_are_configured(stack):
    screening = api(stack, "GET", "/deployments/name/screen/nightly-screening")
    retrain = api(stack, "GET", "/deployments/name/train/retrain")
    assert screening["work_pool_name"] == "cpu" and retrain["work_pool_name"] == "gpu"
    (schedule,) = screening["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Zurich"
    assert screening["concurrency_limit"] == 1 or screening["global_concurrency_limit"]["limit"] == 1
    assert retrain["concurrency_limit"] == 1 or retrain["global_concurrency_limit"]["limit"] == 1
    assert screening["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert screening["parameters"]["params"]["dask_address"] == stack["dask"]  # the stack's scheduler
    assert retrain["schedules"] == []
    assert retrain["parameters"]["params"]["weights"] == "none" and retrain["parameters"]["params"]["input_size"] == 32
    assert retrain["parameters"]["params"]["require_approval"] is True  # the stack's default: a person promotes
    pools = {pool["name"]: pool["type"] for pool in api(stack, "POST", "/work_pools/filter", {})}
    assert pools["cpu"] == "process" and pools["gpu"] == "process"


def test_the_api_wants_credentials_a_csrf_token_and_the_uis_own_origin(stack):
    """What an anonymous caller, or a web page in the operator's browser, could do before: rewrite
    nightly-screening's parameters. Now only the health check answers without the credentials."""
    deployment = api(stack, "GET", "/deployments/name/screen/nightly-screening")
    url = f"{stack['api']}/deployments/{deployment['id']}"
    change = {"parameters": {"params": {**deployment["parameters"]["params"], "model_store_uri": "s3://attacker/models"}}}
    assert httpx.get(f"{stack['api']}/health", timeout=30).status_code == 200
    assert httpx.get(url, timeout=30).status_code == 401
    # A change is refused for want of a CSRF token (checked first: 403) or of the credentials (401).
    anonymous = httpx.patch(url, json=change, timeout=30)
    guessed = httpx.patch(url, json=change, headers=basic("cxr:guessed"), timeout=30)
    no_token = httpx.patch(url, json=change, headers=basic(stack["auth"]), timeout=30)
    assert (anonymous.status_code, guessed.status_code, no_token.status_code) == (403, 403, 403)
    headers = {"Prefect-Csrf-Token": api(stack, "GET", "/csrf-token?client=probe")["token"], "Prefect-Csrf-Client": "probe"}
    assert httpx.patch(url, json=change, headers=headers, timeout=30).status_code == 401  # a token is not a login
    assert httpx.patch(url, json=change, headers={**headers, **basic("cxr:guessed")}, timeout=30).status_code == 401
    assert api(stack, "GET", f"/deployments/{deployment['id']}")["parameters"] == deployment["parameters"]
    # The commands say which variable is wrong, before starting anything.
    refused = subprocess.run([sys.executable, "-m", "cli.main", "retrain", "--no-follow"], cwd=ROOT, text=True,
                             env={**stack["client"], "PREFECT_API_AUTH_STRING": "cxr:guessed"}, capture_output=True,
                             timeout=120, check=False)
    assert refused.returncode == 3 and "wants credentials: PREFECT_API_AUTH_STRING is refused" in refused.stdout, refused
    # A browser lets only the UI's own origin call the API.
    preflight = {"Access-Control-Request-Method": "PATCH", "Access-Control-Request-Headers": "authorization"}
    foreign = httpx.options(url, headers={"Origin": "http://evil.example", **preflight}, timeout=30)
    own = httpx.options(url, headers={"Origin": stack["ui"], **preflight}, timeout=30)
    assert "access-control-allow-origin" not in foreign.headers, foreign.headers
    assert own.headers.get("access-control-allow-origin") == stack["ui"], own.headers


def test_the_pacs_answers_the_client_environments_credentials_alone(stack):
    """'stack up --pacs': a shell that sources the client environment finds Orthanc's DICOMweb root
    and its credentials there; without them (or with a guess) Orthanc answers 401; what is stored
    with them (STOW-RS, as delivery stores) is listed (QIDO-RS, as screening lists)."""
    from pydicom.uid import generate_uid

    from store.dicomweb import store_instances
    from tests.dicom_builder import dicom_bytes, radiograph

    if not stack["pacs"]:
        pytest.skip(f"the stack started no PACS: {orthanc_missing()}")
    names = ("CXR_STACK_PACS", "CXR_DICOMWEB_USER", "CXR_DICOMWEB_PASSWORD", "CXR_DICOMWEB_TOKEN")
    probe = f"import json, os; print(json.dumps([os.environ.get(name) for name in {names!r}]))"
    script = f"source {shlex.quote(str(stack['folder'] / 'env'))} && {shlex.quote(sys.executable)} -c {shlex.quote(probe)}"
    sourced = subprocess.run(["bash", "-c", script], env=stack["environment"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert sourced.returncode == 0, sourced.stderr
    location, user, password, token = json.loads(sourced.stdout.splitlines()[-1])
    assert location.startswith("dicomweb+http://127.0.0.1:") and user == "cxr" and token is None
    studies = location.removeprefix("dicomweb+") + "/studies"
    assert httpx.get(studies, timeout=30).status_code == 401
    assert httpx.get(studies, headers=basic(f"{user}:guessed"), timeout=30).status_code == 401
    assert httpx.get(studies, headers=basic(f"{user}:{password}"), timeout=30).status_code == 200

    study = generate_uid()
    dataset = radiograph(StudyInstanceUID=study, SeriesInstanceUID=generate_uid(), PatientID="P-STACK")
    credentials = {"CXR_DICOMWEB_USER": user, "CXR_DICOMWEB_PASSWORD": password}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in credentials.items():
            patch.setenv(name, value)
        patch.delenv("CXR_DICOMWEB_TOKEN", raising=False)
        store_instances(location, [dicom_bytes(dataset)])
    listed = httpx.get(studies, headers=basic(f"{user}:{password}"), timeout=30).json()
    assert study in [item["0020000D"]["Value"][0] for item in listed], listed


def test_the_dask_cluster_takes_only_clients_with_the_stacks_certificate(stack, tmp_path):
    """Before: anyone who could connect ran code in the workers, which hold the keys. Now a plain TCP
    client, a TLS client without a certificate, and one with a certificate of another CA are refused."""
    from distributed import Client

    from flows.dask_tls import make_certificates

    address, port = stack["dask"], stack["dask"].rsplit(":", 1)[1]
    assert address == f"tls://127.0.0.1:{port}"
    for folder in (stack["folder"] / "dask-tls", stack["folder"] / "dask-tls" / ".."):
        assert folder.stat().st_mode & 0o077 == 0
    assert all(private(path) for path in (stack["folder"] / "dask-tls").iterdir())
    with Client(address, timeout=30, set_as_default=False, security=dask_security(stack["folder"])) as client:
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3
    with pytest.raises(OSError):
        Client(f"tcp://127.0.0.1:{port}", timeout=5, set_as_default=False).close()
    # TLS clients that do not check the scheduler, so that only the scheduler's own checks decide: it
    # ends the handshake of one without a certificate and of one whose certificate another CA signed,
    # and talks to one with the stack's.
    other = make_certificates(tmp_path / "other-ca")
    answers = {}
    ours = (stack["folder"] / "dask-tls" / "client-cert.pem", stack["folder"] / "dask-tls" / "client-key.pem")
    for what, pair in {"none": None, "another CA's": other.pair("client"), "the stack's": ours}.items():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if pair:
            context.load_cert_chain(*map(str, pair))
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as raw:
            try:
                with context.wrap_socket(raw) as tls:
                    answers[what] = f"{len(tls.recv(1))} byte"
            except ssl.SSLError as error:
                answers[what] = error.reason
    assert answers == {"none": "TLSV13_ALERT_CERTIFICATE_REQUIRED", "another CA's": "TLSV1_ALERT_UNKNOWN_CA",
                       "the stack's": "1 byte"}, answers


def test_retrain_then_nightly_screening_through_workers(stack):
    upload_phantoms(stack, "datasets/current", per_class=12, seed=0)
    incoming = upload_phantoms(stack, "incoming/night-1", per_class=4, seed=1)

    done = cli("retrain", environment=stack["environment"])
    assert "Completed" in done.stdout
    (retrain_run,) = [run for run in runs_of(stack, "train/retrain") if run["state_type"] == "COMPLETED"]
    assert {"training-summary", "training-metrics"} <= artifacts_of(stack, retrain_run["id"]).keys()
    # A candidate until a person promotes it: the stack's retrain requires approval.
    keys = [item["Key"] for item in s3_client(stack).list_objects_v2(Bucket="cxr", Prefix="models/")["Contents"]]
    assert "models/production.json" not in keys
    (version,) = {key.split("/")[1] for key in keys if key.endswith("/card.json")}
    cli("models", "promote", version, "--reason", "reviewed the card", "--by", "dr-lee", "--model-store",
        "s3://cxr/models", environment={**stack["client"], "CXR_MODEL_SIGNING_KEY": the_key(stack["folder"])})
    production = json.loads(s3_client(stack).get_object(Bucket="cxr", Key="models/production.json")["Body"].read())
    assert production["version"] == version
    # Signed with the stack's key (screening below checks the signature with it).
    s3_client(stack).head_object(Bucket="cxr", Key=f"models/{production['version']}/card.json.sig")

    script = ("from deployments.follow import start_run, follow_run; import sys; "
              "run = start_run('screen/nightly-screening'); sys.exit(0 if follow_run(run.id).is_completed() else 1)")
    environment = stack["client"]
    subprocess.run([sys.executable, "-c", script], env=environment, cwd=ROOT, check=True, timeout=600,
                   capture_output=True)
    screening_run = next(run for run in runs_of(stack, "screen/nightly-screening") if run["state_type"] == "COMPLETED")
    artifacts = artifacts_of(stack, screening_run["id"])
    assert {"screening-summary", "screening-flagged", "screening-progress"} <= artifacts.keys()

    client = s3_client(stack)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="cxr", Prefix="results/runs/")["Contents"]]
    (predictions,) = [key for key in keys if key.endswith("predictions.csv")]
    rows = list(csv.DictReader(io.StringIO(client.get_object(Bucket="cxr", Key=predictions)["Body"].read().decode())))
    assert len(rows) == incoming and {row["model_version"] for row in rows} == {production["version"]}
    assert any(key.endswith("report.html") for key in keys)

    # The chunks ran in the Dask workers, not in the flow run's process: each task run's own process
    # logs its end under the task run's name, and the Dask workers log under the stack's folder.
    chunk_runs = api(stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [screening_run["id"]]}},
                                                          "task_runs": {"name": {"like_": "screen-chunk-"}}})
    assert len(chunk_runs) == 2 and {run["state_type"] for run in chunk_runs} == {"COMPLETED"}, chunk_runs
    logs = {path.name: path.read_text() for path in (stack["folder"] / "logs").glob("*.log")}
    for run in chunk_runs:
        ran_in = [name for name, text in logs.items() if f"Task run '{run['name']}' - Finished" in text]
        assert ran_in and all(name.startswith("dask-worker-") for name in ran_in), (run["name"], ran_in)
    stack["runs"] = {"retrain": retrain_run, "screening": screening_run}


def test_the_nightly_deployment_screens_from_the_stacks_pacs_and_delivers_back(stack):
    """The nightly deployment pointed at the stack's Orthanc (as CXR_INCOMING would point it) and
    delivering to it: the flow run's worker and the Dask workers read and write the PACS with the
    credentials the stack gave them alone, and Orthanc holds one report per radiograph after."""
    from pydicom.uid import generate_uid

    from store.dicomweb import store_instances
    from store.phantoms import chest_phantom
    from tests.dicom_builder import dicom_bytes, radiograph

    if not stack["pacs"]:
        pytest.skip(f"the stack started no PACS: {orthanc_missing()}")
    if "runs" not in stack:
        pytest.skip("needs the production model of test_retrain_then_nightly_screening_through_workers")
    user, password = "cxr", (stack["folder"] / "pacs-password").read_text().strip()
    location = stack["pacs_location"]
    night = [radiograph(chest_phantom(np.random.default_rng(seed), 128).astype(np.uint16) * 16, bits_stored=12,
                        StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), PatientID=f"P-{seed}",
                        StudyDate="20340112", AccessionNumber=f"ST-{seed}", ViewPosition="PA", BodyPartExamined="CHEST")
             for seed in range(3)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CXR_DICOMWEB_USER", user)
        patch.setenv("CXR_DICOMWEB_PASSWORD", password)
        store_instances(location, [dicom_bytes(dataset) for dataset in night])

    overrides = {"incoming_uri": f"{location}?StudyDate=20340112-", "results_uri": "s3://cxr/results-pacs",
                 "deliver_to": location}
    script = ("from deployments.follow import start_run, follow_run; import json, sys; "
              f"run = start_run('screen/nightly-screening', json.loads({json.dumps(json.dumps(overrides))})); "
              "sys.exit(0 if follow_run(run.id).is_completed() else 1)")
    environment = {key: value for key, value in stack["client"].items() if not key.startswith("CXR_DICOMWEB_")}
    done = subprocess.run([sys.executable, "-c", script], env=environment, cwd=ROOT, timeout=600,
                          capture_output=True, text=True, check=False)  # the shell that starts it has no PACS credentials
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = s3_client(stack)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="cxr", Prefix="results-pacs/runs/")["Contents"]]
    (predictions,) = [key for key in keys if key.endswith("predictions.csv")]
    rows = list(csv.DictReader(io.StringIO(client.get_object(Bucket="cxr", Key=predictions)["Body"].read().decode())))
    assert sorted(row["sop_instance_uid"] for row in rows) == sorted(str(dataset.SOPInstanceUID) for dataset in night)
    assert {row["status"] for row in rows} == {"ok"} and {row["delivery"] for row in rows} == {"delivered"}, rows
    found = httpx.get(location.removeprefix("dicomweb+") + "/instances", params={"Modality": "SR"},
                      headers=basic(f"{user}:{password}"), timeout=30).json()
    reports = {item["0020000D"]["Value"][0] for item in found}
    assert {str(dataset.StudyInstanceUID) for dataset in night} <= reports  # one per radiograph, in its study


def test_a_second_nightly_run_while_one_runs_is_cancelled(stack):
    """Concurrency limit 1 with CANCEL_NEW: of two runs due at once, one runs and one is cancelled."""
    script = ("from deployments.follow import start_run; "
              "print(' '.join(str(start_run('screen/nightly-screening').id) for _ in range(2)))")
    environment = stack["client"]
    created = subprocess.run([sys.executable, "-c", script], env=environment, cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=120).stdout.split()[-2:]
    deadline, states = time.monotonic() + 300, {}
    while time.monotonic() < deadline:
        states = {run_id: api(stack, "GET", f"/flow_runs/{run_id}")["state_type"] for run_id in created}
        if all(state in ("COMPLETED", "CANCELLED", "FAILED", "CRASHED") for state in states.values()):
            break
        time.sleep(2)
    assert sorted(states.values()) == ["CANCELLED", "COMPLETED"], states


def new_runs(stack, deployment: str, before: set[str], count: int, within: float = 90) -> list[dict]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        new = [run for run in runs_of(stack, deployment) if run["id"] not in before]
        if len(new) >= count:
            return new
        time.sleep(2)
    pytest.fail(f"fewer than {count} new {deployment} run(s) within {within:.0f} s")


def test_the_event_names_the_dataset_and_trainings_take_turns(stack):
    """Two cxr.dataset.updated events for another dataset: two retrain runs on that dataset (the
    URI comes from the event), one at a time (the deployment's concurrency limit)."""
    upload_phantoms(stack, "datasets/other-site", per_class=12, seed=5)
    before = {run["id"] for run in runs_of(stack, "train/retrain")}
    cli("dataset-updated", "s3://cxr/datasets/other-site", environment=stack["environment"])
    cli("dataset-updated", "s3://cxr/datasets/other-site", environment=stack["environment"])
    runs = new_runs(stack, "train/retrain", before, 2)
    assert {run["parameters"]["params"]["dataset_uri"] for run in runs} == {"s3://cxr/datasets/other-site"}
    deadline = time.monotonic() + 420
    while not all(run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs):
        running = [run for run in runs if run["state"]["type"] == "RUNNING"]
        assert len(running) <= 1, "two trainings ran at once"
        assert time.monotonic() < deadline, f"the trainings did not end: {[run['state'] for run in runs]}"
        time.sleep(2)
        runs = [api(stack, "GET", f"/flow_runs/{run['id']}") for run in runs]
    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"], [run["state"] for run in runs]
    first, second = sorted(runs, key=lambda run: run["start_time"])
    assert second["start_time"] >= first["end_time"], "the second training started before the first ended"


def test_an_event_without_a_dataset_trains_on_the_configured_one(stack):
    before = {run["id"] for run in runs_of(stack, "train/retrain")}
    emit = ("from prefect.events import emit_event; from prefect.events.worker import EventsWorker; "
            "emit_event(event='cxr.dataset.updated', resource={'prefect.resource.id': 'cxr.dataset.anonymous'}); "
            "EventsWorker.drain_all()")
    done = subprocess.run([sys.executable, "-c", emit], env=stack["client"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    (run, *_) = new_runs(stack, "train/retrain", before, 1)
    assert run["parameters"]["params"]["dataset_uri"] == "s3://cxr/datasets/current"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian's chromium is not installed at {CHROMIUM}")
def test_the_ui_shows_both_runs_completed_and_the_screening_artifacts(stack):
    playwright = pytest.importorskip("playwright.sync_api")
    runs = stack.get("runs")
    if runs is None:
        pytest.skip("the runs test did not complete")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            # The UI asks for the API's credentials first, as it would ask the operator.
            page.goto(stack["ui"], wait_until="networkidle")
            page.locator("input[type=password]").fill(stack["auth"])
            page.get_by_role("button", name="Login").click()
            page.wait_for_url(lambda url: "login" not in url, timeout=30_000)
            for run in runs.values():
                page.goto(f"{stack['ui']}/runs/flow-run/{run['id']}", wait_until="networkidle")
                page.get_by_text(run["name"]).first.wait_for(timeout=30_000)
                page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.goto(f"{stack['ui']}/runs/flow-run/{runs['screening']['id']}", wait_until="networkidle")
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("screening-summary").first.wait_for(timeout=30_000)
            page.get_by_text("screening-flagged").first.wait_for(timeout=30_000)
            # Kept beside the stack's logs for whoever debugs a failure.
            page.screenshot(path=str(stack["folder"] / "screening-artifacts.png"))
        finally:
            browser.close()


def test_the_local_s3_keeps_its_objects_across_down_and_up(tmp_path):
    """The stack's S3 alone ('stack up --s3-only': seconds, no Prefect server): objects written
    before 'stack down' come back after 'stack up' with their bytes and ETags, every version of a
    versioned one too, and the ledger's and production.json's conditional puts still hold on them;
    what was saved survives a SIGKILL; 'stack down --wipe' removes it. The client environment's
    file is private, and a shell that sources it gets a boto3 client on this endpoint."""
    import boto3
    from botocore.exceptions import ClientError

    from deployments.s3_server import read_summary

    environment, s3_port, env_file = stack_environment(tmp_path), free_port(), tmp_path / "env"

    keys = set()

    def up() -> dict:
        shown = cli("stack", "up", "--s3-only", "--s3-port", str(s3_port), environment=environment, timeout=120).stdout
        assert f"source {shlex.quote(str(env_file))}\n" in shown and private(env_file), shown
        keys.add(the_key(tmp_path, shown))
        assert len(keys) == 1, "the signing key changed across 'stack down' and 'stack up'"
        assert signing_keys(tmp_path) == {"s3": None}  # the S3 server does not get it
        return json.loads((tmp_path / "stack.json").read_text())

    def refused(**put) -> str:
        with pytest.raises(ClientError) as error:
            client.put_object(**put)
        return error.value.response["Error"]["Code"]

    tmp_path.chmod(0o755)  # a folder the user made readable: 'up' makes it private again (it holds the keys)
    state = up()
    assert tmp_path.stat().st_mode & 0o777 == 0o700
    try:
        endpoint = state["environment"]["AWS_ENDPOINT_URL"]
        probe = ("import boto3, json; session = boto3.session.Session(); client = session.client('s3'); "
                 "client.create_bucket(Bucket='cxr'); credentials = session.get_credentials(); "
                 "print(json.dumps([client.meta.endpoint_url, credentials.access_key, credentials.secret_key, "
                 "session.region_name, [bucket['Name'] for bucket in client.list_buckets()['Buckets']], "
                 "__import__('os').environ.get('CXR_MODEL_SIGNING_KEY')]))")
        script = f"source {shlex.quote(str(env_file))} && {shlex.quote(sys.executable)} -c {shlex.quote(probe)}"
        sourced = subprocess.run(["bash", "-c", script], env=environment,  # an environment without AWS_ variables
                                 capture_output=True, text=True, timeout=60, check=False)
        assert sourced.returncode == 0, sourced.stderr
        assert json.loads(sourced.stdout.splitlines()[-1]) == [
            endpoint, state["environment"]["AWS_ACCESS_KEY_ID"], state["environment"]["AWS_SECRET_ACCESS_KEY"],
            state["environment"]["AWS_DEFAULT_REGION"], ["cxr"], *keys]  # commands run by hand sign as the stack

        keys_of_the_stack = {"aws_access_key_id": state["environment"]["AWS_ACCESS_KEY_ID"],
                             "aws_secret_access_key": state["environment"]["AWS_SECRET_ACCESS_KEY"]}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys_of_the_stack)
        assert private(tmp_path / "s3-credentials") and "testing" not in keys_of_the_stack.values()
        # Only requests signed with the stack's own pair: no unsigned write, no guessed key, no moto reset.
        assert httpx.put(f"{endpoint}/cxr/planted", content=b"x", timeout=30).status_code == 403
        guessed = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                               aws_secret_access_key="testing", region_name="us-east-1")
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            guessed.list_objects_v2(Bucket="cxr")
        assert httpx.post(f"{endpoint}/moto-api/reset", timeout=30).status_code == 403
        assert httpx.get(f"{endpoint}/cxr", headers={"Host": "rebound.example"}, timeout=30).status_code == 400
        assert [item["Key"] for item in client.list_objects_v2(Bucket="cxr").get("Contents", [])] == []
        model = os.urandom(6_000_000)  # over moto's in-memory buffer: kept in a temporary file
        client.put_object(Bucket="cxr", Key="models/v1/model.keras", Body=model)
        client.put_object(Bucket="cxr", Key="ledger/0001.json", Body=b'{"image": 1}', IfNoneMatch="*")
        client.put_object(Bucket="cxr", Key="models/production.json", Body=b'{"version": "v1"}', IfNoneMatch="*")
        etags = {key: client.head_object(Bucket="cxr", Key=key)["ETag"]
                 for key in ("models/v1/model.keras", "ledger/0001.json", "models/production.json")}
        client.create_bucket(Bucket="versioned")
        client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
        for body in (b"first", b"second"):
            client.put_object(Bucket="versioned", Key="card.md", Body=body)

        shown = cli("stack", "down", environment=environment).stdout
        assert "S3 data kept for the next 'stack up': cxr (3 object(s), 6.0 MB), versioned (1 object(s)" in shown
        assert not env_file.exists()
        up()
        assert client.get_object(Bucket="cxr", Key="models/v1/model.keras")["Body"].read() == model
        assert {key: client.head_object(Bucket="cxr", Key=key)["ETag"] for key in etags} == etags
        versions = client.list_object_versions(Bucket="versioned", Prefix="card.md")["Versions"]
        bodies = [client.get_object(Bucket="versioned", Key="card.md", VersionId=version["VersionId"])["Body"].read()
                  for version in versions]
        assert sorted(bodies) == [b"first", b"second"]
        # The ledger's create-once and production.json's compare-and-swap, on the restored objects.
        assert refused(Bucket="cxr", Key="ledger/0001.json", Body=b"again", IfNoneMatch="*") == "PreconditionFailed"
        assert refused(Bucket="cxr", Key="models/production.json", Body=b'{"version": "v2"}',
                       IfMatch='"0123456789abcdef0123456789abcdef"') == "PreconditionFailed"
        client.put_object(Bucket="cxr", Key="models/production.json", Body=b'{"version": "v2"}',
                          IfMatch=etags["models/production.json"])

        # Killed without 'stack down': what was saved (within seconds of the last change) survives.
        client.put_object(Bucket="cxr", Key="written-before-a-kill", Body=b"kept")
        deadline = time.monotonic() + 20
        while (read_summary(tmp_path / "s3") or {}).get("buckets", {}).get("cxr", {}).get("objects") != 4:
            assert time.monotonic() < deadline, "the S3 state was not saved within 20 s of a change"
            time.sleep(0.2)
        s3_pid = json.loads((tmp_path / "stack.json").read_text())["processes"]["s3"]["pid"]
        os.killpg(s3_pid, signal.SIGKILL)
        while running(s3_pid):
            time.sleep(0.1)
        up()
        assert client.get_object(Bucket="cxr", Key="written-before-a-kill")["Body"].read() == b"kept"
        assert client.get_object(Bucket="cxr", Key="models/production.json")["Body"].read() == b'{"version": "v2"}'

        shown = cli("stack", "down", "--wipe", environment=environment).stdout
        assert "Removed S3 data: cxr (4 object(s)" in shown and str(tmp_path / "s3") in shown, shown
        assert not (tmp_path / "s3").exists()
        up()
        assert client.list_buckets()["Buckets"] == []
    finally:
        cli("stack", "down", environment=environment)
