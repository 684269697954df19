"""Local folders behind the storage verbs: plain paths and ``file://`` URIs, hardened for inputs nobody
vouches for. Only regular files are opened (never a FIFO or a device), links are checked and, with
``within``, kept inside a folder; writes are atomic (a complete temporary file renamed or hard-linked
into place); ``replace_if_unchanged`` runs under an O_EXCL lock file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

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
    too_large,
)

__all__ = ["NEW_FILE_MODE", "LocalBackend"]

# Files written here get this mode less the process' umask, as any program's files do: umask 022
# gives 0644, 027 keeps them from others (0640), 077 private (0600). Folders get 0777 less the umask.
NEW_FILE_MODE = 0o666


def _path(uri: str) -> Path:
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise LocationError(f"{uri!r}: file URIs on another host are not supported")
        return Path(unquote(parts.path, errors="surrogateescape"))
    # Absolute, so that one file has one URI whatever the working folder (ledger keys depend on it).
    return Path(os.path.abspath(uri))


def _local_uri(path: str) -> str:
    """A path, or, where the name is not valid UTF-8 (Linux allows any bytes), a ``file://`` URI with
    its bytes percent-encoded (RFC 8089): every output (JSON, CSV, Prefect's database) stays UTF-8,
    and the URI still opens the same file."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(path))


class LocalBackend(Backend):
    """This machine's folders. Not shared: a remote worker cannot see them. Conditional writes are
    atomic among the processes of this machine (hard links and O_EXCL)."""

    capabilities = Capabilities(shared=False, presignable=False, conditional_writes=True)

    def join(self, uri: str, parts: Sequence[str]) -> str:
        return _local_uri(str(_path(uri).joinpath(*parts)))

    def relative_to(self, uri: str, base: str) -> str:
        return _path(uri).relative_to(_path(base)).as_posix()

    def canonical(self, uri: str) -> str:
        return "file:" + os.path.realpath(_path(uri))

    def presigned_url(self, uri: str, expires_seconds: int) -> str:
        return _path(uri).as_uri()

    def list_files(self, uri: str, *, missing_ok: bool) -> Iterator[str]:
        root = _path(uri)
        if missing_ok and not root.exists():
            return iter(())
        return _list(uri, root)

    def list_files_stamped(self, uri: str, *, missing_ok: bool) -> Iterator[tuple[str, str | None]]:
        """The stamp: inode, size, modification and change times (of the link and of its target for a
        link), from stat calls only: nothing is opened."""
        root = _path(uri)
        if missing_ok and not root.exists():
            return iter(())
        return ((name, _stamp(path)) for name, path in _walk(uri, root))

    def list_folders(self, uri: str, *, missing_ok: bool) -> list[str]:
        location = _path(uri)
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

    def read_bytes(self, uri: str, length: int | None, max_bytes: int | None, within: str | None) -> bytes:
        return _read(uri, _path(uri), length, max_bytes, within)

    def write_bytes(self, uri: str, data: bytes) -> None:
        _replace(uri, _path(uri), data)

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        location = _path(uri)
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

    def read_versioned(self, uri: str) -> tuple[bytes | None, str | None]:
        """The token is the inode and the content's sha256."""
        return _read_versioned(uri, _path(uri))

    def replace_if_unchanged(self, uri: str, data: bytes, token: str | None, lock_wait_seconds: float) -> bool:
        """An atomic replace under a lock file created with O_EXCL (``<name>.lock``, held for
        milliseconds), after checking the token again under it. A lock left by a killed writer is
        named in the error, never broken."""
        location = _path(uri)
        lock = location.with_name(location.name + ".lock")
        _take_lock(uri, lock, lock_wait_seconds)
        try:
            if _read_versioned(uri, location)[1] != token:
                return False
            _replace(uri, location, data)
            return True
        finally:
            lock.unlink(missing_ok=True)

    def exists(self, uri: str) -> bool:
        return _path(uri).exists()

    def delete(self, uri: str) -> None:
        try:
            _path(uri).unlink(missing_ok=True)
        except IsADirectoryError as error:
            raise StorageError(uri, "is a folder, not a file") from error
        except PermissionError as error:
            raise AccessDenied(uri, "permission denied") from error


# ---------------------------------------------------------------------------------------------
# Listing and reading


def _list(uri: str, root: Path) -> Iterator[str]:
    """Every entry that is not a folder, found without following links or opening anything (a FIFO
    opened to peek would hang). Links to folders are not descended into; a sub-folder that cannot be
    listed is yielded itself, so that the caller can say so (reading it raises ``Unreadable``)."""
    return (name for name, _ in _walk(uri, root))


def _stamp(path: str) -> str | None:
    """What changes when the file's bytes may have: a rewrite in place changes the times (a
    modification time set back still moves the change time), a replacement the inode. None for a
    folder (one that could not be listed) or a link that leads nowhere."""
    try:
        own = os.stat(path, follow_symlinks=False)
        stamps = [own] if not stat.S_ISLNK(own.st_mode) else [own, os.stat(path)]
    except OSError:
        return None
    if stat.S_ISDIR(stamps[-1].st_mode):
        return None
    return "->".join(f"{s.st_dev}:{s.st_ino}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}" for s in stamps)


def _walk(uri: str, root: Path) -> Iterator[tuple[str, str]]:
    """``_list``'s entries as (URI, path), sorted by URI."""
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
    yield from sorted((_local_uri(path), path) for path in found)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def _read(uri: str, path: Path, length: int | None, max_bytes: int | None, within: str | None) -> bytes:
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
        raise Unreadable(uri, too_large(len(data), max_bytes))
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
        root = Path(os.path.realpath(_path(within)))
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
    root = Path(os.path.realpath(_path(within)))
    if actual != root and root not in actual.parents:
        raise Unreadable(uri, "lies outside the incoming folder through a linked folder: not read")


def _check_regular(uri: str, info: os.stat_result, max_bytes: int | None) -> None:
    if stat.S_ISDIR(info.st_mode):
        # Listing yields a sub-folder only when it could not list it.
        listable = os.access(_path(uri), os.R_OK | os.X_OK)
        raise Unreadable(uri, "a folder, not a file" if listable else "a folder that cannot be listed: permission denied")
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a file")
        raise Unreadable(uri, f"not a regular file: {kind}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise Unreadable(uri, too_large(info.st_size, max_bytes))


def _read_versioned(uri: str, location: Path) -> tuple[bytes | None, str | None]:
    try:
        with open(location, "rb") as handle:  # the inode and the bytes of one and the same file
            data = handle.read()
            inode = os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return None, None
    except OSError as error:
        raise StorageError(uri, f"cannot read: {error.strerror or error}") from error
    return data, f"{inode}:{hashlib.sha256(data).hexdigest()}"


# ---------------------------------------------------------------------------------------------
# Writing


def _replace(uri: str, location: Path, data: bytes) -> None:
    """Writes ``data`` beside ``location`` and renames it over, so no reader sees a part."""
    temporary = _write_temporary(uri, location, data)
    try:
        os.replace(temporary, location)
    except OSError as error:
        os.unlink(temporary)
        raise _write_error(uri, error) from error


def _create_exclusive(uri: str, location: Path, data: bytes) -> bool:
    try:
        descriptor = os.open(location, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
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
    except FileExistsError as error:
        raise NotAFolder(uri, f"{error.filename} is a file, not a folder") from error
    except PermissionError as error:
        raise AccessDenied(uri, "permission denied") from error
    except OSError as error:
        raise _write_error(uri, error) from error
    try:
        descriptor, temporary = _new_temporary(location)
    except PermissionError as error:
        raise AccessDenied(uri, "permission denied") from error
    except OSError as error:
        raise _write_error(uri, error) from error
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        os.unlink(temporary)  # a full disk must not also fill up with halves of files
        raise _write_error(uri, error) from error
    return temporary


def _new_temporary(location: Path) -> tuple[int, str]:
    """A new, empty file beside ``location`` (``.<name>.<random>.tmp``), open for writing, with the
    mode every file the user's programs make gets: ``NEW_FILE_MODE`` less the umask (mkstemp's
    0600 would make every output private, and a fixed 0644 would ignore a umask that keeps them
    from others)."""
    while True:  # 64 random bits: a name taken twice in a row does not happen
        temporary = str(location.with_name(f".{location.name}.{secrets.token_hex(8)}.tmp"))
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, NEW_FILE_MODE), temporary
        except FileExistsError:
            continue


def _write_error(uri: str, error: OSError) -> StorageError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NoSpace(uri, f"cannot write: {os.strerror(error.errno)}; nothing was written")
    return StorageError(uri, f"cannot write: {error.strerror or error}")


def _take_lock(uri: str, lock: Path, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
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
