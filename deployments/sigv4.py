"""AWS Signature Version 4, checked the way S3 checks it, for the local stack's S3 endpoint.

The endpoint knows one key pair, read from a file the stack writes (``read_credentials``). A request
passes when it carries a SigV4 signature for service ``s3`` made with that pair: in the
``Authorization`` header, or in the query of a presigned URL. Anything else is a ``Refused`` with
the S3 error code and HTTP status S3 would answer.

S3 signs the path as sent (no normalising, no second encoding), so the canonical request is built
from the request line's bytes, not from a decoded path. The payload is covered by the
``x-amz-content-sha256`` value in the signature; when that value is a digest, the caller checks the
body against it (``verify`` returns it). A presigned URL covers no payload (``UNSIGNED-PAYLOAD``).
"""

from __future__ import annotations

import calendar
import email.utils
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Credentials", "CredentialsError", "Refused", "Request", "new_credentials", "read_credentials", "verify"]

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
MAX_SKEW_SECONDS = 15 * 60  # S3's limit on a signed request's clock
MAX_PRESIGNED_SECONDS = 7 * 24 * 3600  # S3's longest presigned URL
MAX_CREDENTIALS_BYTES = 4096
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"  # aws-chunked body with a checksum trailer, unsigned
SIGNED_CHUNKS = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SECRET = re.compile(r"[\x21-\x7e]{8,256}")  # printable ASCII, no spaces
_DIGEST = re.compile(r"[0-9a-f]{64}")
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
_PRESIGN_PARAMETERS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
                       "X-Amz-Signature")


@dataclass(frozen=True)
class Credentials:
    """The one key pair the endpoint accepts."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    def document(self) -> str:
        """The credentials file's text (JSON), for whoever writes the file (mode 0600)."""
        return json.dumps({"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key})


class CredentialsError(ValueError):
    """A credentials file that cannot be trusted or read; the message starts with its path."""


@dataclass(frozen=True)
class Request:
    """What a signature covers, as it arrived: method, request target (path and query exactly as
    sent) and every header with its name and value."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]


class Refused(Exception):
    """A request S3 would refuse: its HTTP status, S3 error code and a message for the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def new_credentials() -> Credentials:
    """A fresh random key pair, shaped like AWS's (20-character id, 40-character secret)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return Credentials("CXR" + "".join(secrets.choice(alphabet) for _ in range(17)), secrets.token_urlsafe(30))


def read_credentials(path: Path) -> Credentials:
    """The key pair in ``path``: JSON ``{"access_key_id": ..., "secret_access_key": ...}``, in a
    regular file of this user that nobody else can read or write; CredentialsError otherwise."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise CredentialsError(f"{path}: a symbolic link; the credentials must be the file itself") from None
        raise CredentialsError(f"{path}: cannot be opened ({error.strerror})") from None
    with open(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CredentialsError(f"{path}: not a regular file")
        if info.st_uid != os.geteuid():
            raise CredentialsError(f"{path}: owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})")
        if info.st_mode & 0o077:
            raise CredentialsError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o}, but credentials must be readable "
                                   "by their owner only (0600)")
        data = handle.read(MAX_CREDENTIALS_BYTES + 1)
    try:
        document = json.loads(data) if len(data) <= MAX_CREDENTIALS_BYTES else None
    except ValueError:
        document = None
    access_key_id = document.get("access_key_id") if isinstance(document, dict) else None
    secret = document.get("secret_access_key") if isinstance(document, dict) else None
    if not (isinstance(access_key_id, str) and _ACCESS_KEY_ID.fullmatch(access_key_id)
            and isinstance(secret, str) and _SECRET.fullmatch(secret)):
        raise CredentialsError(f"{path}: not JSON with an access_key_id (letters, digits, '.', '_', '-') and a "
                               "secret_access_key (8 to 256 printable characters, no spaces)")
    return Credentials(access_key_id, secret)


def verify(request: Request, credentials: Credentials, now: float | None = None) -> str | None:
    """Check ``request``'s SigV4 signature; Refused when it is missing, malformed, stale, made with
    another key or does not match. Returns the SHA-256 (hex) the body must have, or None when the
    signature does not cover the body."""
    now = time.time() if now is None else now
    path, _, query = request.target.partition("?")
    parameters = _query_parameters(query)
    headers = _headers(request.headers)
    presigned = any(name in ("X-Amz-Signature", "X-Amz-Algorithm") for name, _ in parameters)
    if "authorization" in headers and presigned:
        raise Refused(400, "InvalidArgument", "Only one auth mechanism allowed: the Authorization header or "
                                              "the X-Amz- query parameters, not both")
    if presigned:
        fields, amz_date, payload_hash = _presigned_fields(parameters, now)
        parameters = [(name, value) for name, value in parameters if name != "X-Amz-Signature"]
    else:
        fields, amz_date, payload_hash = _header_fields(headers, now)
    access_key_id, scope = _scope(fields["Credential"], amz_date)
    if not hmac.compare_digest(access_key_id.encode(), credentials.access_key_id.encode()):
        raise Refused(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
    signed_headers = _signed_headers(fields["SignedHeaders"], headers)
    canonical = "\n".join([request.method.upper(), path or "/", _canonical_query(parameters),
                           "".join(f"{name}:{_header_value(headers[name])}\n" for name in signed_headers),
                           ";".join(signed_headers), payload_hash])
    string_to_sign = "\n".join([ALGORITHM, amz_date, "/".join(scope),
                                hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()])
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in scope:
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), fields["Signature"].encode()):
        raise Refused(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the "
                                                    "signature you provided. Check your key and signing method.")
    return payload_hash if _DIGEST.fullmatch(payload_hash) else None


def _query_parameters(query: str) -> list[tuple[str, str]]:
    """The query's names and values, decoded. A ``+`` or an escape that is not UTF-8 is refused: the
    server behind reads ``+`` as a space and such bytes as something else, so the request it acts on
    would not be the one that was signed (SigV4 clients escape both)."""
    pairs = []
    for pair in query.split("&") if query else []:
        name, _, value = pair.partition("=")
        if "+" in pair:
            raise Refused(400, "InvalidArgument", "A '+' in the query is ambiguous: escape it as %2B, or a space as %20")
        try:
            pairs.append(tuple(urllib.parse.unquote(part, errors="strict") for part in (name, value)))
        except UnicodeDecodeError:
            raise Refused(400, "InvalidArgument", "The query escapes bytes that are not UTF-8") from None
    return pairs


def _headers(headers: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    """Every header's values by lower-cased name, in the order they came."""
    by_name: dict[str, list[str]] = {}
    for name, value in headers:
        by_name.setdefault(name.lower(), []).append(value)
    return by_name


def _header_value(values: list[str]) -> str:
    return ",".join(" ".join(value.split()) for value in values)


def _one(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    if values is None:
        return None
    if len(values) > 1:
        raise Refused(403, "AccessDenied", f"More than one {name} header")
    return values[0]


def _header_fields(headers: dict[str, list[str]], now: float) -> tuple[dict[str, str], str, str]:
    """The Authorization header's Credential, SignedHeaders and Signature, the request's time
    (ISO 8601 basic) and its payload hash."""
    authorization = _one(headers, "authorization")
    if authorization is None:
        raise Refused(403, "AccessDenied", "Anonymous access is not allowed: sign requests with AWS Signature "
                                           "Version 4")
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise Refused(403, "AccessDenied", f"Only {ALGORITHM} (Signature Version 4) is accepted")
    fields = {}
    for part in rest.split(","):
        name, equals, value = part.strip().partition("=")
        if not equals or name in fields:
            raise Refused(403, "AccessDenied", "Malformed Authorization header")
        fields[name] = value
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise Refused(403, "AccessDenied", "The Authorization header must have Credential, SignedHeaders and "
                                           "Signature, and nothing else")
    amz_date = _one(headers, "x-amz-date")
    if amz_date is None:
        date = _one(headers, "date")
        if date is None:
            raise Refused(403, "AccessDenied", "A signed request needs an X-Amz-Date or Date header")
        try:
            amz_date = time.strftime("%Y%m%dT%H%M%SZ", email.utils.parsedate_to_datetime(date).utctimetuple())
        except (TypeError, ValueError):
            raise Refused(403, "AccessDenied", "The Date header is not an HTTP date") from None
    if abs(_seconds(amz_date) - now) > MAX_SKEW_SECONDS:
        raise Refused(403, "RequestTimeTooSkewed", "The difference between the request time and the server's "
                                                   "time is too large (more than 15 minutes).")
    payload_hash = _one(headers, "x-amz-content-sha256")
    if payload_hash is None:
        raise Refused(403, "AccessDenied", "Missing required header for this request: x-amz-content-sha256")
    if payload_hash.startswith(("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "STREAMING-AWS4-ECDSA")):
        raise Refused(403, "AccessDenied", f"Signed aws-chunked payloads ({payload_hash}) are not accepted here: "
                                           f"send the body's SHA-256, {UNSIGNED_PAYLOAD} or {UNSIGNED_TRAILER}")
    if not (_DIGEST.fullmatch(payload_hash) or payload_hash in (UNSIGNED_PAYLOAD, UNSIGNED_TRAILER)):
        raise Refused(400, "InvalidArgument", "x-amz-content-sha256 must be the payload's SHA-256 in lower-case hex, "
                                              f"{UNSIGNED_PAYLOAD} or {UNSIGNED_TRAILER}")
    return fields, amz_date, payload_hash


def _presigned_fields(parameters: list[tuple[str, str]], now: float) -> tuple[dict[str, str], str, str]:
    """A presigned URL's Credential, SignedHeaders and Signature, its time and its payload hash."""
    given: dict[str, str] = {}
    for name, value in parameters:
        if name in _PRESIGN_PARAMETERS:
            if name in given:
                raise Refused(403, "AccessDenied", f"{name} is given more than once")
            given[name] = value
    missing = [name for name in _PRESIGN_PARAMETERS if name not in given]
    if missing:
        raise Refused(403, "AccessDenied", f"Query-string authentication requires {', '.join(missing)}")
    if given["X-Amz-Algorithm"] != ALGORITHM:
        raise Refused(403, "AccessDenied", f"X-Amz-Algorithm must be {ALGORITHM}")
    if not given["X-Amz-Expires"].isdigit() or not 1 <= int(given["X-Amz-Expires"]) <= MAX_PRESIGNED_SECONDS:
        raise Refused(403, "AccessDenied", f"X-Amz-Expires must be a number of seconds from 1 to "
                                           f"{MAX_PRESIGNED_SECONDS} (7 days)")
    signed_at = _seconds(given["X-Amz-Date"])
    if signed_at - now > MAX_SKEW_SECONDS:
        raise Refused(403, "AccessDenied", "Request is not valid yet (X-Amz-Date is in the future)")
    if now > signed_at + int(given["X-Amz-Expires"]):
        raise Refused(403, "AccessDenied", "Request has expired")
    fields = {"Credential": given["X-Amz-Credential"], "SignedHeaders": given["X-Amz-SignedHeaders"],
              "Signature": given["X-Amz-Signature"]}
    return fields, given["X-Amz-Date"], UNSIGNED_PAYLOAD


def _seconds(amz_date: str) -> float:
    """An X-Amz-Date (``20250101T120000Z``) as seconds since the epoch."""
    if not _AMZ_DATE.fullmatch(amz_date):
        raise Refused(403, "AccessDenied", "X-Amz-Date must be ISO 8601 basic format, like 20250101T120000Z")
    try:
        return float(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        raise Refused(403, "AccessDenied", f"X-Amz-Date {amz_date} is not a date") from None


def _scope(credential: str, amz_date: str) -> tuple[str, list[str]]:
    """The access key id and the scope (date, region, service, terminator) of a Credential field;
    the region is the client's to pick, the rest must be as SigV4 for S3 says."""
    parts = credential.split("/")
    if len(parts) != 5 or not all(parts):
        raise Refused(403, "AccessDenied", "Credential must be <access key id>/<date>/<region>/s3/aws4_request")
    access_key_id, date, _region, service, terminator = parts
    if date != amz_date[:8]:
        raise Refused(403, "SignatureDoesNotMatch", f"The credential's date {date} is not the request's day "
                                                    f"({amz_date[:8]})")
    if service != SERVICE or terminator != "aws4_request":
        raise Refused(403, "SignatureDoesNotMatch", "The credential must be scoped to service s3 and aws4_request")
    return access_key_id, parts[1:]


def _signed_headers(signed: str, headers: dict[str, list[str]]) -> list[str]:
    """SignedHeaders as a list, checked: sorted, lower-case, present, covering Host and every
    x-amz- header sent (a header no signature covers could change what a replayed request does)."""
    names = signed.split(";")
    if not all(names) or names != sorted(set(names)) or any(name != name.lower() for name in names):
        raise Refused(403, "AccessDenied", "SignedHeaders must be lower-case header names, sorted, separated by ';'")
    if "host" not in names:
        raise Refused(403, "AccessDenied", "The Host header must be signed")
    absent = [name for name in names if name not in headers]
    if absent:
        raise Refused(403, "AccessDenied", f"Signed header(s) missing from the request: {', '.join(absent)}")
    unsigned = sorted(name for name in headers if name.startswith("x-amz-") and name not in names)
    if unsigned:
        raise Refused(403, "AccessDenied", "There were headers present in the request which were not signed: "
                                           f"{', '.join(unsigned)}")
    return names


def _canonical_query(parameters: list[tuple[str, str]]) -> str:
    def encode(text: str) -> str:
        return urllib.parse.quote(text, safe="-_.~")

    return "&".join(f"{name}={value}" for name, value in sorted((encode(name), encode(value))
                                                                  for name, value in parameters))
