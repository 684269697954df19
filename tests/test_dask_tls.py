"""flows/dask_tls.py: the certificate files it writes, and a real Dask scheduler and worker
started with its flags, which serve a client holding our client certificate and refuse one
without TLS, without a certificate, or with a certificate from another CA."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from distributed import Client

from flows.dask_tls import DaskCertificates, DaskTLSError, make_certificates

STARTUP_SECONDS = 60


def test_files_are_private_and_reused(tmp_path):
    folder = tmp_path / "state" / "dask-tls"
    certificates = make_certificates(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in certificates.files()} == {0o600}
    assert sorted(path.name for path in folder.iterdir()) == sorted(path.name for path in certificates.files())
    before = {path: path.read_bytes() for path in certificates.files()}

    assert make_certificates(folder) == certificates
    assert {path: path.read_bytes() for path in certificates.files()} == before


@pytest.mark.parametrize("damage", ["missing key", "corrupt certificate"])
def test_a_damaged_set_is_replaced_whole(tmp_path, damage):
    certificates = make_certificates(tmp_path / "tls")
    before = {path: path.read_bytes() for path in certificates.files()}
    if damage == "missing key":
        certificates.worker_key.unlink()
    else:
        certificates.client_cert.write_bytes(before[certificates.client_cert][:-40])

    make_certificates(tmp_path / "tls")
    # No CA key is kept, so nothing can sign a lone replacement: every file is new.
    assert all(path.read_bytes() != before[path] for path in certificates.files())


def test_a_new_host_makes_a_new_set(tmp_path):
    certificates = make_certificates(tmp_path / "tls")
    before = certificates.ca_file.read_bytes()
    make_certificates(tmp_path / "tls", hosts=("10.0.0.5", "screening.internal"))
    assert certificates.ca_file.read_bytes() != before


@pytest.mark.parametrize("loosen", ["chmod 0644", "symlink", "folder 0755"])
def test_an_untrusted_file_is_refused_by_name(tmp_path, loosen):
    folder = tmp_path / "tls"
    certificates = make_certificates(folder)
    if loosen == "chmod 0644":
        culprit = certificates.client_key
        culprit.chmod(0o644)
    elif loosen == "symlink":
        culprit = certificates.ca_file
        (tmp_path / "elsewhere.pem").write_bytes(culprit.read_bytes())
        culprit.unlink()
        culprit.symlink_to(tmp_path / "elsewhere.pem")
    else:
        culprit = folder
        folder.chmod(0o755)
    before = {path: path.read_bytes() for path in certificates.files()}

    with pytest.raises(DaskTLSError, match=str(culprit)) as raised:
        make_certificates(folder)
    assert "\n" not in str(raised.value)
    assert {path: path.read_bytes() for path in certificates.files()} == before  # nothing replaced


@dataclass(frozen=True)
class Cluster:
    certificates: DaskCertificates
    scheduler_address: str
    worker_address: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment_without_dask() -> dict[str, str]:
    """This environment minus DASK_ settings, so a developer's own do not change what is tested."""
    return {name: value for name, value in os.environ.items() if not name.startswith("DASK_")}


def _start(arguments: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as stream:
        # Own session: stopping its process group also stops the worker's nanny's child process.
        return subprocess.Popen([sys.executable, "-m", *arguments], stdout=stream, stderr=subprocess.STDOUT,
                                env=_environment_without_dask(), start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_for_file(path: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while not path.exists():
        assert process.poll() is None, f"the scheduler exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no scheduler file after {STARTUP_SECONDS} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A scheduler and one worker, each in its own process with the flags of dask_tls."""
    folder = tmp_path_factory.mktemp("dask-tls-cluster")
    certificates = make_certificates(folder / "tls")
    port = _free_port()
    scheduler_file = folder / "scheduler.json"
    processes = []
    try:
        processes.append(_start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                                 "--scheduler-file", str(scheduler_file), *certificates.scheduler_arguments()],
                                folder / "scheduler.log"))
        _wait_for_file(scheduler_file, processes[0], folder / "scheduler.log")
        address = f"tls://127.0.0.1:{port}"
        assert json.loads(scheduler_file.read_text())["address"] == address
        processes.append(_start(["distributed.cli.dask_worker", address, "--host", "127.0.0.1", "--nworkers", "1",
                                 "--nthreads", "1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                                 *certificates.worker_arguments()], folder / "worker.log"))
        with Client(address, security=certificates.security(), timeout=30, set_as_default=False) as client:
            try:
                client.wait_for_workers(1, timeout=STARTUP_SECONDS)
            except TimeoutError:
                pytest.fail(f"no worker joined: {(folder / 'worker.log').read_text()[-3000:]}")
            [worker_address] = client.scheduler_info()["workers"]
        yield Cluster(certificates, address, worker_address)
    finally:
        for process in reversed(processes):
            _stop(process)


# Run in a fresh process with only client_environment(): what the stack's flow processes will do.
_CLIENT_SCRIPT = """
import json, sys
from distributed import Client, Security
security = Security()
print(json.dumps({"require_encryption": security.require_encryption, "ca_file": security.tls_ca_file,
                  "cert": security.tls_client_cert, "key": security.tls_client_key}))
with Client(sys.argv[1], timeout=30, set_as_default=False) as client:
    print(client.submit(sum, [1, 2]).result())
"""


@pytest.mark.slow
def test_client_environment_runs_a_task(cluster):
    certificates = cluster.certificates
    assert cluster.worker_address.startswith("tls://127.0.0.1:")  # workers serve TLS only, too
    done = subprocess.run([sys.executable, "-c", _CLIENT_SCRIPT, cluster.scheduler_address], capture_output=True,
                          check=False, text=True, timeout=90, env=_environment_without_dask() | certificates.client_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    settings, result = done.stdout.splitlines()[-2:]
    assert json.loads(settings) == {"require_encryption": True, "ca_file": str(certificates.ca_file),
                                    "cert": str(certificates.client_cert), "key": str(certificates.client_key)}
    assert result == "3"


@pytest.mark.slow
def test_plain_tcp_client_is_refused(cluster):
    with pytest.raises(OSError):
        Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout=5, set_as_default=False)


@pytest.mark.slow
def test_client_with_another_cas_certificate_is_refused(cluster, tmp_path):
    stranger = make_certificates(tmp_path / "another-ca")
    # Refused at both ends: this client rejects the scheduler's certificate too. That the scheduler
    # alone refuses such a client is test_servers_require_a_certificate_from_our_ca.
    with pytest.raises(OSError):
        Client(cluster.scheduler_address, security=stranger.security(), timeout=5, set_as_default=False)


def _first_bytes(address: str, context: ssl.SSLContext) -> bytes:
    """Connect, finish the handshake and read the peer's first byte (distributed's server speaks
    first). A server that refuses our certificate, or its absence, says so with an alert that
    surfaces here as SSLError: with TLS 1.3 the client's side of the handshake ends before the
    server has checked the client's certificate."""
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw) as connection:
        return connection.recv(1)


def _attacker_context(certificates: DaskCertificates | None = None) -> ssl.SSLContext:
    """A TLS client that trusts any server (an attacker need not check whom it talks to), with the
    client certificate of ``certificates`` or none at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if certificates is not None:
        context.load_cert_chain(certificates.client_cert, certificates.client_key)
    return context


@pytest.mark.slow
@pytest.mark.parametrize("server", ["scheduler", "worker"])
def test_servers_require_a_certificate_from_our_ca(cluster, tmp_path, server):
    """Refused by the server itself, not by distributed's client (which checks the server's
    certificate and will not connect without one of its own)."""
    address = cluster.scheduler_address if server == "scheduler" else cluster.worker_address
    assert _first_bytes(address, _attacker_context(cluster.certificates))  # the control: ours is served
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        _first_bytes(address, _attacker_context())
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
        _first_bytes(address, _attacker_context(make_certificates(tmp_path / "another-ca")))
