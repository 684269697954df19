"""What the command line starts dies with it, even when the command line is killed with SIGKILL.

Prefect runs its temporary API server as a child process and stops it only from an atexit handler,
which SIGKILL, the OOM killer or ``os._exit`` never run: the server then listens on its port for ever.
Prefect 3.9 has nothing for this, and a PR_SET_PDEATHSIG would need a hook into Prefect's Popen (and
fires when the starting *thread* ends). So ``arm()`` puts a random token into this process's
environment, which every process started from here on inherits (Prefect passes ``os.environ`` to its
server), and starts a tiny watchdog that blocks on a pidfd of this process. When this process ends,
however it ends, the watchdog stops every process whose environment carries the token: SIGTERM, then
SIGKILL after a grace period.

Why a token rather than polling /proc for children: nothing runs while the command line lives (no
wake-ups on a busy machine), a server started a moment before the kill or a grandchild is found too,
and a process without the token (the caller's shell, other jobs, other users) can never be chosen:
the token is made here and only flows down to this process's descendants. Descendants that exec with
a scrubbed environment, or fork without exec, are out of its reach; none exists in this project.
Linux only; elsewhere ``arm()`` does nothing.

Run as a script, this module is the watchdog: ``python -I -S lifeline.py PARENT_PID TOKEN`` (isolated
and without site-packages, so it starts in a few milliseconds and imports nothing of ours).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

__all__ = ["MARK", "arm"]

MARK = "CXR_LIFELINE"  # space-separated tokens: a command line started by another one carries both
GRACE_SECONDS = 5.0  # Prefect's own stop waits as long before it kills
_ROUNDS = 3  # a process may start another while it is being stopped: look again, a few times

_watchdog: subprocess.Popen | None = None  # held so that it is not reaped or collected while we live


def arm() -> None:
    """Tie every process this one starts from now on to this process's life."""
    global _watchdog
    if _watchdog is not None or not sys.platform.startswith("linux"):
        return
    token = f"{os.getpid()}-{os.urandom(8).hex()}"
    # The watchdog must outlive us and not be taken for one of ours by an outer command line's watchdog.
    environment = {name: value for name, value in os.environ.items() if name != MARK}
    _watchdog = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), token],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # stderr stays: its one line, if any, says what it had to stop
        start_new_session=True,  # Ctrl-C, a hang-up or a kill of our process group must not reach it
    )
    os.environ[MARK] = " ".join(filter(None, [os.environ.get(MARK), token]))


def _wait_for_end(parent: int) -> None:
    """Return once ``parent`` has ended (at once if it already has)."""
    try:
        handle = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (kernel before 5.3, or a seccomp filter): look once a second
        while os.getppid() == parent:
            time.sleep(1.0)
        return
    try:
        # Orphans are re-parented: if our parent is not ``parent`` now, it had ended before the pidfd
        # was opened, and the pidfd may name a new process that reuses its pid.
        if os.getppid() == parent:
            select.select([handle], [], [])
    finally:
        os.close(handle)


def _carries(pid: int, token: str) -> bool:
    """Whether process ``pid`` started with ``token`` in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            environment = file.read()
    except OSError:  # gone, or not ours to read
        return False
    prefix = MARK.encode() + b"="
    return any(entry.startswith(prefix) and token.encode() in entry[len(prefix):].split()
               for entry in environment.split(b"\0"))


def _marked(token: str) -> dict[int, int | None]:
    """Processes carrying ``token``: pid -> a pidfd held on it (None where pidfds are unavailable)."""
    found: dict[int, int | None] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid() or not _carries(int(name), token):
            continue
        pid = int(name)
        try:
            handle = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except OSError:
            handle = None
        # Checked again now that the pidfd holds it: the pid may have been reused in between.
        if _carries(pid, token):
            found[pid] = handle
        elif handle is not None:
            os.close(handle)
    return found


def _send(pid: int, handle: int | None, signum: int) -> None:
    try:
        if handle is None:
            os.kill(pid, signum)
        else:
            signal.pidfd_send_signal(handle, signum)
    except ProcessLookupError:
        pass


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            words = file.read().split(b"\0")
    except OSError:
        return f"pid {pid}"
    shown = b" ".join(word for word in words[:4] if word).decode(errors="replace")
    return f"pid {pid} ({shown[:80]})"


def _stop_marked(token: str) -> list[str]:
    """SIGTERM, then SIGKILL after the grace period, to each process carrying ``token``."""
    stopped: list[str] = []
    for _ in range(_ROUNDS):
        found = _marked(token)
        if not found:
            break
        stopped += [_describe(pid) for pid in found]
        try:
            for pid, handle in found.items():
                _send(pid, handle, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_SECONDS
            while time.monotonic() < deadline and any(_carries(pid, token) for pid in found):
                time.sleep(0.05)
            for pid, handle in found.items():
                if handle is not None or _carries(pid, token):
                    _send(pid, handle, signal.SIGKILL)  # a pidfd always names the same process
        finally:
            for handle in found.values():
                if handle is not None:
                    os.close(handle)
    return stopped


def _watch(parent: int, token: str) -> None:
    _wait_for_end(parent)
    stopped = _stop_marked(token)
    if stopped:
        try:
            print(f"cxr-screen (pid {parent}) ended and left {len(stopped)} process(es) running; stopped "
                  + "; ".join(stopped), file=sys.stderr, flush=True)
        except OSError:  # nobody reads our stderr any more
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
