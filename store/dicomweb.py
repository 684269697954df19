"""A PACS as a screening location, over DICOMweb: ``dicomweb+http://HOST:PORT/ROOT`` (or
``dicomweb+https://``), e.g. ``dicomweb+http://127.0.0.1:8042/dicom-web?StudyDate=20261205-&Modality=DX``.

Listing is QIDO-RS (studies, then their series, then their instances, with the query's attribute
filters at the level each belongs to); each instance is a file named by its WADO-RS path,
``.../studies/<study>/series/<series>/instances/<sop>``. Reading is WADO-RS: the instance's bytes
as the PACS stores them, taken from the multipart answer without parsing them, so they reach the
decoder sandbox, the view guard and the size limits exactly as a file's bytes would. The location
is read-only: results go to other storage.

Credentials come from the environment, never from the location: ``CXR_DICOMWEB_TOKEN`` (a bearer
token) or ``CXR_DICOMWEB_USER`` and ``CXR_DICOMWEB_PASSWORD`` (HTTP Basic). A location that carries
``user:password@`` is refused, so they never reach rows, logs or Prefect.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from store.backend import (
    AccessDenied,
    Backend,
    Capabilities,
    LocationError,
    NotFound,
    StorageError,
    Unreadable,
    too_large,
)

__all__ = ["SCHEMES", "DicomWebBackend", "dated_since", "read_metadata", "store_instances"]

SCHEMES = ("dicomweb+http", "dicomweb+https")
TIMEOUT_SECONDS = 60
MAX_METADATA_BYTES = 4 * 2**20
# QIDO-RS attributes a location's query may filter on, by the level that answers them.
STUDY_FILTERS = frozenset({"StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "StudyInstanceUID",
                           "PatientID", "ReferringPhysicianName", "StudyDescription"})
SERIES_FILTERS = frozenset({"Modality", "SeriesInstanceUID", "SeriesNumber", "BodyPartExamined", "SeriesDate",
                            "SeriesDescription"})
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_INSTANCE = re.compile(r"studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)")


def dated_since(uri: str, since: str, today: datetime.date) -> str:
    """``uri`` with ``StudyDate=<today - since>-`` (``since``: days ``Nd`` or weeks ``Nw``), the
    window a nightly run asks the PACS for; LocationError when it filters on StudyDate already."""
    _, _, filters = _split(uri)
    if "StudyDate" in filters:
        raise LocationError(f"{_public(uri)}: give either StudyDate in the location or a window (since), not both")
    days = int(since[:-1]) * (7 if since.endswith("w") else 1)
    start = (today - datetime.timedelta(days=days)).strftime("%Y%m%d")
    return f"{uri}{'&' if '?' in uri else '?'}StudyDate={start}-"


def _split(uri: str) -> tuple[str, str, dict[str, str]]:
    """(the HTTP root, the path below it, the query's filters) of a dicomweb+ location."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.removeprefix("dicomweb+")
    if parts.username or parts.password:
        raise LocationError(f"{parts.scheme}://{parts.hostname}...: credentials do not belong in a location; set "
                            "CXR_DICOMWEB_USER and CXR_DICOMWEB_PASSWORD (or CXR_DICOMWEB_TOKEN)")
    path = parts.path.rstrip("/")
    match = re.search(r"/studies(/|$)", path)
    root, below = (path[: match.start()], path[match.start() + 1:]) if match else (path, "")
    filters = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(filters) - STUDY_FILTERS - SERIES_FILTERS)
    if unknown:
        raise LocationError(f"{_public(uri)}: cannot filter on {', '.join(unknown)} (QIDO-RS attributes: "
                            f"{', '.join(sorted(STUDY_FILTERS | SERIES_FILTERS))})")
    return f"{scheme}://{parts.netloc}{root}", below, filters


def _public(uri: str) -> str:
    return uri.split("?", 1)[0]


_SESSIONS = threading.local()


def _session():
    """This thread's HTTP session for the credentials set now: kept, so that a night's thousands of
    calls reuse their connections instead of opening one each (requests' sessions are not shared
    between threads)."""
    import requests

    token, user = os.environ.get("CXR_DICOMWEB_TOKEN"), os.environ.get("CXR_DICOMWEB_USER")
    key = (token, user, os.environ.get("CXR_DICOMWEB_PASSWORD", "") if user else None)
    sessions = _SESSIONS.__dict__.setdefault("by_credentials", {})
    session = sessions.get(key)
    if session is None:
        session = sessions[key] = requests.Session()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        elif user:
            session.auth = (user, key[2])
    return session


LISTERS = 8  # studies listed at once: each costs a series and an instance query, round trips that add up over a night


def _study_instances(root: str, study: str, series_given: list[str], series_filters: dict[str, str]
                     ) -> list[tuple[str, str]]:
    """One study's image instances, (location, SOP Instance UID), on this thread's session."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(root, session=_session(), timeout=TIMEOUT_SECONDS)
    series_list = series_given or [
        _value(item, "0020000E") for item in client.search_for_series(study, search_filters=series_filters,
                                                                       get_remaining=True) if _an_image_series(item)]
    found = []
    for series in filter(None, series_list):
        for item in client.search_for_instances(study, series, get_remaining=True):
            instance = _value(item, "00080018")
            if instance:
                found.append((f"dicomweb+{root}/studies/{study}/series/{series}/instances/{instance}", instance))
    return found


NOT_IMAGES = frozenset({"SR", "PR", "KO", "SEG", "REG", "DOC"})  # reports and states, never a radiograph


def _an_image_series(item: dict) -> bool:
    """Not a series of reports or presentation states, and not AI results marked not for diagnosis
    (this product's delivered objects among them): screening them would only fill the rejected list."""
    modality = (item.get("00080060", {}).get("Value") or [""])[0]
    description = (item.get("0008103E", {}).get("Value") or [""])[0]
    return modality not in NOT_IMAGES and "NOT FOR DIAGNOSIS" not in str(description).upper()


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0] if isinstance(values[0], str) and _UID.fullmatch(values[0]) else None


class DicomWebBackend(Backend):
    """Read-only; every file it lists is a DICOM instance."""

    capabilities = Capabilities(shared=True, presignable=False, conditional_writes=False, dicom_instances=True)

    def join(self, uri: str, parts: Sequence[str]) -> str:
        if not parts:  # the location itself, its filters with it
            base, _, query = uri.partition("?")
            return base.rstrip("/") + (f"?{query}" if query else "")
        return "/".join([_public(uri).rstrip("/"), *parts])

    def relative_to(self, uri: str, base: str) -> str:
        prefix = _public(base).rstrip("/") + "/"
        if not _public(uri).startswith(prefix):
            raise ValueError(f"{_public(uri)} is not under {_public(base)}")
        return _public(uri)[len(prefix):]


    def list_files(self, uri: str, *, missing_ok: bool) -> Iterator[str]:
        return (name for name, _ in self.list_files_stamped(uri, missing_ok=missing_ok))

    def list_files_stamped(self, uri: str, *, missing_ok: bool) -> Iterator[tuple[str, str | None]]:
        """Each instance once, stamped with its SOP Instance UID (an instance never changes)."""
        from dicomweb_client.api import DICOMwebClient

        root, below, filters = _split(uri)
        client = DICOMwebClient(root, session=_session(), timeout=TIMEOUT_SECONDS)
        study_filters = {key: value for key, value in filters.items() if key in STUDY_FILTERS}
        series_filters = {key: value for key, value in filters.items() if key in SERIES_FILTERS}
        given = below.split("/")[1::2]  # the study, series and instance UIDs the location names
        if len(given) == 3:
            yield self.join(uri, ()), given[2]
            return
        try:
            studies = [given[0]] if given else [
                _value(item, "0020000D") for item in client.search_for_studies(search_filters=study_filters,
                                                                               get_remaining=True)]
            with ThreadPoolExecutor(max_workers=LISTERS, thread_name_prefix="qido") as pool:
                for found in pool.map(lambda study: _study_instances(root, study, given[1:2], series_filters),
                                      filter(None, studies)):
                    yield from found
        except Exception as error:  # noqa: BLE001 - requests' and dicomweb-client's errors, sorted below
            if missing_ok and _status(error) == 404:
                return
            raise _storage_error(_public(uri), error) from None

    def list_folders(self, uri: str, *, missing_ok: bool) -> list[str]:
        return []

    def read_bytes(self, uri: str, length: int | None, max_bytes: int | None, within: str | None) -> bytes:
        """The instance's bytes from WADO-RS (one part of a multipart answer), refused beyond ``max_bytes``."""
        root, below, _ = _split(uri)
        if not _INSTANCE.fullmatch(below):
            raise Unreadable(_public(uri), "not a DICOMweb instance (.../studies/S/series/S/instances/I)")
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        try:
            with _session().get(f"{root}/{below}", headers={"Accept": accept}, stream=True,
                                timeout=TIMEOUT_SECONDS) as response:
                response.raise_for_status()
                declared = int(response.headers.get("Content-Length") or 0)
                if max_bytes is not None and declared > max_bytes + 4096:  # a part's headers are small
                    raise Unreadable(_public(uri), too_large(declared, max_bytes))
                body = bytearray()
                for chunk in response.iter_content(2**20):
                    body += chunk
                    if max_bytes is not None and len(body) > max_bytes + 4096:
                        raise Unreadable(_public(uri), too_large(len(body), max_bytes))
                content_type = response.headers.get("Content-Type", "")
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001 - requests' errors, sorted below
            raise _storage_error(_public(uri), error) from None
        data = _first_part(bytes(body), content_type, _public(uri))
        if max_bytes is not None and len(data) > max_bytes:
            raise Unreadable(_public(uri), too_large(len(data), max_bytes))
        return data[:length] if length is not None else data

    def exists(self, uri: str) -> bool:
        try:
            return any(True for _ in self.list_files_stamped(uri, missing_ok=True))
        except NotFound:
            return False

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise LocationError(f"{_public(uri)}: a DICOMweb location is read-only here (results go to other storage)")

    def delete(self, uri: str) -> None:
        self.write_bytes(uri, b"")


def read_metadata(uri: str) -> dict:
    """An instance's header as DICOM JSON (WADO-RS ``/metadata``): no pixels, nothing to parse but JSON."""
    root, below, _ = _split(uri)
    if not _INSTANCE.fullmatch(below):
        raise Unreadable(_public(uri), "not a DICOMweb instance (.../studies/S/series/S/instances/I)")
    try:
        with _session().get(f"{root}/{below}/metadata", headers={"Accept": "application/dicom+json"},
                            timeout=TIMEOUT_SECONDS, stream=True) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_content(2**16):
                body += chunk
                if len(body) > MAX_METADATA_BYTES:  # a header is kilobytes; more is not one to trust
                    raise Unreadable(_public(uri), f"metadata over {MAX_METADATA_BYTES:,} bytes")
        (metadata,) = json.loads(body)
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - requests' errors and a malformed answer, sorted below
        raise _storage_error(_public(uri), error) from None
    if not isinstance(metadata, dict):
        raise Unreadable(_public(uri), "metadata that is not one DICOM JSON object")
    return metadata


def store_instances(destination: str, objects: Sequence[bytes]) -> None:
    """STOW-RS ``objects`` (Part 10 files) to the DICOMweb root ``destination`` in one request;
    StorageError naming the destination when any is refused (a PACS keeps one copy per SOP Instance
    UID, so sending again what it has is harmless)."""
    root, below, filters = _split(destination)
    if below or filters:
        raise LocationError(f"{_public(destination)}: a STOW-RS destination is the DICOMweb root, without a path or query")
    boundary = f"cxr-{os.urandom(8).hex()}"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
                    for data in objects) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    try:
        response = _session().post(f"{root}/studies", data=body, headers=headers, timeout=TIMEOUT_SECONDS)
        if response.status_code == 409:  # it has them (the UIDs are derived): what a resend is for
            return
        response.raise_for_status()
    except Exception as error:  # noqa: BLE001 - requests' errors, sorted below
        raise _storage_error(_public(destination), error) from None
    try:
        answer = response.json() if response.content else {}
    except ValueError:  # stored (2xx) with an answer that is not JSON: nothing says any failed
        answer = {}
    failed = answer.get("00081198", {}).get("Value") if isinstance(answer, dict) else None
    if failed:
        raise StorageError(_public(destination), f"the PACS refused {len(failed)} of {len(objects)} object(s)")


def _first_part(body: bytes, content_type: str, uri: str) -> bytes:
    """The payload of the first part of a multipart/related answer (or the body, when a server
    answers application/dicom as is)."""
    if not content_type.lower().startswith("multipart/"):
        return body
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise Unreadable(uri, f"a multipart answer without a boundary ({content_type})")
    delimiter = b"--" + match.group(1).encode()
    start = body.find(delimiter)
    headers_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, headers_end)
    if start < 0 or headers_end < 0 or end < 0:
        raise Unreadable(uri, "a multipart answer cut short")
    return body[headers_end + 4:end]


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _storage_error(uri: str, error: Exception) -> StorageError:
    status = _status(error)
    if status == 404:
        return NotFound(uri, "not in the PACS (404)")
    if status in (401, 403):
        return AccessDenied(uri, f"the PACS refused the credentials ({status}): set CXR_DICOMWEB_USER and "
                                 "CXR_DICOMWEB_PASSWORD, or CXR_DICOMWEB_TOKEN")
    if status is not None and 400 <= status < 500:
        return Unreadable(uri, f"the PACS answered {status}")
    return StorageError(uri, f"the PACS did not answer ({type(error).__name__}: {str(error)[:200]})")
