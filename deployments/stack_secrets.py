"""The stack folder's private files: its state and the secrets it makes once and keeps (the
Prefect API's credentials, the S3 key pair, the signing key, the PostgreSQL and PACS passwords).

A file is trusted only as the stack writes it: a regular file of this user's, mode 0600, read
through no link; anything else is refused with one line naming it (``StackStateError``).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from deployments.sigv4 import Credentials, CredentialsError, new_credentials, read_credentials
from store.private_files import write_private

__all__ = ["API_AUTH", "PACS_PASSWORD", "POSTGRES_DATA", "POSTGRES_PASSWORD", "S3_CREDENTIALS", "SIGNING_KEY",
           "StackStateError", "api_auth", "pacs_password", "postgres_password", "read_private", "s3_credentials",
           "signing_key", "stored_secret", "trusted_folder", "write_text"]

SIGNING_KEY = "signing-key"  # the HMAC key the stack's models are signed with
POSTGRES_DATA = "postgres"  # the PostgreSQL cluster, with --database postgres
POSTGRES_PASSWORD = "postgres-password"
S3_CREDENTIALS = "s3-credentials"  # the only key pair the local S3 accepts
API_AUTH = "prefect-auth"  # the Prefect API's credentials, 'cxr:<token>', as its UI's login asks for them
PACS_PASSWORD = "pacs-password"


class StackStateError(ValueError):
    """A stack's state file or signing key this code does not trust or cannot read; the message is
    one line naming the file and the reason."""


def read_private(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of ``path``, a regular file owned by this user and readable by this user alone
    (mode 0600, as the stack writes its state and key); None when there is none. StackStateError
    naming the file otherwise: whoever else could write it could make 'stack down' stop any process
    of this user's, or name the key models are signed with."""
    trusted = "the stack writes it as a file of yours, mode 0600"
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        reason = "a symbolic link" if error.errno == errno.ELOOP else f"cannot be read ({error.strerror})"
        raise StackStateError(f"{path}: not trusted: {reason}; {trusted}") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            problem = "not a regular file"
        elif info.st_uid != os.geteuid():
            problem = f"owned by uid {info.st_uid}, not by you (uid {os.geteuid()})"
        elif mode != 0o600:
            problem = f"mode {mode:04o}, not 0600"
        else:
            return handle.read(max_bytes + 1)  # more is refused by the parser
    raise StackStateError(f"{path}: not trusted: {problem}; {trusted}: if no stack of yours runs from "
                          f"{path.parent}, remove it")


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically, mode 0600 whatever the umask (a planted link is replaced, never followed)."""
    write_private(path, text.encode())

def stored_secret(folder: Path, name: str, make: Callable[[], str], pattern: str, what: str) -> str:
    """``<folder>/<name>``: made the first time (mode 0600) and read back after, so that clients
    and what it protects outlive a restart; StackStateError when it is not what the stack made."""
    path = folder / name
    data = read_private(path, 1024)
    if data is None:
        secret = make()
        write_text(path, secret + "\n")
        return secret
    secret = data.decode("ascii", errors="replace").strip()
    if not re.fullmatch(pattern, secret):
        raise StackStateError(f"{path}: not {what}")
    return secret


def postgres_password(folder: Path) -> str:
    """The password of the stack's PostgreSQL cluster: ``<folder>/postgres-password``, 43 URL-safe characters."""
    if (folder / POSTGRES_DATA / "PG_VERSION").exists() and not (folder / POSTGRES_PASSWORD).exists():
        raise StackStateError(f"{folder / POSTGRES_PASSWORD}: missing, and the cluster in {folder / POSTGRES_DATA} "
                              "was made with it: restore it, or remove the cluster ('stack down --wipe')")
    return stored_secret(folder, POSTGRES_PASSWORD, lambda: secrets.token_urlsafe(32), r"[A-Za-z0-9_-]{43}",
                          "a password the stack made: restore it, or remove it together with the cluster in "
                          f"{folder / POSTGRES_DATA} ('stack down --wipe')")


def s3_credentials(folder: Path) -> Credentials:
    """The key pair the local S3 checks signatures against: ``<folder>/s3-credentials`` (JSON, 0600),
    made the first time and kept, so that a client environment and the stored data outlive a restart."""
    path = folder / S3_CREDENTIALS
    if not path.exists() and not path.is_symlink():
        write_text(path, new_credentials().document())
    try:
        return read_credentials(path)
    except CredentialsError as error:
        raise StackStateError(f"{error}: remove it (a new pair is made at 'stack up')") from None


def signing_key(folder: Path) -> str:
    """The stack's signing key: ``<folder>/signing-key``, 64 hex digits. A new one makes the models
    signed with the old one refused."""
    return stored_secret(folder, SIGNING_KEY, lambda: secrets.token_hex(32), r"[0-9a-f]{64}",
                          "a key the stack made (64 hex digits): remove it (a new one is made, and models signed "
                          "with the old one are refused)")


def api_auth(folder: Path) -> str:
    """The Prefect API's credentials: ``<folder>/prefect-auth``, 'cxr:' and 43 URL-safe characters."""
    return stored_secret(folder, API_AUTH, lambda: f"cxr:{secrets.token_urlsafe(32)}", r"cxr:[A-Za-z0-9_-]{43}",
                          "the Prefect API's credentials as the stack makes them: remove it (a new one is made at "
                          "'stack up'; clients then need the new client environment)")


def pacs_password(folder: Path) -> str:
    """The password Orthanc asks user ``cxr`` for: ``<folder>/pacs-password``, 43 URL-safe characters."""
    return stored_secret(folder, PACS_PASSWORD, lambda: secrets.token_urlsafe(32), r"[A-Za-z0-9_-]{43}",
                          "a password the stack made: remove it (a new one is made at 'stack up --pacs'; clients "
                          "then need the new client environment)")


def trusted_folder(folder: Path) -> None:
    """StackStateError unless ``folder`` is this user's and nobody else can write it."""
    info = folder.stat()
    if info.st_uid != os.geteuid():
        raise StackStateError(f"{folder}: owned by uid {info.st_uid}, not by you (uid {os.geteuid()}): a stack "
                              "runs only from a folder of yours")
    if info.st_mode & 0o022:
        raise StackStateError(f"{folder}: others can write it (mode {stat.S_IMODE(info.st_mode):04o}), and could "
                              f"plant the settings and state the stack's processes read: chmod go-w {folder}")
