"""What a storage backend is: the errors every backend raises, the properties it declares, the verbs it
implements, and the part shared by every ``scheme://bucket/key`` store (S3 today; GCS or Azure alike).

Product code never imports this: it calls ``store.storage``, which picks the backend by scheme.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["AccessDenied", "Backend", "BucketBackend", "BucketKey", "Capabilities", "LocationError", "NoSpace",
           "NotAFolder", "NotFound", "StorageError", "Unreadable", "too_large"]


class LocationError(ValueError):
    """A location this code cannot address: no retry can help."""


class StorageError(OSError):
    """A storage operation failed; the message names the URI and what is wrong."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


class NotFound(StorageError, FileNotFoundError):
    """No such file, folder, key or bucket."""


class AccessDenied(StorageError, PermissionError):
    """The credentials in use may not perform this operation."""


class NotAFolder(StorageError, NotADirectoryError):
    """A folder was expected and a file was found."""


class Unreadable(StorageError):
    """This one file cannot be read, and retrying will not change that: not a regular file, a broken
    or escaping link, over the size limit, permission denied, archived. An input's rejected row."""


class NoSpace(StorageError):
    """The file system is full (or over a quota): nothing was written."""


def too_large(size: int, limit: int) -> str:
    return f"file too large: {size:,} bytes, over the limit of {limit:,} (max_file_bytes)"


@dataclass(frozen=True)
class Capabilities:
    """What a backend's locations allow, asked instead of testing a URI's scheme.

    ``shared``: every machine holding the credentials sees the same files, so remote workers can be
    handed the location. A local path is not, even on a network mount: nothing here can tell.
    ``presignable``: ``presigned_url`` signs a URL that works without credentials until it expires;
    otherwise it gives the file's own URI (a local ``file://``, never expiring) or refuses.
    ``conditional_writes``: ``create_if_absent`` and ``replace_if_unchanged`` are atomic among all the
    writers that share the location (the ledger, the leases and ``production.json`` rely on it).
    """

    shared: bool
    presignable: bool
    conditional_writes: bool
    # Every file listed is a DICOM instance (a PACS): nothing to peek into to know it.
    dicom_instances: bool = False


class Backend:
    """One scheme's verbs; ``store.storage`` documents each. A location reaches a backend only when its
    scheme is this backend's, and ``parts`` of ``join`` come without empty parts or outer '/'."""

    capabilities = Capabilities(shared=False, presignable=False, conditional_writes=False)

    def join(self, uri: str, parts: Sequence[str]) -> str:
        raise NotImplementedError

    def relative_to(self, uri: str, base: str) -> str:
        raise NotImplementedError

    def canonical(self, uri: str) -> str:
        """One spelling per place, its scheme included, for telling the same or nested places apart."""
        return self.join(uri, ())

    def list_files(self, uri: str, *, missing_ok: bool) -> Iterator[str]:
        raise NotImplementedError

    def list_folders(self, uri: str, *, missing_ok: bool) -> list[str]:
        raise NotImplementedError

    def list_files_stamped(self, uri: str, *, missing_ok: bool) -> Iterator[tuple[str, str | None]]:
        """``list_files`` with each file's stamp, where the listing gives one without reading: a
        backend that cannot gives None (nothing it lists can then be remembered)."""
        return ((name, None) for name in self.list_files(uri, missing_ok=missing_ok))

    def read_bytes(self, uri: str, length: int | None, max_bytes: int | None, within: str | None) -> bytes:
        """``within`` matters only where a file can be a link; others ignore it."""
        raise NotImplementedError

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        raise NotImplementedError

    def delete(self, uri: str) -> None:
        raise NotImplementedError

    def presigned_url(self, uri: str, expires_seconds: int) -> str:
        raise LocationError(f"{uri}: this storage gives no links to its files")

    # Needed only with ``capabilities.conditional_writes``; the facade refuses them otherwise.

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        raise NotImplementedError

    def read_versioned(self, uri: str) -> tuple[bytes | None, str | None]:
        raise NotImplementedError

    def replace_if_unchanged(self, uri: str, data: bytes, token: str | None, lock_wait_seconds: float) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class BucketKey:
    scheme: str
    bucket: str
    key: str

    @property
    def prefix(self) -> str:
        """The key as a folder: what every key below it starts with ('' for the whole bucket)."""
        return self.key.rstrip("/") + "/" if self.key else ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"


class BucketBackend(Backend):
    """Locations ``scheme://bucket/key``, folders being key prefixes: parsing, joining and relative
    paths, done once for every object store."""

    scheme = ""

    def locate(self, uri: str) -> BucketKey:
        start = f"{self.scheme}://"
        if not uri.startswith(start):
            raise LocationError(f"{uri!r} is not a {start} location")
        bucket, _, key = uri[len(start):].partition("/")
        if not bucket:
            raise LocationError(f"{uri!r} names no bucket: expected {start}bucket/prefix")
        return BucketKey(self.scheme, bucket, key)

    def join(self, uri: str, parts: Sequence[str]) -> str:
        location = self.locate(uri)
        key = "/".join([location.key.rstrip("/"), *parts] if location.key else parts)
        return str(BucketKey(self.scheme, location.bucket, key))

    def relative_to(self, uri: str, base: str) -> str:
        location, root = self.locate(uri), self.locate(base)
        if location.bucket != root.bucket or not location.key.startswith(root.prefix):
            raise ValueError(f"{uri} is not under {base}")
        return location.key[len(root.prefix):]
