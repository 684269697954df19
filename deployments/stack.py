"""A local stack on one machine, bound to 127.0.0.1: Prefect server and UI, a moto S3 server
whose objects outlive it (unless real S3 is configured; ``deployments/s3_server.py``), optionally a
Dask scheduler and workers that nightly screening fans its chunks out to, optionally Orthanc as the
site's local PACS (``deployments/orthanc.py``), a process worker for each pool, and the deployments.

Everything it starts is recorded by pid and full command line in ``<folder>/stack.json``, with
logs, Prefect's database and the S3 data beside it; ``down`` stops exactly those processes and
nothing else, and ``wipe`` removes the stored data. The client environment (Prefect API, S3
endpoint and its credentials) is written to ``<folder>/env`` for a shell to ``source``.

Only what the stack made is trusted. ``stack.json`` is read only when it is a regular file owned by
this user with mode 0600 (as ``up`` writes it), through the bounded parser, and its shape is
checked; anything else is refused with one line naming the file (``StackStateError``). A recorded
process is stopped only while its command line (``/proc/<pid>/cmdline``) is, argument for
argument, the one it was started with, and it still leads the process group it was started in: a
recycled pid runs something else. ``up`` refuses a folder owned by someone else, or one others can
write (they could plant Prefect's settings or a stored state in it).

Models are signed on the stack by default: ``up`` keeps an HMAC key in ``<folder>/signing-key``
(mode 0600, made once, kept across restarts, never printed) and gives it, as
``CXR_MODEL_SIGNING_KEY``, to what signs or checks bundles: the process workers (training and
screening flow runs) and the Dask workers; the servers (Prefect, S3, the Dask scheduler) and the
deploy step do not get it. A key already in the environment is used instead.

With ``pacs``, Orthanc stores in ``<folder>/orthanc`` and asks for user ``cxr`` and the password in
``<folder>/pacs-password`` (made once, 0600), which the workers get as ``CXR_DICOMWEB_USER`` and
``CXR_DICOMWEB_PASSWORD`` and the client environment exports beside its location, ``CXR_STACK_PACS``;
the servers and the deploy step do not. Orthanc 1.10 cannot bind to one address: it listens on every
interface, answers other machines' HTTP requests with 403, and takes DICOM only from known AE titles
on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from deployments import orthanc, postgres, stack_secrets
from deployments.s3_server import read_summary
from deployments.settings import Settings
from deployments.stack_environment import SERVERS, loopback_unproxied, server_environment, worker_environment
from deployments.stack_secrets import (
    PACS_PASSWORD,
    POSTGRES_DATA,
    S3_CREDENTIALS,
    SIGNING_KEY,
    StackStateError,
)
from model import stored_json
from store import s3

__all__ = ["client_environment", "down", "status", "stored_data", "up", "wipe"]

STATE = "stack.json"
ENV_FILE = "env"  # the client environment, one 'export' a line, for 'source'
S3_DATA = "s3"  # the local S3's stored state
SIGNING_KEY_VARIABLE = "CXR_MODEL_SIGNING_KEY"  # store.registry's, named here: importing it loads TensorFlow
DASK_TLS = "dask-tls"  # the Dask cluster's CA certificate, and certificates and keys of its scheduler, workers and clients
PACS_DATA = "orthanc"  # Orthanc's configuration and stored studies, with --pacs
PACS_USER = "cxr"
PACS_LOCATION = "CXR_STACK_PACS"  # the DICOMweb root, as a screening or delivery location names it
PACS_CREDENTIALS = ("CXR_DICOMWEB_USER", "CXR_DICOMWEB_PASSWORD")  # store/dicomweb.py's
_STOP_SIGNALS = ("SIGTERM", "SIGINT")  # PostgreSQL: SIGINT is its fast shutdown, SIGTERM waits for every client
MAX_STATE_BYTES = 2**20  # a stack's state is about 2 kB
PROJECT_DIR = Path(__file__).resolve().parents[1]


def _wait_for(url: str, what: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}{_last_error(log)}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as error:  # it answers: the S3 endpoint refuses an unsigned request (403)
            if error.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s; see {log}")


def _last_error(log: Path) -> str:
    """': <the log's last line starting with error:>', or nothing."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return f": {errors[-1][len('error:'):].strip()}" if errors else ""


def _wait_for_dask(folder: Path, processes: dict[str, subprocess.Popen], workers: int = 0,
                   timeout: float = 180) -> None:
    """Until the stack's scheduler listens and ``workers`` workers have joined it; fails as soon as
    one of ``processes`` exits."""
    deadline = time.monotonic() + timeout

    def check() -> None:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}; see {folder / 'logs' / name}.log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Dask cluster did not start within {timeout:.0f} s; see the dask-* logs in "
                               f"{folder / 'logs'}")
        time.sleep(0.5)

    # The scheduler writes this file once it listens. Whatever answers on its port before that
    # may be someone else's, on which a client would wait forever.
    scheduler_file = folder / "dask" / "scheduler.json"
    while not scheduler_file.exists():
        check()
    if not workers:
        return
    from distributed import Client

    from flows.dask_tls import DaskCertificates

    security = DaskCertificates.in_folder(folder / DASK_TLS).security()
    with Client(scheduler_file=str(scheduler_file), timeout=30, set_as_default=False, security=security) as client:
        while len(client.scheduler_info()["workers"]) < workers:
            check()


def _private_log(log: Path) -> BinaryIO:
    """``log`` opened for appending, 0600 in a 0700 folder (also one an older stack made readable)."""
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log.parent.chmod(0o700)
    handle = open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")  # noqa: SIM115 - the caller closes it
    os.fchmod(handle.fileno(), 0o600)
    return handle


def _start(folder: Path, name: str, command: list[str], environment: dict) -> subprocess.Popen:
    """``name`` started with its log (0600: logs hold exceptions and call stacks); a server's files
    (Prefect's database, the S3 data, the scheduler's) are made private too (umask 077). Workers keep
    the user's umask: what their runs write to a local results folder is for the site to share."""
    with _private_log(folder / "logs" / f"{name}.log") as handle:
        # Own session: stopping the group stops the process and its children (flow runs) only.
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment,
                                cwd=PROJECT_DIR, start_new_session=True,
                                umask=0o077 if name in SERVERS else -1)


def _alive(entry: dict) -> bool:
    """The recorded process runs: its full command line is the one it was started with, and it leads
    its own process group (``down`` stops that group). A recycled pid runs something else.
    (A process that retitles itself would no longer match: Dask's scheduler and workers do when the
    ``setproctitle`` package is installed, which this project does not install; ``stack status``
    would then show them stopped, as ``tests/test_stack.py`` checks it does not.)"""
    try:
        cmdline = Path(f"/proc/{entry['pid']}/cmdline").read_bytes()
        group = os.getpgid(entry["pid"])
    except OSError:
        return False
    command = [os.fsencode(argument) for argument in entry["command"]]
    # Each argument ends with a NUL; a zombie's cmdline is empty, and so never matches.
    return bool(command) and cmdline.split(b"\0")[:-1] == command and group == entry["pid"]


def _read_state(folder: Path) -> dict | None:
    """``<folder>/stack.json``, trusted and checked, or None when there is none."""
    path = folder / STATE
    data = stack_secrets.read_private(path, MAX_STATE_BYTES)
    if data is None:
        return None
    try:
        state = stored_json.loads(data, str(path), max_bytes=MAX_STATE_BYTES)
    except stored_json.StoredStateError as error:
        raise StackStateError(f"{error}; remove it if no stack runs from {folder}") from None
    problem = _state_problem(state)
    if problem:
        raise StackStateError(f"{path}: not a stack's state ({problem}); remove it if no stack runs from {folder}")
    return state


def _state_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return "not an object"
    environment, processes = state.get("environment"), state.get("processes")
    if not (isinstance(environment, dict) and all(isinstance(key, str) and isinstance(value, str)
                                                  for key, value in environment.items())):
        return "'environment' is not an object of strings"
    if not isinstance(processes, dict):
        return "'processes' is not an object"
    for name, entry in processes.items():
        if not isinstance(entry, dict):
            return f"process {name!r} is not an object"
        if "marker" in entry and "command" not in entry:
            return (f"process {name!r} is named by a marker, as an earlier version wrote: stop the stack's processes "
                    f"by hand (their logs are in {state.get('folder')}/logs)")
        pid, command = entry.get("pid"), entry.get("command")
        if not (type(pid) is int and pid > 1):
            return f"process {name!r} has no pid"
        if not (isinstance(command, list) and command and all(isinstance(part, str) and part for part in command)):
            return f"process {name!r} has no command line"
        if entry.get("signal", "SIGTERM") not in _STOP_SIGNALS:
            return f"process {name!r} has a stop signal other than {' or '.join(_STOP_SIGNALS)}"
    return None


def client_environment(folder: Path) -> dict[str, str]:
    """The variables that point Prefect and boto3 at a running stack."""
    state = _read_state(folder)
    if state is None:
        raise StackStateError(f"{folder / STATE}: no stack recorded")
    return state["environment"]


def _write_client_environment(folder: Path, environment: dict[str, str], signing_key: Path | None) -> Path:
    """``<folder>/env``: one ``export KEY=VALUE`` a line, values shell-quoted, readable only by
    the user (it holds the S3 credentials). The signing key is named by its file, never copied."""
    path = folder / ENV_FILE
    pacs = (PACS_LOCATION, *PACS_CREDENTIALS)
    lines = ["# Written by 'cxr-screen stack up', removed by 'stack down': source it to point Prefect and boto3",
             "# at the stack.",
             *(f"export {key}={shlex.quote(value)}" for key, value in environment.items()
               if key != "PREFECT_HOME" and key not in pacs)]
    if PACS_LOCATION in environment:
        lines += [(f'# The stack\'s PACS (Orthanc): screen from it with CXR_INCOMING="${PACS_LOCATION}", deliver to '
                   f'it with CXR_SCREEN_DELIVER_TO="${PACS_LOCATION}".'),
                  *(f"export {key}={shlex.quote(environment[key])}" for key in pacs),
                  "unset CXR_DICOMWEB_TOKEN  # another PACS's: store/dicomweb.py would send it instead"]
    if signing_key is not None:  # what training and screening run by hand sign and check the stack's models with
        lines.append(f'export {SIGNING_KEY_VARIABLE}="$(cat {shlex.quote(str(signing_key))})"')
    stack_secrets.write_text(path, "\n".join(lines) + "\n")
    return path


def _size(count: float) -> str:
    if count < 1000:
        return f"{count:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        count /= 1000
        if count < 1000 or unit == "GB":
            break
    return f"{count:.1f} {unit}"


def stored_data(folder: Path) -> str | None:
    """The local S3's stored data in words (buckets, objects, bytes, when saved), or None."""
    try:
        summary = read_summary(folder.resolve() / S3_DATA)
    except stored_json.StoredStateError as error:
        return f"unknown: its summary cannot be read ({error})"
    if summary is None:
        return None
    buckets = ", ".join(f"{name} ({bucket['objects']} object(s), {_size(bucket['bytes'])})"
                        for name, bucket in sorted(summary["buckets"].items())) or "no buckets"
    return f"{buckets}; saved {summary['saved_at']}"


def status(folder: Path) -> dict[str, bool]:
    """Each recorded process and whether it runs; {} when no stack is recorded. StackStateError
    when ``stack.json`` is not trusted or damaged."""
    state = _read_state(folder)
    return {} if state is None else {name: _alive(entry) for name, entry in state["processes"].items()}


def up(folder: Path, settings: Settings, port: int = 4200, s3_port: int = 5000, start_s3: bool | None = None,
       echo: Callable[[str], None] = print, workers: int = 0, dask_port: int = 8786, s3_only: bool = False,
       database: str = "sqlite", database_url: str | None = None, database_port: int = 5432, pacs: bool = False,
       pacs_port: int = 8042, pacs_dicom_port: int = 4242) -> dict:
    """Start the stack and deploy; returns its state (processes, environment, UI address, the
    client environment's file).

    ``workers``: also a Dask scheduler on ``dask_port`` and this many Dask worker processes, which
    nightly screening fans its chunks out to (``CXR_DASK_ADDRESS``); 0: chunks run in the flow's process.
    ``s3_only``: start the local S3 alone (no Prefect server, workers or deployments).
    ``database``: Prefect's database: "sqlite" (a file in the folder) or "postgres", a PostgreSQL
    server started on 127.0.0.1:``database_port`` with its cluster in ``<folder>/postgres``, or the
    one ``database_url`` names (postgresql://user:password@host:port/database).
    ``pacs``: also Orthanc, the site's local PACS, with DICOMweb on ``pacs_port`` and DICOM on
    ``pacs_dicom_port``, its studies in ``<folder>/orthanc``.
    """
    folder = folder.resolve()
    if folder.is_dir():
        stack_secrets.trusted_folder(folder)
    if any(status(folder).values()):
        raise ValueError(f"a stack is already running from {folder}: stop it first (cxr-screen stack down)")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, not {workers}")
    if database not in ("sqlite", "postgres"):
        raise ValueError(f"database must be sqlite or postgres, not {database!r}")
    server_database = {}
    if database_url:  # implies postgres
        database = "postgres"
        server_database["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = postgres.asyncpg_url(database_url)
    elif database == "postgres" and not s3_only:
        try:
            postgres.require()
        except postgres.PostgresError as error:
            raise ValueError(str(error)) from None
    if s3_only and pacs:
        raise ValueError("--s3-only starts the local S3 alone: leave out --pacs")
    if s3_only and (workers or os.environ.get("AWS_ENDPOINT_URL")):
        raise ValueError("--s3-only starts the local S3 alone: " + (
            f"leave out --workers {workers}" if workers
            else f"AWS_ENDPOINT_URL names another endpoint ({os.environ['AWS_ENDPOINT_URL']}): unset it"))
    dask_address = f"tls://127.0.0.1:{dask_port}"
    if workers and (settings.screen_workers is not None or settings.dask_address not in (None, dask_address)):
        given = (f"CXR_SCREEN_WORKERS={settings.screen_workers}" if settings.screen_workers is not None
                 else f"CXR_DASK_ADDRESS={settings.dask_address}")
        raise ValueError(f"{given} is set, and --workers {workers} starts the Dask cluster nightly screening "
                           f"uses: unset it, or leave out --workers")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stack_secrets.trusted_folder(folder)
    folder.chmod(0o700)  # also one an older stack, or the user, made readable: it holds the keys
    uses_s3 = any(s3.bucket_of(uri) for uri in (settings.incoming, settings.results, settings.model_store,
                                                 settings.dataset))
    if s3_only:
        start_s3 = True
    elif start_s3 is None:
        start_s3 = uses_s3 and not os.environ.get("AWS_ENDPOINT_URL")
    if pacs:  # refused before anything starts
        _require_pacs(pacs_port, pacs_dicom_port, {
            "--port": port, "--s3-port": s3_port if start_s3 else None, "--dask-port": dask_port if workers else None,
            "--database-port": database_port if database == "postgres" and not database_url else None})
    ui = f"http://127.0.0.1:{port}"
    api = f"{ui}/api"
    environment = {} if s3_only else {"PREFECT_API_URL": api, "PREFECT_HOME": str(folder / "prefect"),
                                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                      "PREFECT_API_AUTH_STRING": stack_secrets.api_auth(folder)}
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"
    environment.update(loopback_unproxied(os.environ))
    if start_s3:
        s3_keys = stack_secrets.s3_credentials(folder)
        environment.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}", AWS_ACCESS_KEY_ID=s3_keys.access_key_id,
                           AWS_SECRET_ACCESS_KEY=s3_keys.secret_access_key, AWS_DEFAULT_REGION="us-east-1")
    if workers:
        # Read by the deploy step (nightly-screening's parameters), by 'cxr-screen deploy' here, and
        # exported with the rest for commands run by hand.
        environment["CXR_DASK_ADDRESS"] = dask_address
        environment["CXR_DASK_TLS"] = str(folder / DASK_TLS)  # the client certificate the flow runs connect with
    # Servers get no signing key; what signs or checks bundles (process workers, Dask workers) does.
    child_environment = {key: value for key, value in worker_environment(os.environ).items()
                         if key != SIGNING_KEY_VARIABLE}
    child_environment.update(environment)
    if settings.train_require_approval is None:
        # The stack's retrain runs on events: what it trains waits for a person ('cxr-screen models
        # promote') unless the site says otherwise (CXR_TRAIN_REQUIRE_APPROVAL=false).
        child_environment["CXR_TRAIN_REQUIRE_APPROVAL"] = "true"
    key_file = None if os.environ.get(SIGNING_KEY_VARIABLE) else folder / SIGNING_KEY
    signing_environment = {**child_environment,
                           SIGNING_KEY_VARIABLE: os.environ.get(SIGNING_KEY_VARIABLE) or stack_secrets.signing_key(folder)}
    echo(f"Models are signed with {SIGNING_KEY_VARIABLE} from the environment" if key_file is None
         else f"Models are signed with the stack's key, {key_file}")
    pacs_server = _configure_pacs(folder, pacs_port, pacs_dicom_port) if pacs else None
    if pacs_server:
        # What reads or delivers to the PACS (the workers) gets its credentials, in place of another
        # PACS's token; the servers and the deploy step do not.
        environment.update(_pacs_environment(pacs_server))
        signing_environment = {**{key: value for key, value in signing_environment.items() if key != "CXR_DICOMWEB_TOKEN"},
                               **_pacs_environment(pacs_server)}
    if not s3_only:
        Path(environment["PREFECT_HOME"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        Path(environment["PREFECT_HOME"]).chmod(0o700)  # also one an older stack made readable
    processes: dict[str, dict] = {}
    state = {"folder": str(folder), "ui": None if s3_only else ui,
             "environment": environment, "processes": processes}
    if pacs_server:
        state["pacs"] = {"dicomweb": pacs_server.dicomweb, "dicom": pacs_server.dimse,
                         "password_file": str(folder / PACS_PASSWORD)}

    def record(name: str, process: subprocess.Popen, stop_signal: str = "SIGTERM", command: list | None = None) -> None:
        processes[name] = {"pid": process.pid, "command": [os.fsdecode(part) for part in command or process.args],
                           "log": str(folder / "logs" / f"{name}.log"), "signal": stop_signal}
        stack_secrets.write_text(folder / STATE, json.dumps(state, indent=2))  # after each start: down works mid-way too

    try:
        if start_s3:
            echo(f"Starting moto S3 on 127.0.0.1:{s3_port}, its data in {folder / S3_DATA}")
            moto = _start(folder, "s3", [sys.executable, "-m", "deployments.s3_server", "--host", "127.0.0.1",
                                         "--port", str(s3_port), "--state", str(folder / S3_DATA),
                                         "--credentials", str(folder / S3_CREDENTIALS)],
                          server_environment("s3", child_environment))
            record("s3", moto)
            _wait_for(f"http://127.0.0.1:{s3_port}/", "moto", moto, folder / "logs" / "s3.log")
        if s3_only:
            state["env_file"] = str(_write_client_environment(folder, environment, key_file))
            return state
        if pacs_server:
            _start_orthanc(folder, pacs_server, child_environment, record, echo)
        if database == "postgres" and not database_url:
            server_database = _start_postgres(folder, database_port, child_environment, record, echo)
        state["database"] = ("SQLite, in " + str(folder / "prefect") if database == "sqlite" else
                             "PostgreSQL, " + ("as configured" if database_url else f"on 127.0.0.1:{database_port}"))
        echo(f"Starting Prefect server on 127.0.0.1:{port}")
        server = _start(folder, "server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                           "--port", str(port)],
                        {**server_environment("server", child_environment), **_api_protection(environment, ui),
                         **server_database})
        record("server", server)
        _wait_for(f"{api}/health", "Prefect server", server, folder / "logs" / "server.log")
        dask = (_start_dask(folder, workers, dask_port, child_environment, signing_environment, record, echo)
                if workers else {})
        echo("Creating work pools and deploying")
        with _private_log(folder / "logs" / "deploy.log") as log:
            subprocess.run([sys.executable, "-m", "cli.deploy", *(["--buckets"] if start_s3 else [])],
                           env=child_environment, cwd=PROJECT_DIR, check=True, stdout=log, stderr=subprocess.STDOUT)
        for pool in (settings.cpu_pool, settings.gpu_pool):
            echo(f"Starting a process worker for pool {pool}")
            worker = _start(folder, f"worker-{pool}", [sys.executable, "-m", "prefect", "worker", "start",
                                                       "--pool", pool, "--type", "process",
                                                       "--name", f"{pool}-worker"], signing_environment)
            record(f"worker-{pool}", worker)
        if workers:
            _wait_for_dask(folder, dask, workers)
        state["env_file"] = str(_write_client_environment(folder, environment, key_file))
    except Exception as error:  # whatever stopped it, nothing it started is left running
        down(folder)
        raise RuntimeError(f"stack did not start: {error}") from error
    return state


def _start_postgres(folder: Path, port: int, environment: dict, record: Callable,
                    echo: Callable[[str], None]) -> dict[str, str]:
    """The stack's PostgreSQL server, its cluster made the first time; returns the Prefect server's
    setting that points it there (the URL holds the password: it goes to that server alone)."""
    password, data = stack_secrets.postgres_password(folder), folder / POSTGRES_DATA
    if postgres.initialize(data, password):
        echo(f"Made a PostgreSQL database cluster in {data}")
    echo(f"Starting PostgreSQL on 127.0.0.1:{port}, its data in {data}")
    postgres.require_free_port(port)
    command = postgres.server_command(data, port)
    process = _start(folder, "postgres", postgres.as_started(command), server_environment("postgres", environment))
    record("postgres", process, stop_signal="SIGINT", command=command)  # the command line it runs with
    postgres.wait_until_ready(password, port, process, folder / "logs" / "postgres.log")
    return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.connection_url(password, port)}


def _require_pacs(http_port: int, dicom_port: int, others: dict[str, int | None]) -> None:
    """ValueError, in one line, unless Orthanc is installed and its two ports are its own: free on
    every address (Orthanc cannot bind to one), apart, and none that the stack's other servers
    (``others``, an option: its port, None for a server not started) will take."""
    ports = {http_port: "--pacs-port", dicom_port: "--pacs-dicom-port"}
    taken = {port: option for option, port in others.items() if port is not None}
    calling = os.environ.get("CXR_DICOM_CALLING_AET", "CXRSCREEN")
    if not re.fullmatch(r"[ -~]{1,16}", calling) or calling.strip() != calling or "\\" in calling:
        raise ValueError(f"CXR_DICOM_CALLING_AET {calling!r} is not an AE title (1 to 16 printable characters, "
                         "no backslash, no leading or trailing space)")
    try:
        orthanc.require(ports)
    except orthanc.OrthancError as error:
        raise ValueError(str(error)) from None
    if http_port == dicom_port:
        raise ValueError(f"--pacs-port and --pacs-dicom-port are both {http_port}: choose two ports")
    for port, option in ports.items():
        if port in taken:
            raise ValueError(f"{option} {port} is the stack's {taken[port]} too: choose another port")


def _configure_pacs(folder: Path, http_port: int, dicom_port: int) -> orthanc.Orthanc:
    """Orthanc's configuration in ``<folder>/orthanc``, with the stack's user and kept password; DICOM
    stores from the AE title the workers deliver with (store/dimse.py's), on 127.0.0.1 alone."""
    return orthanc.configure(folder / PACS_DATA, http_port, dicom_port, PACS_USER, stack_secrets.pacs_password(folder),
                             (os.environ.get("CXR_DICOM_CALLING_AET", "CXRSCREEN"),))


def _pacs_environment(server: orthanc.Orthanc) -> dict[str, str]:
    """Where the stack's PACS answers, and its credentials as store/dicomweb.py reads them."""
    return {PACS_LOCATION: server.dicomweb, PACS_CREDENTIALS[0]: server.user, PACS_CREDENTIALS[1]: server.password}


def _start_orthanc(folder: Path, server: orthanc.Orthanc, environment: dict, record: Callable,
                   echo: Callable[[str], None]) -> None:
    """The stack's PACS, once it answers with its credentials."""
    echo(f"Starting Orthanc (the site's PACS): DICOMweb on port {server.http_port}, DICOM on port {server.dicom_port} "
         f"(AE title {server.aet}), its studies in {server.folder}. Orthanc 1.10 cannot bind to one address: it listens "
         "on every interface and refuses other machines (HTTP 403; DICOM only from known AE titles on 127.0.0.1)")
    process = _start(folder, "orthanc", server.command(), server_environment("orthanc", environment))
    record("orthanc", process)
    orthanc.wait_until_ready(server, process, folder / "logs" / "orthanc.log")


def _api_protection(environment: dict[str, str], ui: str) -> dict[str, str]:
    """The Prefect server's side of the API's protection: every call but the health check needs the
    credentials (HTTP Basic); a changing call needs a CSRF token as well, which Prefect's clients and
    UI fetch by themselves and a cross-site form cannot; and only the UI's own origin may call it
    from a browser (CORS)."""
    return {"PREFECT_SERVER_API_AUTH_STRING": environment["PREFECT_API_AUTH_STRING"],
            "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true", "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ui}


def _start_dask(folder: Path, workers: int, port: int, environment: dict, signing_environment: dict,
                record: Callable, echo: Callable[[str], None]) -> dict[str, subprocess.Popen]:
    """A scheduler, once it listens, and ``workers`` worker processes (one thread each: one chunk at
    a time), all on 127.0.0.1, with the stack's client environment (Prefect API, S3) and the project
    on their path: chunks arrive as references to its modules, which the scheduler too unpickles.
    The workers, which load and check models, also get the signing key (``signing_environment``).
    The workers' thread pools are sized so that they share the cores."""
    from flows.dask_tls import make_certificates
    from flows.fan_out import local_worker_environment

    address = f"tls://127.0.0.1:{port}"
    # Mutual TLS: a process without a certificate of this CA cannot connect, and so cannot run code in
    # the workers (which hold the keys). Made once, kept across restarts; the CA's key is not kept.
    certificates = make_certificates(folder / DASK_TLS)
    echo(f"Starting a Dask scheduler on {address} and {workers} Dask worker process(es), TLS with the certificates "
         f"in {folder / DASK_TLS}")
    path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR), environment.get("PYTHONPATH")]))}
    environment, signing_environment = {**environment, **path}, {**signing_environment, **path}
    scheduler_file = folder / "dask" / "scheduler.json"
    scheduler_file.parent.mkdir(exist_ok=True)
    scheduler_file.unlink(missing_ok=True)  # an earlier stack's
    started = {"dask-scheduler": _start(folder, "dask-scheduler", [
        sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
        # --no-dashboard still serves HTTP (health, metrics, logs) on 0.0.0.0: bind it to loopback too.
        "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file),
        *certificates.scheduler_arguments()],
        server_environment("dask-scheduler", environment))}
    record("dask-scheduler", started["dask-scheduler"])
    _wait_for_dask(folder, started)  # a port taken fails here, before anything is deployed
    for number in range(1, workers + 1):
        name = f"dask-worker-{number}"
        started[name] = _start(folder, name, [
            sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name, "--host", "127.0.0.1",
            "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
            "--local-directory", str(folder / "dask"), *certificates.worker_arguments()],
            {**signing_environment, **local_worker_environment(workers)})
        record(name, started[name])
    return started


def down(folder: Path, timeout: float = 30) -> list[str]:
    """Stop every process ``up`` started from ``folder`` (the S3 server saves its data as it stops)
    and remove the client environment's file; returns the processes' names. StackStateError, and
    nothing stopped, when ``stack.json`` is not trusted or damaged."""
    folder = folder.resolve()
    state = _read_state(folder)
    (folder / ENV_FILE).unlink(missing_ok=True)
    if state is None:
        return []
    stopped = []
    # Workers first, the servers and S3 after, so runs in flight can report their end. Each wave is
    # signalled at once and waited for once: a wave takes as long as its slowest process, not the sum.
    entries = list(state["processes"].items())
    workers = [(name, entry) for name, entry in entries if name.startswith(("worker-", "dask-worker-"))]
    database = [(name, entry) for name, entry in entries if name == "postgres"]  # after the server that uses it
    for wave in (workers, [item for item in entries if item not in workers + database], database):
        signalled = []
        for name, entry in reversed(wave):
            if not _alive(entry):
                continue
            try:
                os.killpg(entry["pid"], signal.Signals[entry.get("signal", "SIGTERM")])
            except ProcessLookupError:
                continue
            signalled.append((name, entry))
        deadline = time.monotonic() + timeout
        while any(_alive(entry) for _, entry in signalled) and time.monotonic() < deadline:
            time.sleep(0.2)
        for name, entry in signalled:
            if _alive(entry):
                os.killpg(entry["pid"], signal.SIGKILL)
            stopped.append(name)
    (folder / STATE).unlink()
    return stopped


def wipe(folder: Path) -> list[str]:
    """Remove a stopped stack's stored state: the local S3's data and Prefect's database (the run
    history, whose artifacts link to that data), the PACS's studies, and Dask's scratch space; the
    logs and the credentials stay. Returns what was removed, in words."""
    folder = folder.resolve()
    if any(status(folder).values()):
        raise ValueError(f"the stack in {folder} is running: stop it first")
    removed = []
    for name, what in ((S3_DATA, "S3 data"), ("prefect", "Prefect's database (flow runs, logs, artifacts)"),
                       (POSTGRES_DATA, "Prefect's PostgreSQL database (flow runs, logs, artifacts)"),
                       (PACS_DATA, "the PACS's studies (Orthanc)"), ("dask", "Dask scratch space")):
        path = folder / name
        if not path.exists():
            continue
        if name == S3_DATA:
            what += f": {stored_data(folder) or 'no snapshot'}"
        shutil.rmtree(path)
        removed.append(f"{what}, in {path}")
    return removed
