"""One set of verbs over local folders and S3, so that no flow branches on the scheme.

A location is a URI: a plain path, ``file:///abs/path`` or ``s3://bucket/prefix``. Local paths
come back absolute from every verb. Credentials,
region and endpoint come from the standard AWS environment and config files, so MinIO and moto
work by setting ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "AccessDenied",
    "LocationError",
    "NotAFolder",
    "NoSpace",
    "NotFound",
    "PRESIGNED_MAX_SECONDS",
    "StorageError",
    "Unreadable",
    "create_if_absent",
    "delete",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "list_folders",
    "presigned_url",
    "read_bytes",
    "read_versioned",
    "relative_to",
    "replace_if_unchanged",
    "write_bytes",
]


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


@dataclass(frozen=True)
class _S3Location:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _parse(uri: str) -> Path | _S3Location:
    if not uri:
        raise LocationError("empty location: expected a path, file:// URI or s3://bucket/prefix")
    if is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise LocationError(f"{uri!r} names no bucket: expected s3://bucket/prefix")
        return _S3Location(bucket, key)
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise LocationError(f"{uri!r}: file URIs on another host are not supported")
        return Path(unquote(parts.path, errors="surrogateescape"))
    if "://" in uri:
        raise LocationError(f"{uri!r}: unsupported scheme (use a path, file:// or s3://)")
    # Absolute, so that one file has one URI whatever the working folder (ledger keys depend on it).
    return Path(os.path.abspath(uri))


def join(uri: str, *parts: str) -> str:
    """Join relative parts ('a/b' or 'a', 'b') onto a location, keeping its scheme."""
    location = _parse(uri)
    cleaned = [part.strip("/") for part in parts if part.strip("/")]
    if isinstance(location, _S3Location):
        key = "/".join([location.key.rstrip("/"), *cleaned] if location.key else cleaned)
        return str(_S3Location(location.bucket, key))
    return _local_uri(str(location.joinpath(*cleaned)))


def relative_to(uri: str, base: str) -> str:
    """The part of ``uri`` below ``base``, with '/' separators."""
    location, root = _parse(uri), _parse(base)
    if isinstance(location, _S3Location) and isinstance(root, _S3Location):
        prefix = root.key.rstrip("/") + "/" if root.key else ""
        if location.bucket != root.bucket or not location.key.startswith(prefix):
            raise ValueError(f"{uri} is not under {base}")
        return location.key[len(prefix) :]
    if isinstance(location, Path) and isinstance(root, Path):
        return location.relative_to(root).as_posix()
    raise ValueError(f"{uri} is not under {base}")


# ---------------------------------------------------------------------------------------------
# S3


@functools.cache
def _s3_client(endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    # Clients are thread-safe; one per endpoint, shared by all threads, with a pool large
    # enough for the thread pools that read images and claim rows in parallel. A silent endpoint
    # costs a request 30 s, not botocore's 60 (the step around it has its own limit too). Requests
    # are signed with SigV4 anyway; saying so makes presigned URLs SigV4 too, not SigV2, which
    # buckets made since 2020 refuse.
    config = Config(retries={"max_attempts": 5, "mode": "adaptive"}, max_pool_connections=32,
                    connect_timeout=10, read_timeout=30, signature_version="s3v4")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


_client_lock = threading.Lock()


def _client():
    with _client_lock:
        return _s3_client(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _s3_error(uri: str, error: Exception) -> StorageError:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        bucket = _parse(uri).bucket  # type: ignore[union-attr]
        if code in ("NoSuchBucket",):
            return NotFound(uri, f"no such bucket {bucket!r}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(uri, "no such key")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return AccessDenied(uri, f"access denied ({code})")
        message = error.response.get("Error", {}).get("Message", "")
        return StorageError(uri, f"S3 error {code}: {message}".rstrip(": "))
    if isinstance(error, NoCredentialsError):
        return AccessDenied(uri, "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(error, BotoCoreError):
        return StorageError(uri, f"S3 request failed: {error}")
    return StorageError(uri, str(error))


def _s3_call(uri: str, operation: str, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(_client(), operation)(**kwargs)
    except (BotoCoreError, ClientError) as error:
        raise _s3_error(uri, error) from error


def _s3_missing_key_or_bucket(uri: str, location: _S3Location) -> StorageError:
    """HEAD answers a bare 404 for both a missing key and a missing bucket: tell them apart."""
    try:
        _s3_call(uri, "head_bucket", Bucket=location.bucket)
    except NotFound:
        return NotFound(uri, f"no such bucket {location.bucket!r}")
    return NotFound(uri, "no such key")


# ---------------------------------------------------------------------------------------------
# The verbs


def list_files(uri: str, suffixes: Iterable[str] | None = None, *, missing_ok: bool = False) -> Iterator[str]:
    """Every file below ``uri``, recursively, as URIs in sorted order.

    ``suffixes`` filters by name ending, case-insensitively (e.g. ``{".png", ".jpg"}``).
    ``missing_ok``: a local folder not made yet lists as empty, as an S3 prefix with no keys
    does (a missing bucket is still an error).
    """
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    location = _parse(uri)
    if isinstance(location, _S3Location):
        names = _list_s3(uri, location)
    elif missing_ok and not location.exists():
        return
    else:
        names = _list_local(uri, location)
    for name in names:
        if wanted is None or name.lower().endswith(wanted):
            yield name


def list_folders(uri: str, *, missing_ok: bool = False) -> list[str]:
    """The folders directly below ``uri`` (S3: the common prefixes under it), as sorted URIs, without
    listing what lies inside them: one request per thousand folders on S3, however many files each
    holds. Links to folders are not followed. ``missing_ok`` as in ``list_files``."""
    location = _parse(uri)
    if isinstance(location, _S3Location):
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = location.key.rstrip("/") + "/" if location.key else ""
        paginator = _client().get_paginator("list_objects_v2")
        try:
            return sorted(str(_S3Location(location.bucket, common["Prefix"].rstrip("/")))
                          for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix, Delimiter="/")
                          for common in page.get("CommonPrefixes", []))
        except (BotoCoreError, ClientError) as error:
            raise _s3_error(uri, error) from error
    if missing_ok and not location.exists():
        return []
    if not location.exists():
        raise NotFound(uri, "no such folder")
    if not location.is_dir():
        raise NotAFolder(uri, "not a folder")
    try:
        with os.scandir(location) as entries:
            return sorted(_local_uri(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False))
    except PermissionError as error:
        raise AccessDenied(uri, "permission denied") from error
    except OSError as error:
        raise StorageError(uri, error.strerror or str(error)) from error


PRESIGNED_MAX_SECONDS = 7 * 24 * 3600  # what S3 (Signature Version 4) allows


def presigned_url(uri: str, expires_seconds: int) -> str:
    """A URL anyone holding it can open the file with, no credentials needed: on S3 a presigned GET
    valid for ``expires_seconds`` (at most 7 days; temporary credentials end it sooner, when they
    expire), for a local file its ``file://`` URI, percent-encoded, which never expires. Nothing is
    requested: signing happens here, so a missing file gives a URL that answers 404."""
    if not 0 < expires_seconds <= PRESIGNED_MAX_SECONDS:
        raise ValueError(f"expires_seconds must be in 1..{PRESIGNED_MAX_SECONDS} (7 days), not {expires_seconds!r}")
    location = _parse(uri)
    if isinstance(location, _S3Location):
        return _s3_call(uri, "generate_presigned_url", ClientMethod="get_object",
                        Params={"Bucket": location.bucket, "Key": location.key}, ExpiresIn=int(expires_seconds))
    return location.as_uri()


def _list_s3(uri: str, location: _S3Location) -> Iterator[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    prefix = location.key.rstrip("/") + "/" if location.key else ""
    paginator = _client().get_paginator("list_objects_v2")
    try:
        # S3 returns keys in UTF-8 binary order, which is sorted order for our purposes.
        for page in paginator.paginate(Bucket=location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # folder markers made by consoles
                    yield str(_S3Location(location.bucket, item["Key"]))
    except (BotoCoreError, ClientError) as error:
        raise _s3_error(uri, error) from error


def _list_local(uri: str, root: Path) -> Iterator[str]:
    """Every entry that is not a folder, found without following links or opening anything (a FIFO
    opened to peek would hang). Links to folders are not descended into; a sub-folder that cannot be
    listed is yielded itself, so that the caller can say so (reading it raises ``Unreadable``)."""
    if not root.exists():
        raise NotFound(uri, "no such folder")
    if not root.is_dir():
        raise NotAFolder(uri, "not a folder")
    found: list[str] = []
    pending = [str(root)]  # a stack, not recursion: a thousand nested folders must not end the listing
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as error:
            if folder == str(root):
                if isinstance(error, PermissionError):
                    raise AccessDenied(uri, "permission denied") from error
                raise StorageError(uri, error.strerror or str(error)) from error
            found.append(folder)
            continue
        for entry in listed:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            else:
                found.append(entry.path)
    yield from sorted(_local_uri(path) for path in found)


def _local_uri(path: str) -> str:
    """A path, or, where the name is not valid UTF-8 (Linux allows any bytes), a ``file://`` URI with
    its bytes percent-encoded (RFC 8089): every output (JSON, CSV, Prefect's database) stays UTF-8,
    and the URI still opens the same file."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(path))


def read_bytes(uri: str, length: int | None = None, *, max_bytes: int | None = None,
               within: str | None = None) -> bytes:
    """The file's content, or only its first ``length`` bytes (one ranged GET on S3).

    For inputs that nobody vouches for: ``max_bytes`` refuses a larger file from its size (stat, or
    the GET's Content-Length) before reading it; ``within`` refuses a local link that leads outside
    that folder. Only regular files are ever opened, so a FIFO or a device cannot hang or flood the
    reader. Such refusals raise ``Unreadable``.
    """
    location = _parse(uri)
    if isinstance(location, _S3Location):
        return _read_s3(uri, location, length, max_bytes)
    return _read_local(uri, location, length, max_bytes, within)


def _read_s3(uri: str, location: _S3Location, length: int | None, max_bytes: int | None) -> bytes:
    extra = {"Range": f"bytes=0-{length - 1}"} if length else {}
    try:
        response = _s3_call(uri, "get_object", Bucket=location.bucket, Key=location.key, **extra)
    except StorageError as error:
        if length and "InvalidRange" in error.reason:  # an empty object has no byte 0
            return b""
        if "InvalidObjectState" in error.reason:
            raise Unreadable(uri, "archived object (Glacier or Deep Archive): restore it to screen it") from error
        raise
    from botocore.exceptions import BotoCoreError

    body = response["Body"]
    try:
        if max_bytes is not None and not length and int(response.get("ContentLength") or 0) > max_bytes:
            raise Unreadable(uri, _too_large(int(response["ContentLength"]), max_bytes))
        # Bounded even if a server ignores the Range header or the object grew.
        data = body.read(length if length else None if max_bytes is None else max_bytes + 1)
    except BotoCoreError as error:  # the connection broke mid-body: worth a retry
        raise _s3_error(uri, error) from error
    finally:
        body.close()
    if max_bytes is not None and not length and len(data) > max_bytes:
        raise Unreadable(uri, _too_large(len(data), max_bytes))
    return data


def _too_large(size: int, limit: int) -> str:
    return f"file too large: {size:,} bytes, over the limit of {limit:,} (max_file_bytes)"


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def _read_local(uri: str, path: Path, length: int | None, max_bytes: int | None, within: str | None) -> bytes:
    try:
        if os.path.islink(path):
            path = _follow(uri, path, within)
        info = os.stat(path)
        _check_regular(uri, info, max_bytes if length is None else None)
        # O_NONBLOCK: should a FIFO replace the file after the check, open() and read() return at once.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except Unreadable:
        raise
    except FileNotFoundError as error:
        raise NotFound(uri, "no such file") from error
    except PermissionError as error:
        raise Unreadable(uri, "permission denied") from error
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise Unreadable(uri, "replaced by a link while being read: not followed") from error
        raise Unreadable(uri, f"cannot be read: {error.strerror or error}") from error
    with os.fdopen(descriptor, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise Unreadable(uri, "replaced while being read")
        if within is not None:
            _check_inside(uri, handle.fileno(), within)
        _check_regular(uri, opened, max_bytes if length is None else None)
        try:
            if length is not None:
                return handle.read(length)
            # One byte over the limit tells a file that grew after the check.
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        except OSError as error:
            raise Unreadable(uri, f"read error: {error.strerror or error}") from error
    if max_bytes is not None and len(data) > max_bytes:
        raise Unreadable(uri, _too_large(len(data), max_bytes))
    return data


def _follow(uri: str, path: Path, within: str | None) -> Path:
    try:
        os.stat(path)  # realpath() does not tell a loop from a dangling link
        target = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        raise Unreadable(uri, "broken link: its target does not exist") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise Unreadable(uri, "broken link: a loop of symbolic links") from None
        raise Unreadable(uri, f"broken link: {error.strerror or error}") from None
    if within is not None:
        root = Path(os.path.realpath(_parse(within)))
        if target != root and root not in target.parents:
            raise Unreadable(uri, "link leads outside the incoming folder: not followed")
    return target


def _check_inside(uri: str, descriptor: int, within: str) -> None:
    """Where the open file really is (a folder on its path may have become a link since the listing);
    the descriptor is fixed, so this cannot race."""
    try:
        actual = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
    except OSError:
        return  # no /proc (not Linux): the link checks above are what there is
    root = Path(os.path.realpath(_parse(within)))
    if actual != root and root not in actual.parents:
        raise Unreadable(uri, "lies outside the incoming folder through a linked folder: not read")


def _check_regular(uri: str, info: os.stat_result, max_bytes: int | None) -> None:
    if stat.S_ISDIR(info.st_mode):
        # Listing yields a sub-folder only when it could not list it.
        listable = os.access(_parse(uri), os.R_OK | os.X_OK)
        raise Unreadable(uri, "a folder, not a file" if listable else "a folder that cannot be listed: permission denied")
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a file")
        raise Unreadable(uri, f"not a regular file: {kind}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise Unreadable(uri, _too_large(info.st_size, max_bytes))


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    location = _parse(uri)
    if isinstance(location, _S3Location):
        _s3_call(uri, "put_object", Bucket=location.bucket, Key=location.key, Body=data)
        return
    _replace(uri, location, data)


def _replace(uri: str, location: Path, data: bytes) -> None:
    """Writes ``data`` beside ``location`` and renames it over, so no reader sees a part."""
    temporary = _write_temporary(uri, location, data)
    try:
        os.replace(temporary, location)
    except OSError as error:
        os.unlink(temporary)
        raise _write_error(uri, error) from error


def create_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` unless it exists. True when this call created it.

    Exactly one of any number of concurrent callers wins, on a folder and on S3 alike.
    """
    location = _parse(uri)
    if isinstance(location, _S3Location):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _client().put_object(Bucket=location.bucket, Key=location.key, Body=data, IfNoneMatch="*")
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            # 409 ConditionalRequestConflict: another writer's put to this key is in flight.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise _s3_error(uri, error) from error
        except BotoCoreError as error:
            raise _s3_error(uri, error) from error
        return True
    # A hard link to a complete temporary file is O_EXCL with the content already in place:
    # nobody ever sees the file half-written.
    temporary = _write_temporary(uri, location, data)
    try:
        os.link(temporary, location)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise StorageError(uri, error.strerror or str(error)) from error
        return _create_exclusive(uri, location, data)  # file systems without hard links
    finally:
        os.unlink(temporary)


def _create_exclusive(uri: str, location: Path, data: bytes) -> bool:
    try:
        descriptor = os.open(location, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
    except OSError as error:
        os.unlink(location)  # a half-written claim would stand for ever
        raise _write_error(uri, error) from error
    return True


def _write_temporary(uri: str, location: Path, data: bytes) -> str:
    try:
        location.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=location.parent, prefix=f".{location.name}.", suffix=".tmp")
    except FileExistsError as error:
        raise NotAFolder(uri, f"{error.filename} is a file, not a folder") from error
    except PermissionError as error:
        raise AccessDenied(uri, "permission denied") from error
    except OSError as error:
        raise _write_error(uri, error) from error
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
    except OSError as error:
        os.unlink(temporary)  # a full disk must not also fill up with halves of files
        raise _write_error(uri, error) from error
    return temporary


def _write_error(uri: str, error: OSError) -> StorageError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NoSpace(uri, f"cannot write: {os.strerror(error.errno)}; nothing was written")
    return StorageError(uri, f"cannot write: {error.strerror or error}")


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The file's content and a token of this version of it, for ``replace_if_unchanged``; (None,
    None) when it does not exist. The token is the ETag on S3 (the content's MD5: equal bytes are
    the same version), locally the inode and the content's sha256."""
    location = _parse(uri)
    if isinstance(location, _S3Location):
        try:
            response = _s3_call(uri, "get_object", Bucket=location.bucket, Key=location.key)
        except NotFound as error:
            if "bucket" in error.reason:
                raise
            return None, None
        from botocore.exceptions import BotoCoreError

        try:
            return response["Body"].read(), response["ETag"]
        except BotoCoreError as error:
            raise _s3_error(uri, error) from error
    return _read_local_versioned(uri, location)


def _read_local_versioned(uri: str, location: Path) -> tuple[bytes | None, str | None]:
    try:
        with open(location, "rb") as handle:  # the inode and the bytes of one and the same file
            data = handle.read()
            inode = os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return None, None
    except OSError as error:
        raise StorageError(uri, f"cannot read: {error.strerror or error}") from error
    return data, f"{inode}:{hashlib.sha256(data).hexdigest()}"


def replace_if_unchanged(uri: str, data: bytes, token: str | None, *, lock_wait_seconds: float = 10.0) -> bool:
    """Write ``data`` only if the file is still the version ``read_versioned`` gave ``token`` for
    (``token`` None: only if it still does not exist). True when written; False when another
    writer changed it in between, and then nothing was written.

    S3: a conditional PUT (If-Match the ETag, or If-None-Match '*'). A folder: an atomic replace
    under a lock file created with O_EXCL (``<name>.lock``, held for milliseconds), after checking
    the token again under it. A lock left by a killed writer is named in the error, never broken.
    """
    location = _parse(uri)
    if isinstance(location, _S3Location):
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _client().put_object(Bucket=location.bucket, Key=location.key, Body=data, **condition)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            # 412: changed; 409: another conditional write to it is in flight; 404: deleted since.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                if code in ("NoSuchKey", "404"):
                    _s3_call(uri, "head_bucket", Bucket=location.bucket)  # a missing bucket is an error
                return False
            raise _s3_error(uri, error) from error
        except BotoCoreError as error:
            raise _s3_error(uri, error) from error
        return True
    lock = location.with_name(location.name + ".lock")
    _take_lock(uri, lock, lock_wait_seconds)
    try:
        if _read_local_versioned(uri, location)[1] != token:
            return False
        _replace(uri, location, data)
        return True
    finally:
        lock.unlink(missing_ok=True)


def _take_lock(uri: str, lock: Path, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if time.monotonic() > deadline:
                raise StorageError(uri, f"{lock} has been held for over {wait_seconds:g} s: another writer is "
                                        "stuck or was killed; if none is running, remove it") from None
            time.sleep(0.01)
            continue
        except PermissionError as error:
            raise AccessDenied(uri, "permission denied") from error
        except OSError as error:
            raise _write_error(uri, error) from error
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"pid {os.getpid()} at {time.time():.0f}\n")  # for whoever finds it left behind
        return


def exists(uri: str) -> bool:
    location = _parse(uri)
    if isinstance(location, _S3Location):
        try:
            _s3_call(uri, "head_object", Bucket=location.bucket, Key=location.key)
        except NotFound:
            error = _s3_missing_key_or_bucket(uri, location)
            if "bucket" in error.reason:
                raise error from None
            return False
        return True
    return location.exists()


def delete(uri: str) -> None:
    """Remove one file; a file already gone is not an error. Used for run leases, never for inputs."""
    location = _parse(uri)
    if isinstance(location, _S3Location):
        _s3_call(uri, "delete_object", Bucket=location.bucket, Key=location.key)  # S3 deletes are idempotent
        return
    try:
        location.unlink(missing_ok=True)
    except IsADirectoryError as error:
        raise StorageError(uri, "is a folder, not a file") from error
    except PermissionError as error:
        raise AccessDenied(uri, "permission denied") from error
