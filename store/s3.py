"""S3 behind the storage verbs (``s3://bucket/prefix``), with boto3: one client per endpoint, S3's
errors mapped onto the storage errors, conditional writes with If-None-Match and If-Match.

Credentials, region and endpoint come from the standard AWS environment and config files, so MinIO
and moto work by setting ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator

from store.backend import (
    AccessDenied,
    BucketBackend,
    BucketKey,
    Capabilities,
    NotFound,
    StorageError,
    Unreadable,
    too_large,
)

__all__ = ["S3Backend", "bucket_of", "client", "storage_error"]

SCHEME = "s3"


def bucket_of(uri: str) -> str | None:
    """The bucket of an ``s3://`` location; None for any other location. For the tooling of an S3
    endpoint itself (the local stack's moto server, the buckets made on it), not for reading files."""
    return S3Backend().locate(uri).bucket if uri.startswith(f"{SCHEME}://") else None


@functools.cache
def _client_for(endpoint_url: str | None):
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


def client():
    """The boto3 S3 client for the endpoint the environment names now."""
    with _client_lock:
        return _client_for(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def storage_error(uri: str, error: Exception) -> StorageError:
    """A boto3 error as the storage error it means."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        bucket = S3Backend().locate(uri).bucket
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


def _call(uri: str, operation: str, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(client(), operation)(**kwargs)
    except (BotoCoreError, ClientError) as error:
        raise storage_error(uri, error) from error


# A conditional PUT refused. 412: changed, or present; 409: another conditional write to the key is in flight.
_CHANGED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _conditional_put(uri: str, location: BucketKey, data: bytes, condition: dict[str, str]) -> bool:
    """Put if ``condition`` holds: True when written, False when another writer got there first."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().put_object(Bucket=location.bucket, Key=location.key, Body=data, **condition)
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code", "")) in _CHANGED:
            return False
        raise storage_error(uri, error) from error
    except BotoCoreError as error:
        raise storage_error(uri, error) from error
    return True


def _check_bucket(uri: str, location: BucketKey) -> None:
    """HEAD answers a bare 404 for a missing key and a missing bucket alike: this tells them apart."""
    try:
        _call(uri, "head_bucket", Bucket=location.bucket)
    except NotFound:
        raise NotFound(uri, f"no such bucket {location.bucket!r}") from None


class S3Backend(BucketBackend):
    """S3 and what speaks its API (MinIO, moto). Shared by every machine with the credentials;
    presigned URLs (SigV4, at most 7 days); conditional writes (S3 since 2024, MinIO, moto)."""

    scheme = SCHEME
    capabilities = Capabilities(shared=True, presignable=True, conditional_writes=True)

    def list_files(self, uri: str, *, missing_ok: bool) -> Iterator[str]:
        """A prefix with no keys lists as empty whatever ``missing_ok`` says; a missing bucket is an error."""
        return (name for name, _ in self.list_files_stamped(uri, missing_ok=missing_ok))

    def list_files_stamped(self, uri: str, *, missing_ok: bool) -> Iterator[tuple[str, str | None]]:
        """The stamp is the ETag and the size, both in the listing (no request per key)."""
        from botocore.exceptions import BotoCoreError, ClientError

        location = self.locate(uri)
        paginator = client().get_paginator("list_objects_v2")
        try:
            # S3 returns keys in UTF-8 binary order, which is sorted order for our purposes.
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/"):  # folder markers made by consoles
                        etag = str(item.get("ETag") or "").strip('"')
                        stamp = f"etag:{etag}:{item['Size']}" if etag and item.get("Size") is not None else None
                        yield str(BucketKey(SCHEME, location.bucket, item["Key"])), stamp
        except (BotoCoreError, ClientError) as error:
            raise storage_error(uri, error) from error

    def list_folders(self, uri: str, *, missing_ok: bool) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        location = self.locate(uri)
        paginator = client().get_paginator("list_objects_v2")
        try:
            return sorted(str(BucketKey(SCHEME, location.bucket, common["Prefix"].rstrip("/")))
                          for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix, Delimiter="/")
                          for common in page.get("CommonPrefixes", []))
        except (BotoCoreError, ClientError) as error:
            raise storage_error(uri, error) from error

    def presigned_url(self, uri: str, expires_seconds: int) -> str:
        location = self.locate(uri)
        return _call(uri, "generate_presigned_url", ClientMethod="get_object",
                     Params={"Bucket": location.bucket, "Key": location.key}, ExpiresIn=int(expires_seconds))

    def read_bytes(self, uri: str, length: int | None, max_bytes: int | None, within: str | None) -> bytes:
        """One ranged GET for ``length``; ``max_bytes`` checked against Content-Length first. S3 has no
        links, so ``within`` has nothing to check."""
        location = self.locate(uri)
        extra = {"Range": f"bytes=0-{length - 1}"} if length else {}
        try:
            response = _call(uri, "get_object", Bucket=location.bucket, Key=location.key, **extra)
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
                raise Unreadable(uri, too_large(int(response["ContentLength"]), max_bytes))
            # Bounded even if a server ignores the Range header or the object grew.
            data = body.read(length if length else None if max_bytes is None else max_bytes + 1)
        except BotoCoreError as error:  # the connection broke mid-body: worth a retry
            raise storage_error(uri, error) from error
        finally:
            body.close()
        if max_bytes is not None and not length and len(data) > max_bytes:
            raise Unreadable(uri, too_large(len(data), max_bytes))
        return data

    def write_bytes(self, uri: str, data: bytes) -> None:
        location = self.locate(uri)
        _call(uri, "put_object", Bucket=location.bucket, Key=location.key, Body=data)  # a PUT is atomic

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        return _conditional_put(uri, self.locate(uri), data, {"IfNoneMatch": "*"})

    def read_versioned(self, uri: str) -> tuple[bytes | None, str | None]:
        """The token is the ETag (the content's MD5: equal bytes are the same version)."""
        location = self.locate(uri)
        try:
            response = _call(uri, "get_object", Bucket=location.bucket, Key=location.key)
        except NotFound as error:
            if "bucket" in error.reason:
                raise
            return None, None
        from botocore.exceptions import BotoCoreError

        try:
            return response["Body"].read(), response["ETag"]
        except BotoCoreError as error:
            raise storage_error(uri, error) from error

    def replace_if_unchanged(self, uri: str, data: bytes, token: str | None, lock_wait_seconds: float) -> bool:
        """A conditional PUT: If-Match the ETag, or If-None-Match '*'."""
        location = self.locate(uri)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            return _conditional_put(uri, location, data, condition)
        except NotFound as error:
            if "bucket" in error.reason:
                raise
            _check_bucket(uri, location)  # a bare 404: the bucket may be missing, an error
            return False  # deleted since it was read: a race lost

    def exists(self, uri: str) -> bool:
        location = self.locate(uri)
        try:
            _call(uri, "head_object", Bucket=location.bucket, Key=location.key)
        except NotFound:
            _check_bucket(uri, location)
            return False
        return True

    def delete(self, uri: str) -> None:
        location = self.locate(uri)
        _call(uri, "delete_object", Bucket=location.bucket, Key=location.key)  # S3 deletes are idempotent
