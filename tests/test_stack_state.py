"""The local stack trusts only what it made (issue #22): ``stack.json`` is read only when it is this
user's, mode 0600, and whole; a recorded process is stopped only while its full command line is the
one it was started with and it leads its own process group; the signing key is made once, private,
and never printed; ``stack up`` runs only from a folder nobody else can write.

Real processes (``sleep``, started the way the stack starts its own) and real files; no stack is
started, so these take seconds. The stack itself, its key included, is ``tests/test_stack.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments import stack, stack_environment, stack_secrets
from deployments.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def started(process: subprocess.Popen) -> subprocess.Popen:
    """``process`` once its command line shows: Popen returns when exec has begun, and the kernel
    records the new command line a moment later."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/cmdline").read_bytes() != b"sleep\x00300\x00":
        assert time.monotonic() < deadline, "sleep did not start"
        time.sleep(0.01)
    return process


@pytest.fixture
def sleeper():
    """A process of this user's in its own session, as the stack starts each of its own."""
    process = started(subprocess.Popen(["sleep", "300"], start_new_session=True))
    yield process
    process.kill()
    process.wait()


def running(process: subprocess.Popen) -> bool:
    return process.poll() is None


def plant(folder: Path, processes: dict, mode: int = 0o600, text: str | None = None) -> Path:
    path = folder / stack.STATE
    path.write_text(text if text is not None else json.dumps({"folder": str(folder), "environment": {},
                                                              "processes": processes}))
    path.chmod(mode)
    return path


def test_a_process_is_stopped_only_while_its_full_command_line_matches(tmp_path, sleeper):
    # A part of the command line (what the earlier substring marker allowed), another process's
    # command line, and a pid that is not the group it leads: never stopped.
    for command in (["sleep"], ["sleep", "30"], ["sleep", "300", "extra"]):
        plant(tmp_path, {"victim": {"pid": sleeper.pid, "command": command}})
        assert stack.status(tmp_path) == {"victim": False}
        assert stack.down(tmp_path, timeout=5) == []
        assert running(sleeper) and not (tmp_path / stack.STATE).exists()
    # The exact command line: stopped, with its process group.
    plant(tmp_path, {"worker": {"pid": sleeper.pid, "command": ["sleep", "300"]}})
    assert stack.status(tmp_path) == {"worker": True}
    assert stack.down(tmp_path, timeout=5) == ["worker"]
    sleeper.wait(timeout=5)
    assert not running(sleeper)


def test_down_stops_workers_first_and_waits_once_per_wave(tmp_path):
    """Processes that ignore SIGTERM are killed after ``timeout``; a wave's processes are waited
    for together (two stubborn workers and a stubborn server cost two timeouts, not three), and the
    workers are stopped before the server."""
    command = ["sh", "-c", "trap '' TERM; sleep 300"]
    processes = {name: subprocess.Popen(command, start_new_session=True)
                 for name in ("server", "worker-cpu", "dask-worker-1")}
    try:
        for process in processes.values():
            deadline = time.monotonic() + 10
            while Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[:-1] != [os.fsencode(c) for c in command]:
                assert time.monotonic() < deadline, "sh did not start"
                time.sleep(0.01)
        plant(tmp_path, {name: {"pid": process.pid, "command": command} for name, process in processes.items()})
        begun = time.monotonic()
        stopped = stack.down(tmp_path, timeout=2)
        took = time.monotonic() - begun
        assert stopped[2] == "server" and set(stopped[:2]) == {"worker-cpu", "dask-worker-1"}, stopped
        assert 4 <= took < 5.5, f"down took {took:.1f} s with a 2 s timeout for 2 waves"
        for process in processes.values():
            process.wait(timeout=5)
    finally:
        for process in processes.values():
            process.kill()
            process.wait()


def test_a_process_that_does_not_lead_its_own_group_is_never_stopped(tmp_path):
    """``down`` stops a recorded pid's whole process group: a process in this test's group, with
    the right command line, is not the stack's, and killing 'its' group would hit others."""
    process = started(subprocess.Popen(["sleep", "300"]))  # in pytest's process group
    try:
        plant(tmp_path, {"worker": {"pid": process.pid, "command": ["sleep", "300"]}})
        assert stack.status(tmp_path) == {"worker": False}
        assert stack.down(tmp_path, timeout=5) == [] and running(process)
    finally:
        process.kill()
        process.wait()


def refused(tmp_path: Path, sleeper, reason: str) -> None:
    """Every reader refuses, naming the file and ``reason``, and nothing is stopped or removed."""
    for read in (stack.status, stack.down, stack.client_environment, stack.wipe):
        with pytest.raises(stack_secrets.StackStateError) as error:
            read(tmp_path)
        assert str(tmp_path / stack.STATE) in str(error.value) and reason in str(error.value), str(error.value)
        assert "\n" not in str(error.value)
    assert running(sleeper) and os.path.lexists(tmp_path / stack.STATE)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o606, 0o400, 0o700])
def test_a_state_file_that_is_not_private_is_refused(tmp_path, sleeper, mode):
    plant(tmp_path, {"victim": {"pid": sleeper.pid, "command": ["sleep", "300"]}}, mode=mode)
    refused(tmp_path, sleeper, f"mode {mode:04o}, not 0600")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_state_file_of_another_user_is_refused(tmp_path, sleeper):
    path = plant(tmp_path, {"victim": {"pid": sleeper.pid, "command": ["sleep", "300"]}})
    os.chown(path, NOBODY, NOBODY)
    refused(tmp_path, sleeper, f"owned by uid {NOBODY}, not by you")


def test_a_state_file_that_is_a_link_or_not_a_file_is_refused(tmp_path, sleeper):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"environment": {}, "processes": {
        "victim": {"pid": sleeper.pid, "command": ["sleep", "300"]}}}))
    elsewhere.chmod(0o600)
    (tmp_path / stack.STATE).symlink_to(elsewhere)  # a private file of the user's, reached through a link
    refused(tmp_path, sleeper, "a symbolic link")
    (tmp_path / stack.STATE).unlink()
    os.mkfifo(tmp_path / stack.STATE, 0o600)  # opening it must not hang
    refused(tmp_path, sleeper, "not a regular file")


@pytest.mark.parametrize(("text", "reason"), [
    ('{"processes": ', "not valid JSON"),
    ('{"environment": {}, "processes": {"x": {"pid": 1' + "0" * 400 + ', "command": ["sleep"]}}}',
     "beyond +-2**53"),
    ('{"environment": {}, "processes": ' + "[" * 200 + "]" * 200 + "}", "nested deeper"),
    ('{"environment": {}, "processes": {"x": {"pid": NaN, "command": ["sleep"]}}}', "NaN"),
    ("[]", "not an object"),
    ('{"environment": {}, "processes": []}', "'processes' is not an object"),
    ('{"environment": {"A": 1}, "processes": {}}', "'environment' is not an object of strings"),
    ('{"environment": {}, "processes": {"x": {"pid": "12", "command": ["sleep"]}}}', "process 'x' has no pid"),
    ('{"environment": {}, "processes": {"x": {"pid": 1, "command": ["sleep"]}}}', "process 'x' has no pid"),
    ('{"environment": {}, "processes": {"x": {"pid": 12, "command": []}}}', "process 'x' has no command line"),
    ('{"environment": {}, "processes": {"x": {"pid": 12, "command": "sleep 300"}}}',
     "process 'x' has no command line"),
    ('{"environment": {}, "processes": {"x": {"pid": 12, "command": [""]}}}', "process 'x' has no command line"),
    # What the earlier version wrote, and the attack on it: an empty marker matched every process.
    ('{"environment": {}, "processes": {"x": {"pid": 12, "marker": ""}}}', "as an earlier version wrote"),
])
def test_a_damaged_state_file_is_one_clear_error(tmp_path, sleeper, text, reason):
    plant(tmp_path, {}, text=text.replace('"pid": 12', f'"pid": {sleeper.pid}'))
    refused(tmp_path, sleeper, reason)


def test_the_command_line_refuses_a_planted_state_file_with_one_line_and_stops_nothing(tmp_path, sleeper):
    """The attack as shown: a world-readable stack.json naming another process with an empty
    marker, in the folder 'stack down' uses."""
    path = plant(tmp_path, {"s3": {"pid": sleeper.pid, "marker": "", "log": "x"}}, mode=0o644)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    (tmp_path / "empty.env").write_text("")
    environment.update(CXR_STACK_DIR=str(tmp_path), CXR_SETTINGS=str(tmp_path / "empty.env"), COLUMNS="80")
    for command in (["stack", "down"], ["stack", "status"], ["stack", "down", "--wipe"]):
        done = subprocess.run([sys.executable, "-m", "cli.main", *command], env=environment, cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 3, (command, done.stdout, done.stderr)
        line = (f"error: {path}: not trusted: mode 0644, not 0600; the stack writes it as a file of yours, "
                f"mode 0600: if no stack of yours runs from {tmp_path}, remove it")
        assert done.stdout.splitlines() == [line], done.stdout
    time.sleep(0.2)
    assert running(sleeper) and path.exists()


def test_the_signing_key_is_made_once_private_and_kept(tmp_path):
    key = stack_secrets.signing_key(tmp_path)
    path = tmp_path / stack_secrets.SIGNING_KEY
    assert len(key) == 64 and int(key, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == key + "\n"
    assert stack_secrets.signing_key(tmp_path) == key  # kept across restarts
    other = tmp_path / "other"
    other.mkdir()
    assert stack_secrets.signing_key(other) != key  # a stack of its own: a key of its own
    path.chmod(0o644)
    with pytest.raises(stack_secrets.StackStateError, match=r"signing-key: not trusted: mode 0644, not 0600"):
        stack_secrets.signing_key(tmp_path)
    path.write_text("guessable\n")
    path.chmod(0o600)
    with pytest.raises(stack_secrets.StackStateError, match=r"signing-key: not a key the stack made"):
        stack_secrets.signing_key(tmp_path)


def test_the_api_credentials_and_s3_keys_are_made_once_private_and_kept(tmp_path):
    auth, keys = stack_secrets.api_auth(tmp_path), stack_secrets.s3_credentials(tmp_path)
    assert auth.startswith("cxr:") and len(auth) == 47 and stack_secrets.api_auth(tmp_path) == auth
    assert stack_secrets.s3_credentials(tmp_path) == keys and keys.access_key_id != "testing"
    for name in (stack_secrets.API_AUTH, stack_secrets.S3_CREDENTIALS):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    (tmp_path / stack_secrets.S3_CREDENTIALS).chmod(0o644)
    with pytest.raises(stack_secrets.StackStateError, match=r"s3-credentials: mode 0644.*remove it"):
        stack_secrets.s3_credentials(tmp_path)
    (tmp_path / stack_secrets.API_AUTH).write_text("admin:admin\n")
    with pytest.raises(stack_secrets.StackStateError, match=r"prefect-auth: not the Prefect API's credentials"):
        stack_secrets.api_auth(tmp_path)


def test_no_server_but_prefect_gets_the_api_credentials_or_the_database_url():
    given = {"PATH": "/usr/bin", "PREFECT_API_URL": "http://127.0.0.1:1/api", "PREFECT_API_AUTH_STRING": "cxr:secret",
             "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://prefect:pw@127.0.0.1:1/prefect",
             "AWS_SECRET_ACCESS_KEY": "secret", "CXR_DEIDENTIFY_KEY": "secret", "DASK_DISTRIBUTED__X": "1"}
    assert stack_environment.server_environment("dask-scheduler", given) == {
        "PATH": "/usr/bin", "PREFECT_API_URL": "http://127.0.0.1:1/api", "DASK_DISTRIBUTED__X": "1"}
    assert stack_environment.server_environment("postgres", given) == {"PATH": "/usr/bin"}
    assert stack_environment.server_environment("s3", given) == {"PATH": "/usr/bin"}
    # The server checks its own PREFECT_SERVER_API_AUTH_STRING, which the stack adds; never a client's.
    assert "PREFECT_API_AUTH_STRING" not in stack_environment.server_environment("server", given)


def test_the_client_environment_names_the_key_file_and_sourcing_it_gives_the_key(tmp_path):
    key = stack_secrets.signing_key(tmp_path)
    env_file = stack._write_client_environment(tmp_path, {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
                                               tmp_path / stack_secrets.SIGNING_KEY)
    assert key not in env_file.read_text() and env_file.stat().st_mode & 0o777 == 0o600
    shown = subprocess.run(["bash", "-c", f"source '{env_file}' && echo \"$CXR_MODEL_SIGNING_KEY\""],
                           env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=30, check=False)
    assert shown.stdout == key + "\n", shown.stderr


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_up_refuses_a_folder_others_can_write_before_starting_anything(tmp_path, mode):
    folder = tmp_path / "stack"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(stack_secrets.StackStateError, match=f"others can write it \\(mode {mode:04o}\\)"):
        stack.up(folder, Settings(_env_file=None), echo=lambda line: None, s3_only=True)
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_up_refuses_a_folder_of_another_user(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(stack_secrets.StackStateError, match=f"owned by uid {NOBODY}, not by you"):
        stack.up(folder, Settings(_env_file=None), echo=lambda line: None, s3_only=True)
    assert list(folder.iterdir()) == []


class Planted:
    """Unpickling this creates ``path``: proof that a snapshot was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("owner", ["another user", "writable by others", "a link"])
def test_the_local_s3_never_unpickles_a_snapshot_it_did_not_write(tmp_path, owner):
    import pickle

    from deployments.s3_server import SNAPSHOT, Store

    if owner == "another user" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    folder, proof = tmp_path / "s3", tmp_path / "unpickled"
    folder.mkdir(mode=0o700)
    snapshot = folder / SNAPSHOT
    target = tmp_path / "elsewhere.pickle" if owner == "a link" else snapshot
    target.write_bytes(pickle.dumps(Planted(str(proof))))
    target.chmod(0o600)
    if owner == "another user":
        os.chown(snapshot, NOBODY, NOBODY)
    elif owner == "writable by others":
        snapshot.chmod(0o622)
    else:
        snapshot.symlink_to(target)
    with pytest.raises(OSError) as refused:
        Store(folder).load()
    assert str(snapshot) in str(refused.value) or refused.value.filename == str(snapshot), refused.value
    assert not proof.exists(), "the snapshot was unpickled"


@pytest.mark.parametrize(("text", "reason"), [
    ("{", "not valid JSON"),
    ('{"saved_at": "now", "buckets": {"cxr": {"objects": 1e999, "bytes": 1}}}', "not finite"),
    ('{"saved_at": "now", "buckets": {"cxr": {"objects": "3", "bytes": 1}}}', "not a summary"),
    ('{"saved_at": 1, "buckets": {}}', "not a summary"),
    ('{"saved_at": "now", "buckets": []}', "not a summary"),
])
def test_a_damaged_s3_summary_is_named_not_a_crash(tmp_path, text, reason):
    from deployments.s3_server import SUMMARY, read_summary
    from model.stored_json import StoredStateError

    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / SUMMARY).write_text(text)
    with pytest.raises(StoredStateError, match=reason):
        read_summary(tmp_path / "s3")
    shown = stack.stored_data(tmp_path)
    assert shown.startswith(f"unknown: its summary cannot be read ({tmp_path / 's3' / SUMMARY}: ") and reason in shown
    (tmp_path / "s3" / SUMMARY).write_text('{"saved_at": "now", "buckets": {"cxr": {"objects": 2, "bytes": 2000}}}')
    assert stack.stored_data(tmp_path) == "cxr (2 object(s), 2.0 KB); saved now"
