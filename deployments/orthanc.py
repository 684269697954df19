"""A local PACS: Orthanc with its DICOMweb plugin (Debian's ``orthanc`` and ``orthanc-dicomweb``),
configured by this code, for the tests, the PACS benchmark and the local stack (``stack up --pacs``).

Its configuration is generated into its folder (0700, the file 0600): storage in that folder,
HTTP authentication on with one generated user, access from other machines refused, the DICOM
(DIMSE) server off unless a port is asked for, and then storing only from known AE titles on
127.0.0.1. Orthanc 1.10 cannot bind to one address: it listens
on every interface, and with ``RemoteAccessAllowed`` off it answers other machines' HTTP requests
with 403 and no data; its DICOM port refuses an AE title it does not know, or one from another host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from store.private_files import write_private

__all__ = ["DICOMWEB_PLUGIN", "Orthanc", "OrthancError", "configure", "require", "start", "wait_until_ready"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "install Debian's Orthanc and its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)"


class OrthancError(RuntimeError):
    """Orthanc is missing or did not start; the message is one line."""


@dataclass(frozen=True)
class Orthanc:
    """A configured Orthanc: where it answers and with which credentials."""

    folder: Path
    http_port: int
    user: str
    password: str
    dicom_port: int | None = None
    aet: str = "CXRPACS"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root, as a screening location names it."""
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse(self) -> str | None:
        """Its DICOM (C-STORE) address as a delivery location names it; None without a DICOM port."""
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}" if self.dicom_port else None

    def command(self) -> list[str]:
        return [_program(), "--no-jobs", str(self.folder / "orthanc.json")]


def _program() -> str:
    program = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if program is None or not DICOMWEB_PLUGIN.exists():
        raise OrthancError(f"Orthanc or its DICOMweb plugin is not installed: {INSTALL_HINT}")
    return program


def require(ports: Mapping[int, str]) -> None:
    """OrthancError, in one line, unless Orthanc and its plugin are installed and each of ``ports``
    (a port: the option that chose it) is free on every address: Orthanc listens on all of them, so
    whatever holds the port on any one (a site's own Orthanc on 8042, say) is in its way."""
    _program()
    for port, option in ports.items():
        if not 1 <= port <= 65535:
            raise OrthancError(f"{option} {port} is not a port (1 to 65535)")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no owner
            try:
                probe.bind(("0.0.0.0", port))  # a probe, closed at once: where Orthanc will listen
            except OSError:
                raise OrthancError(f"port {port} is taken (another Orthanc, or another service?): choose {option}") from None


def configure(folder: Path, http_port: int, dicom_port: int | None = None, user: str = "cxr",
              password: str | None = None, calling_aets: tuple[str, ...] = ("CXRSCREEN",)) -> Orthanc:
    """Write ``<folder>/orthanc.json`` (0600) for an Orthanc storing in ``<folder>/db``; with a
    ``dicom_port``, it takes C-STORE from ``calling_aets`` alone (on 127.0.0.1)."""
    _program()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    orthanc = Orthanc(folder, http_port, user, password or secrets.token_urlsafe(24), dicom_port)
    configuration = {
        "Name": "cxr-screen PACS", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {user: orthanc.password}, "HttpDescribeErrors": False,
        "DicomServerEnabled": dicom_port is not None, "DicomPort": dicom_port or 4242, "DicomAet": orthanc.aet,
        # DICOM has no password: a known AE title on 127.0.0.1 may store and echo, never query or
        # retrieve (which would hand any local process every study the HTTP password guards).
        "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False,
        "DicomModalities": {aet.lower(): {"AET": aet, "Host": "127.0.0.1", "Port": 104, "AllowStore": True,
                                          "AllowEcho": True, "AllowFind": False, "AllowFindWorklist": False,
                                          "AllowGet": False, "AllowMove": False, "AllowStorageCommitment": False}
                            for aet in calling_aets},
        "DicomCheckModalityHost": True,
        # Surfaces the product never uses, each one more way in with cached Basic credentials.
        "WebDavEnabled": False, "OrthancExplorerEnabled": False, "MetricsEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "StableAge": 1, "SaveJobs": False, "LimitFindResults": 0, "LimitFindInstances": 0,
    }
    write_private(folder / "orthanc.json", json.dumps(configuration, indent=2).encode())  # it holds the password
    return orthanc


# Orthanc reads nothing of ours from its environment: a tester's or an operator's keys stay out of it.
_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


def start(orthanc: Orthanc, log: Path, timeout: float = 60) -> subprocess.Popen:
    """Orthanc started in its own process group, with the process basics of the environment alone,
    and answering (``/system`` with the credentials)."""
    with open(log, "ab") as handle:
        process = subprocess.Popen(orthanc.command(), stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=orthanc.folder,
                                   env={name: os.environ[name] for name in _ENVIRONMENT if name in os.environ})
    wait_until_ready(orthanc, process, log, timeout)
    return process


def wait_until_ready(orthanc: Orthanc, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until ``process`` answers ``/system`` with the credentials (whatever else holds the port would
    refuse them); OrthancError, and the process killed, when it exits or stays silent."""
    request = urllib.request.Request(f"{orthanc.url}/system")
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, orthanc.url, orthanc.user, orthanc.password)
    # Straight to loopback: a site's HTTP proxy would neither reach it nor deserve its credentials.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPBasicAuthHandler(manager))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OrthancError(f"Orthanc exited with code {process.returncode}; see {log}")
        try:
            with opener.open(request, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    process.kill()
    raise OrthancError(f"Orthanc did not answer at {orthanc.url} within {timeout:.0f} s; see {log}")
