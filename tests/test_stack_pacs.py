"""``stack up --pacs`` (issue #26) before anything starts: Orthanc missing, or a port it needs taken,
is one line and exit 3, with nothing started or written; the PACS's password is made once and kept
private; only the client environment (and the workers) get it, in place of another PACS's token.

No stack and no Orthanc is started, so these take a second; the stack's Orthanc itself, its
credentials and which processes get them, is ``tests/test_stack.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from deployments import orthanc, stack, stack_environment, stack_secrets

INSTALL_LINE = ("error: Orthanc or its DICOMweb plugin is not installed: install Debian's Orthanc and its DICOMweb "
                "plugin (apt-get install orthanc orthanc-dicomweb)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_up(folder: Path, *arguments: str, environment: dict[str, str] | None = None):
    """``cxr-screen stack up --pacs`` in this process (no stack starts: each case is refused first)."""
    from typer.testing import CliRunner

    from cli.main import app

    environment = environment or {}
    # Free ports for both of the PACS's unless given: a host's own Orthanc service holds the defaults.
    ports = [option for option in ("--pacs-port", "--pacs-dicom-port") if option not in arguments]
    defaults = [item for option in ports for item in (option, str(free_port()))]
    return CliRunner().invoke(app, ["stack", "up", "--pacs", "--port", str(free_port()), *defaults, *arguments],
                              env={"CXR_STACK_DIR": str(folder), **environment}, terminal_width=200)


def require_orthanc() -> None:
    try:
        orthanc.require({})
    except orthanc.OrthancError as error:
        pytest.skip(str(error))


def test_a_missing_orthanc_is_one_line_naming_the_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(orthanc, "DICOMWEB_PLUGIN", tmp_path / "not-installed.so")
    folder = tmp_path / "stack"
    done = stack_up(folder)
    assert (done.exit_code, done.output.splitlines()) == (3, [INSTALL_LINE]), done.output
    assert list(folder.iterdir()) == []  # no key, no password, no configuration, no process


@pytest.mark.parametrize("option", ["--pacs-port", "--pacs-dicom-port"])
def test_a_port_taken_on_any_address_is_refused_before_anything_starts(tmp_path, option):
    """Orthanc listens on every address: a port held on another loopback address alone is in its way too."""
    require_orthanc()
    folder = tmp_path / "stack"
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))  # not 127.0.0.1: only a probe of every address sees it
        holder.listen()
        port = holder.getsockname()[1]
        done = stack_up(folder, option, str(port))
    line = f"error: port {port} is taken (another Orthanc, or another service?): choose {option}"
    assert (done.exit_code, done.output.splitlines()) == (3, [line]), done.output
    assert list(folder.iterdir()) == []


def test_ports_the_stack_takes_itself_and_s3_only_are_refused(tmp_path):
    require_orthanc()
    same, server = free_port(), free_port()
    refusals = {
        ("--pacs-port", str(same), "--pacs-dicom-port", str(same)):
            f"error: --pacs-port and --pacs-dicom-port are both {same}: choose two ports",
        ("--port", str(server), "--pacs-dicom-port", str(server)):
            f"error: --pacs-dicom-port {server} is the stack's --port too: choose another port",
        ("--s3-only",): "error: --s3-only starts the local S3 alone: leave out --pacs",
        ("--pacs-port", "70000"): "Invalid value for '--pacs-port'",
        ("--pacs-dicom-port", "0"): "Invalid value for '--pacs-dicom-port'",
    }
    for arguments, line in refusals.items():
        done = stack_up(tmp_path / "stack", *arguments)
        if line.startswith("Invalid value"):  # typer's own refusal of a number out of range
            assert done.exit_code == 2 and line in done.output, (arguments, done.output)
        else:
            assert (done.exit_code, done.output.splitlines()) == (3, [line]), (arguments, done.output)
    done = stack_up(tmp_path / "stack", environment={"CXR_DICOM_CALLING_AET": "A" * 17})  # Orthanc would fail late
    assert done.exit_code == 3 and "CXR_DICOM_CALLING_AET 'AAAAAAAAAAAAAAAAA' is not an AE title" in done.output
    assert not (tmp_path / "stack").exists() or list((tmp_path / "stack").iterdir()) == []


def test_loopback_goes_around_a_sites_proxy_and_a_port_out_of_range_is_refused():
    assert stack_environment.loopback_unproxied({"NO_PROXY": "corp.example"}) == {}  # no proxy: nothing to go around
    assert stack_environment.loopback_unproxied({"https_proxy": "http://proxy:3128", "no_proxy": "corp.example, localhost"}) == \
        dict.fromkeys(("NO_PROXY", "no_proxy"), "corp.example,localhost,127.0.0.1")
    require_orthanc()
    with pytest.raises(orthanc.OrthancError, match="--pacs-port 70000 is not a port"):
        orthanc.require({70000: "--pacs-port"})


def test_the_pacs_password_is_made_once_private_and_kept(tmp_path):
    password = stack_secrets.pacs_password(tmp_path)
    path = tmp_path / stack_secrets.PACS_PASSWORD
    assert len(password) == 43 and path.read_text() == password + "\n" and path.stat().st_mode & 0o777 == 0o600
    assert stack_secrets.pacs_password(tmp_path) == password
    path.write_text("admin\n")
    with pytest.raises(stack_secrets.StackStateError, match=r"pacs-password: not a password the stack made"):
        stack_secrets.pacs_password(tmp_path)


def test_the_client_environment_gives_the_pacs_credentials_in_place_of_another_token(tmp_path):
    server = orthanc.Orthanc(tmp_path / "orthanc", 8042, stack.PACS_USER, "the-pacs-password", 4242)
    env_file = stack._write_client_environment(tmp_path, {"TF_CPP_MIN_LOG_LEVEL": "2",
                                                          **stack._pacs_environment(server)}, None)
    script = (f"source '{env_file}' && python3 -c 'import json, os; print(json.dumps({{key: os.environ.get(key) "
              "for key in (\"CXR_STACK_PACS\", \"CXR_DICOMWEB_USER\", \"CXR_DICOMWEB_PASSWORD\", \"CXR_DICOMWEB_TOKEN\")}))'")
    shown = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"], "CXR_DICOMWEB_TOKEN": "another PACS's"},
                           capture_output=True, text=True, timeout=30, check=False)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"CXR_STACK_PACS": "dicomweb+http://127.0.0.1:8042/dicom-web",
                                        "CXR_DICOMWEB_USER": "cxr", "CXR_DICOMWEB_PASSWORD": "the-pacs-password",
                                        "CXR_DICOMWEB_TOKEN": None}
    assert env_file.stat().st_mode & 0o777 == 0o600
    # Orthanc itself gets none of them (nor any other credential): the basics alone.
    given = {"PATH": "/usr/bin", "LC_ALL": "C.UTF-8", **stack._pacs_environment(server), "AWS_SECRET_ACCESS_KEY": "s",
             "PREFECT_API_AUTH_STRING": "cxr:s", "CXR_MODEL_SIGNING_KEY": "k"}
    assert stack_environment.server_environment("orthanc", given) == {"PATH": "/usr/bin", "LC_ALL": "C.UTF-8"}
