"""A `cxr-screen` command leaves no process behind: not when it ends, not when it is killed with SIGKILL.

Real processes: the command line starts Prefect's temporary API server (no PREFECT_API_URL, its own
PREFECT_HOME); the killed run is held up on an S3 endpoint that accepts connections and never answers,
as a stalled storage would, so that the kill lands while the server is up and in use.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.lifeline import MARK

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")]

SERVER_START_SECONDS = 240  # a first start migrates a new database; slow on a busy 2-core machine
CLEANUP_SECONDS = 15


@dataclass(frozen=True)
class Process:
    pid: int
    started: int  # clock ticks after boot: a pid reused by a later process has another value
    command: list[str]

    def alive(self) -> bool:
        found = _stat(self.pid)
        return found is not None and found[1] == self.started and found[2] != "Z"

    def environment(self) -> dict[str, str]:
        try:
            raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        except OSError:
            return {}
        return dict(entry.decode(errors="replace").partition("=")[::2] for entry in raw.split(b"\0") if entry)


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name before it may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def children(parent: int) -> list[Process]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _stat(int(name))
        if stat is None or stat[0] != parent:
            continue
        try:
            command = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        found.append(Process(int(name), stat[1], command))
    return found


def carrying(token: str) -> list[int]:
    """Pids of the processes whose environment carries a command line's lifeline token."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and token in Process(int(name), 0, []).environment().get(MARK, "").split():
            pids.append(int(name))
    return pids


def answers(port: int) -> bool:
    try:
        # A server busy with the flow's first calls can take seconds to answer on a loaded 2-core machine.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def server_port(server: Process) -> int:
    return int(server.command[server.command.index("--port") + 1])


def command_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_API_", "AWS_")) and name != MARK}
    environment.update(PREFECT_HOME=str(tmp_path / "prefect-home"), **extra)
    return environment


def cxr_screen() -> str:
    found = shutil.which("cxr-screen", path=str(Path(sys.executable).parent))
    assert found, "the cxr-screen entry point is not installed in this environment"
    return found


@pytest.fixture
def stalled_s3():
    """An S3 endpoint that accepts connections (the kernel does) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_command_line_takes_its_prefect_server_with_it(tmp_path, stalled_s3, signum):
    """SIGKILL runs no atexit handler; SIGTERM ends Python without one too, unless Prefect catches it."""
    environment = command_environment(tmp_path, AWS_ENDPOINT_URL=stalled_s3, AWS_ACCESS_KEY_ID="testing",
                                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    log = tmp_path / "cli.log"
    with open(log, "wb") as output:
        command = subprocess.Popen([cxr_screen(), "screen", "s3://stalled/incoming", "--results",
                                    str(tmp_path / "results"), "--model-store", "s3://stalled/models"],
                                   env=environment, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        server = None
        while server is None or not answers(server_port(server)):
            assert command.poll() is None, f"the command ended before the test could kill it:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no temporary Prefect server answered:\n{log.read_text()}"
            time.sleep(0.2)
            server = next((p for p in children(command.pid) if any("uvicorn" in word for word in p.command)), None)
        started = children(command.pid)
        token = server.environment()[MARK]
        port = server_port(server)
        time.sleep(1.0)  # let the flow reach the stalled storage: the server is in use, not just up
        assert command.poll() is None and answers(port)

        command.send_signal(signum)
        try:
            command.wait(timeout=CLEANUP_SECONDS + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the command still runs {CLEANUP_SECONDS + 60} s after {signum.name}:\n{log.read_text()[-3000:]}")
        killed_at = time.monotonic()
        while server.alive() or port_open(port):
            assert time.monotonic() - killed_at < CLEANUP_SECONDS, (
                f"the temporary server (pid {server.pid}) still runs {CLEANUP_SECONDS} s after {signum.name}")
            time.sleep(0.05)
        print(f"server gone and port {port} closed {time.monotonic() - killed_at:.2f} s after {signum.name}")
        while any(process.alive() for process in started):  # the watchdog too, once its work is done
            assert time.monotonic() - killed_at < CLEANUP_SECONDS, [p for p in started if p.alive()]
            time.sleep(0.05)
        assert carrying(token) == []
        if signum == signal.SIGKILL:  # the watchdog says what it had to stop
            assert "ended and left 1 process(es) running" in log.read_text()
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


SWALLOWED = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from cli.signals import resend_signals_lost_in_destructors
if {hook}:
    resend_signals_lost_in_destructors()

class TerminationSignal(BaseException):  # Prefect's, by name and shape
    def __init__(self, signal):
        self.signal = signal

def handler(signum, frame):
    raise TerminationSignal(signum)

signal.signal(signal.SIGTERM, handler)

class Transport:
    def __del__(self):  # the signal arrives while a destructor runs, as with asyncio's transports
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):
            pass

Transport()
time.sleep(5)
print("went on")
"""


@pytest.mark.parametrize("hook", [True, False], ids=["with the hook", "without"])
def test_a_termination_signal_a_destructor_swallowed_is_sent_again(hook):
    """Python drops an exception raised in a destructor, Prefect's TerminationSignal included: without
    cli.signals' hook, SIGTERM landing there is ignored and the command goes on."""
    script = SWALLOWED.format(root=str(Path(__file__).resolve().parents[1]), hook=hook)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert "Exception ignored in" in done.stderr  # the destructor swallowed it, as it does in the wild
    if hook:
        assert done.returncode != 0 and "went on" not in done.stdout and time.monotonic() - began < 4, done
        assert done.stderr.rstrip().endswith("TerminationSignal: 15"), done.stderr[-500:]
    else:
        assert done.returncode == 0 and "went on" in done.stdout  # what the hook is for


def test_a_command_that_ends_leaves_nothing_running(tmp_path):
    """It ends with an error (there is no model), after its temporary server has served a flow run."""
    log = tmp_path / "cli.log"
    with open(log, "wb") as output:
        command = subprocess.Popen([cxr_screen(), "screen", str(tmp_path / "incoming"), "--results",
                                    str(tmp_path / "results"), "--model-store", str(tmp_path / "no-models")],
                                   env=command_environment(tmp_path), stdout=output, stderr=subprocess.STDOUT)
    seen: dict[int, Process] = {}
    tokens: set[str] = set()
    deadline = time.monotonic() + SERVER_START_SECONDS
    while command.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        for process in children(command.pid):
            seen.setdefault(process.pid, process)
            tokens.update(process.environment().get(MARK, "").split())
        time.sleep(0.02)
    ended_at = time.monotonic()
    assert command.returncode == 3, log.read_text()  # input or configuration: no production model
    servers = [p for p in seen.values() if any("uvicorn" in word for word in p.command)]
    assert servers, f"no temporary server was started, so this proves nothing:\n{log.read_text()}"
    assert tokens, "the server did not carry the command line's lifeline token"
    while any(process.alive() for process in seen.values()):
        assert time.monotonic() - ended_at < 10, [p for p in seen.values() if p.alive()]
        time.sleep(0.05)
    print(f"all {len(seen)} child process(es) gone {time.monotonic() - ended_at:.2f} s after the command ended")
    assert all(carrying(token) == [] for token in tokens)
    assert "ended and left" not in log.read_text()  # Prefect stopped its server itself: the watchdog had nothing to do
