"""The local stack's PostgreSQL server, for Prefect's database when SQLite will not do (several
workers, nightly screening and retraining at once: SQLite locks the whole database per write).

Debian's ``postgresql`` package provides the programs; the cluster lives in the stack's folder
(``<folder>/postgres``), made once by ``initdb`` and kept across ``stack down``/``up``. It listens
on 127.0.0.1 only, over TCP with no Unix socket (nothing to find in /tmp), and asks every client for
the password the stack generated (SCRAM).

PostgreSQL refuses to run as root. A stack started by root (a container's, a CI machine's) runs it
in a user namespace in which that root is an ordinary account (Debian's ``postgres``, or
``nobody``): its files stay root's on disk, readable by nobody else, and nothing outside the
namespace changes. Where user namespaces are not allowed, root gets a one-line refusal.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

__all__ = ["DATABASE", "USER", "PostgresError", "as_started", "asyncpg_url", "connection_url", "initialize", "require",
           "require_free_port", "server_command", "wait_until_ready"]

USER = "prefect"
DATABASE = "prefect"
INSTALL_HINT = "install Debian's PostgreSQL (apt-get install postgresql)"


class PostgresError(RuntimeError):
    """PostgreSQL is missing, cannot run here, or did not start; the message is one line."""


def _programs() -> Path:
    """The folder of ``initdb`` and ``postgres``: on PATH, or Debian's newest /usr/lib/postgresql/N/bin
    (which Debian keeps off PATH)."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    if not versions:
        raise PostgresError(f"PostgreSQL's server programs (initdb, postgres) are not installed: {INSTALL_HINT}, "
                            "or give --database-url for a server the site runs")
    return versions[-1].parent


def require() -> None:
    """PostgresError unless this user can run PostgreSQL's server here."""
    _programs()
    if os.geteuid() == 0:
        done = subprocess.run(_as_ordinary_user(["true"]), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PostgresError("PostgreSQL's server refuses to run as root, and this machine does not let root run "
                                f"it in a user namespace ({(done.stderr.strip() or 'unshare failed').splitlines()[-1]}):"
                                " start the stack as an ordinary user, or give --database-url for a server the site runs")


def _as_ordinary_user(command: list[str]) -> list[str]:
    """``command``, as root in a user namespace where root is an ordinary account (initdb looks
    the account up, so it must exist); unchanged for anyone else. ``unshare`` execs the command:
    its pid and command line are the command's own."""
    if os.geteuid() != 0:
        return command
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
            break
        except KeyError:
            continue
    else:
        raise PostgresError("no 'postgres' or 'nobody' account to run PostgreSQL's server as, instead of root")
    return [shutil.which("unshare") or "unshare", "--user", f"--map-user={account.pw_uid}",
            f"--map-group={account.pw_gid}", *command]


def initialize(data: Path, password: str) -> bool:
    """A cluster in ``data`` (0700) whose superuser ``prefect`` logs in with ``password``; False
    when one is there already (its data and password are kept)."""
    if (data / "PG_VERSION").exists():
        return False
    programs = _programs()
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    # initdb reads the password from a file, never from its command line (others can read that).
    with tempfile.NamedTemporaryFile("w", dir=data.parent, prefix=".pwfile-", delete=True) as handle:
        handle.write(password + "\n")
        handle.flush()
        done = subprocess.run(_as_ordinary_user([str(programs / "initdb"), "--pgdata", str(data), "--username", USER,
                                                 "--pwfile", handle.name, "--auth", "scram-sha-256", "--encoding",
                                                 "UTF8", "--no-locale", "--no-instructions"]),
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        problem = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise PostgresError(f"initdb could not make the database cluster in {data}: {problem}")
    return True


def server_command(data: Path, port: int) -> list[str]:
    """``postgres`` serving ``data`` on 127.0.0.1:``port``, TCP only: what to start (for root, in a
    user namespace) is ``as_started(command)``."""
    return [str(_programs() / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-c", "unix_socket_directories=",
            # The stack's database: its only clients are the Prefect server's connection pools.
            "-c", "max_connections=100", "-c", "password_encryption=scram-sha-256"]


def as_started(command: list[str]) -> list[str]:
    """What starts ``command`` here (as root: in a user namespace, ``_as_ordinary_user``)."""
    return _as_ordinary_user(command)


def require_free_port(port: int) -> None:
    """PostgresError when something listens on 127.0.0.1:``port`` already (a site's own PostgreSQL
    on 5432, say): the stack would otherwise log in to that one."""
    import socket

    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise PostgresError(f"127.0.0.1:{port} is taken (another PostgreSQL server?): choose --database-port")


def connection_url(password: str, port: int, host: str = "127.0.0.1") -> str:
    """The URL Prefect's server connects with (SQLAlchemy, asyncpg)."""
    return f"postgresql+asyncpg://{USER}:{urllib.parse.quote(password, safe='')}@{host}:{port}/{DATABASE}"


def asyncpg_url(url: str) -> str:
    """``url`` (postgresql:// or postgresql+asyncpg://) in the form Prefect's server needs; ValueError otherwise."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"--database-url must be a postgresql:// URL, not {re.sub(r'//[^@/]*@', '//***@', url)!r}")
    return f"postgresql+asyncpg://{rest}"


def wait_until_ready(password: str, port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until the server takes connections, then make the ``prefect`` database if it is not there."""
    import asyncio

    import asyncpg

    async def ready() -> None:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise PostgresError(f"PostgreSQL exited with code {process.returncode}; see {log}")
            try:
                connection = await asyncpg.connect(host="127.0.0.1", port=port, user=USER, password=password,
                                                   database="postgres", timeout=5)
                break
            except asyncpg.InvalidAuthorizationSpecificationError as error:  # a wrong password, or not ours
                raise PostgresError(f"the PostgreSQL server on 127.0.0.1:{port} refused the stack's password ({error}):"
                                    f" if another server uses that port, choose --database-port; see {log}") from None
            except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as error:
                if time.monotonic() > deadline:
                    raise PostgresError(f"PostgreSQL did not take connections on 127.0.0.1:{port} within "
                                        f"{timeout:.0f} s ({error}); see {log}") from None
                await asyncio.sleep(0.3)
        try:
            if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await connection.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await connection.close()

    asyncio.run(ready())
