"""One set of verbs over every storage, so that no flow branches on the scheme.

A location is a URI: a plain path, ``file:///abs/path`` or ``s3://bucket/prefix``. Each scheme is served
by one backend registered here (``store/local.py``, ``store/s3.py``); a new scheme is one backend module
and one ``register`` line. Code that must treat storages differently asks ``capabilities(uri)`` (shared
between machines, presignable, conditional writes), never the scheme. Local paths come back absolute
from every verb.

Not fsspec/s3fs: fsspec's local files are plain ``open()`` (links followed, a FIFO opened), its
``mode="create"`` checks then writes (not atomic) and it has no compare-and-swap (fsspec issue #1693),
which the ledger and leases need; s3fs would add aiobotocore, with its narrow botocore pins, and a
listing cache, to replace a few boto3 calls. Its protocol registry is the idea behind ``register``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from store.backend import (
    AccessDenied,
    Backend,
    Capabilities,
    LocationError,
    NoSpace,
    NotAFolder,
    NotFound,
    StorageError,
    Unreadable,
)
from store.dicomweb import SCHEMES, DicomWebBackend
from store.local import LocalBackend
from store.s3 import S3Backend
from store.s3 import client as _client  # noqa: F401 - tests fill buckets with the client storage uses

__all__ = [
    "PRESIGNED_MAX_SECONDS",
    "AccessDenied",
    "Backend",
    "Capabilities",
    "LocationError",
    "NoSpace",
    "NotAFolder",
    "NotFound",
    "StorageError",
    "Unreadable",
    "canonical",
    "capabilities",
    "create_if_absent",
    "delete",
    "exists",
    "join",
    "list_files",
    "list_files_stamped",
    "list_folders",
    "presigned_url",
    "read_bytes",
    "read_versioned",
    "register",
    "relative_to",
    "replace_if_unchanged",
    "unregister",
    "write_bytes",
]

_LOCAL = "file"  # plain paths are served by the backend of file:// URIs
_BACKENDS: dict[str, Backend] = {}


def register(scheme: str, backend: Backend) -> None:
    """Serve ``scheme://...`` locations with ``backend`` from now on (``file`` serves plain paths too)."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"a scheme is lowercase letters, digits, '+', '-' or '.', starting with a letter, not {scheme!r}")
    _BACKENDS[scheme] = backend


def unregister(scheme: str) -> None:
    """Stop serving ``scheme``; its locations are refused with ``LocationError`` again."""
    _BACKENDS.pop(scheme, None)


register(_LOCAL, LocalBackend())
register("s3", S3Backend())
for _scheme in SCHEMES:
    register(_scheme, DicomWebBackend())


def _backend(uri: str) -> Backend:
    if not uri:
        raise LocationError("empty location: expected a path, file:// URI or s3://bucket/prefix")
    scheme, separator, _ = uri.partition("://")
    if not separator or uri.startswith("file:"):
        scheme = _LOCAL
    backend = _BACKENDS.get(scheme)
    if backend is None:
        known = ", ".join(f"{name}://" for name in _BACKENDS)
        raise LocationError(f"{uri!r}: unsupported scheme (use a path, {known})")
    return backend


def capabilities(uri: str) -> Capabilities:
    """What the storage at ``uri`` allows: shared between machines, presignable, conditional writes."""
    return _backend(uri).capabilities


def join(uri: str, *parts: str) -> str:
    """Join relative parts ('a/b' or 'a', 'b') onto a location, keeping its scheme."""
    backend = _backend(uri)
    return backend.join(uri, [part.strip("/") for part in parts if part.strip("/")])


def relative_to(uri: str, base: str) -> str:
    """The part of ``uri`` below ``base``, with '/' separators."""
    backend = _backend(uri)
    if _backend(base) is not backend:
        raise ValueError(f"{uri} is not under {base}")
    return backend.relative_to(uri, base)


def canonical(uri: str) -> str:
    """One spelling per place, its scheme always written (local links resolved), for telling whether
    two locations are the same or one lies in the other. Locations of different schemes never are."""
    return _backend(uri).canonical(uri)


def list_files(uri: str, suffixes: Iterable[str] | None = None, *, missing_ok: bool = False) -> Iterator[str]:
    """Every file below ``uri``, recursively, as URIs in sorted order.

    ``suffixes`` filters by name ending, case-insensitively (e.g. ``{".png", ".jpg"}``).
    ``missing_ok``: a local folder not made yet lists as empty, as an S3 prefix with no keys
    does (a missing bucket is still an error).
    """
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    for name in _backend(uri).list_files(uri, missing_ok=missing_ok):
        if wanted is None or name.lower().endswith(wanted):
            yield name


def list_files_stamped(uri: str, *, missing_ok: bool = False) -> Iterator[tuple[str, str | None]]:
    """``list_files`` (no filter) with a stamp of each file's content, from the listing alone: a file
    whose stamp is unchanged holds the bytes it held (S3: its ETag and size; a local file: its inode,
    size, modification and change times, and its target's for a link). None where the listing cannot
    tell (a folder that could not be listed, a broken link, a backend without stamps)."""
    return _backend(uri).list_files_stamped(uri, missing_ok=missing_ok)


def list_folders(uri: str, *, missing_ok: bool = False) -> list[str]:
    """The folders directly below ``uri`` (S3: the common prefixes under it), as sorted URIs, without
    listing what lies inside them: one request per thousand folders on S3, however many files each
    holds. Links to folders are not followed. ``missing_ok`` as in ``list_files``."""
    return _backend(uri).list_folders(uri, missing_ok=missing_ok)


PRESIGNED_MAX_SECONDS = 7 * 24 * 3600  # what S3 (Signature Version 4) allows


def presigned_url(uri: str, expires_seconds: int) -> str:
    """A URL anyone holding it can open the file with, no credentials needed: on S3 a presigned GET
    valid for ``expires_seconds`` (at most 7 days; temporary credentials end it sooner, when they
    expire), for a local file its ``file://`` URI, percent-encoded, which never expires. Nothing is
    requested: signing happens here, so a missing file gives a URL that answers 404."""
    if not 0 < expires_seconds <= PRESIGNED_MAX_SECONDS:
        raise ValueError(f"expires_seconds must be in 1..{PRESIGNED_MAX_SECONDS} (7 days), not {expires_seconds!r}")
    return _backend(uri).presigned_url(uri, expires_seconds)


def read_bytes(uri: str, length: int | None = None, *, max_bytes: int | None = None,
               within: str | None = None) -> bytes:
    """The file's content, or only its first ``length`` bytes (one ranged GET on S3).

    For inputs that nobody vouches for: ``max_bytes`` refuses a larger file from its size (stat, or
    the GET's Content-Length) before reading it; ``within`` refuses a local link that leads outside
    that folder. Only regular files are ever opened, so a FIFO or a device cannot hang or flood the
    reader. Such refusals raise ``Unreadable``.
    """
    return _backend(uri).read_bytes(uri, length, max_bytes, within)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    _backend(uri).write_bytes(uri, data)


def create_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` unless it exists. True when this call created it.

    Exactly one of any number of concurrent callers wins, on a folder and on S3 alike.
    """
    return _conditional(uri).create_if_absent(uri, data)


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The file's content and a token of this version of it, for ``replace_if_unchanged``; (None,
    None) when it does not exist. The token is the ETag on S3 (the content's MD5: equal bytes are
    the same version), locally the inode and the content's sha256."""
    return _conditional(uri).read_versioned(uri)


def replace_if_unchanged(uri: str, data: bytes, token: str | None, *, lock_wait_seconds: float = 10.0) -> bool:
    """Write ``data`` only if the file is still the version ``read_versioned`` gave ``token`` for
    (``token`` None: only if it still does not exist). True when written; False when another
    writer changed it in between, and then nothing was written.

    S3: a conditional PUT (If-Match the ETag, or If-None-Match '*'). A folder: an atomic replace
    under a lock file created with O_EXCL (``<name>.lock``, held for milliseconds), after checking
    the token again under it. A lock left by a killed writer is named in the error, never broken.
    """
    return _conditional(uri).replace_if_unchanged(uri, data, token, lock_wait_seconds)


def _conditional(uri: str) -> Backend:
    backend = _backend(uri)
    if not backend.capabilities.conditional_writes:
        raise LocationError(f"{uri}: this storage cannot write conditionally, which claims and the ledger need")
    return backend


def exists(uri: str) -> bool:
    return _backend(uri).exists(uri)


def delete(uri: str) -> None:
    """Remove one file; a file already gone is not an error. Used for run leases, never for inputs."""
    _backend(uri).delete(uri)
