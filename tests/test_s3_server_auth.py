"""The local S3 endpoint trusts a signature, not an address (issue #25): with ``--credentials`` only
requests signed (SigV4) with that key pair reach moto; ``/moto-api`` is never served; no CORS; a
Host other than the server's own is refused; a credentials file others could read stops the start.

One real server (``python -m deployments.s3_server``) for the module, spoken to over HTTP by boto3
configured as ``store/s3.py`` configures it, by the storage verbs themselves, and by plain HTTP
clients that sign nothing.
"""

from __future__ import annotations

import datetime
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from unittest import mock

import boto3
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import ClientError

from deployments import sigv4
from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]
ACCESS_KEY_ID = "CXRTESTKEY0123456789"
SECRET = "s3cr3t/with+signs-and_more-0123456789ab"
BUCKET = "guarded"


def _credentials_file(folder: Path, mode: int = 0o600) -> Path:
    path = folder / "s3-credentials"
    path.write_text(sigv4.Credentials(ACCESS_KEY_ID, SECRET).document())
    path.chmod(mode)
    return path


def _start(folder: Path, port: int, credentials: Path | None, log=subprocess.PIPE) -> subprocess.Popen:
    # The stack gives the server no AWS variables; neither does this.
    given = ["--credentials", str(credentials)] if credentials else []
    return subprocess.Popen([sys.executable, "-m", "deployments.s3_server", "--host", "127.0.0.1", "--port", str(port),
                             "--state", str(folder / "s3"), *given],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT if log is not subprocess.PIPE else log,
                            text=True, env={key: value for key, value in os.environ.items() if not key.startswith("AWS_")})


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """The guarded server's URL, a bucket made on it; stopped (SIGTERM) at the end, saving its state."""
    folder = tmp_path_factory.mktemp("guarded-s3")
    url = f"http://127.0.0.1:{_free_port()}"
    log_path = folder / "s3.log"
    with open(log_path, "w") as log:  # a file, not a pipe: a pipe nobody reads fills up and stops the server
        process = _start(folder, int(url.rsplit(":", 1)[1]), _credentials_file(folder), log)
        try:
            _wait_for(url, process, log_path)
            _client(url).create_bucket(Bucket=BUCKET)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert process.returncode == 0, log_path.read_text()
    assert "stopped; the S3 state" in log_path.read_text()


def _wait_for(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (403: unsigned)
        except OSError:
            assert process.poll() is None, f"the server exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, "the server did not answer within 60 s"
            time.sleep(0.2)


def _client(url: str, access_key_id: str = ACCESS_KEY_ID, secret: str = SECRET, region: str = "us-east-1"):
    # As store/s3.py makes it (SigV4, default addressing), but one try: a refusal is the answer.
    config = Config(signature_version="s3v4", retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30)
    return boto3.session.Session().client("s3", endpoint_url=url, config=config, region_name=region,
                                          aws_access_key_id=access_key_id, aws_secret_access_key=secret)


def _keys(url: str) -> list[str]:
    return [item["Key"] for item in _client(url).list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def _error_code(call) -> str:
    with pytest.raises(ClientError) as raised:
        call()
    return str(raised.value.response["Error"]["Code"])


def _raw(url: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
         host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request no client library signs or fixes up: status, headers (lower-case names), body."""
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host or f"127.0.0.1:{port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()
    finally:
        connection.close()


def _signature(url: str, method: str, path: str) -> dict[str, str]:
    """The headers that sign an empty-bodied ``method path`` with the right keys (botocore's SigV4)."""
    from botocore.auth import S3SigV4Auth

    request = AWSRequest(method, f"{url}{path}", data=b"")
    S3SigV4Auth(BotoCredentials(ACCESS_KEY_ID, SECRET), "s3", "us-east-1").add_auth(request)
    return {name: value.decode() if isinstance(value, bytes) else value for name, value in request.headers.items()}


def test_signed_calls_round_trip_the_data(endpoint):
    s3 = _client(endpoint)
    key = f"round/{uuid.uuid4().hex} a+b~ü.txt"  # spaces, plus, tilde and UTF-8 in the signed path
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"hello")
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"hello"
    assert s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == 5
    assert key in [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="round/")["Contents"]]
    s3.copy_object(Bucket=BUCKET, Key=f"{key}.copy", CopySource={"Bucket": BUCKET, "Key": key})
    assert s3.get_object(Bucket=BUCKET, Key=f"{key}.copy")["Body"].read() == b"hello"
    assert _error_code(lambda: s3.put_object(Bucket=BUCKET, Key=key, Body=b"again", IfNoneMatch="*")) == "PreconditionFailed"
    s3.delete_object(Bucket=BUCKET, Key=key)
    s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": f"{key}.copy"}]})
    assert not [name for name in _keys(endpoint) if name.startswith("round/")]


def test_a_multipart_upload_and_any_region_in_the_scope(endpoint):
    data = os.urandom(9 * 2**20)  # over boto3's 8 MB threshold: three signed requests and the parts
    s3 = _client(endpoint, region="eu-west-1")
    s3.upload_fileobj(io.BytesIO(data), BUCKET, "multipart")
    assert s3.get_object(Bucket=BUCKET, Key="multipart")["Body"].read() == data


def test_an_aws_chunked_body_with_a_checksum_trailer(endpoint):
    # botocore sends STREAMING-UNSIGNED-PAYLOAD-TRAILER over HTTPS only; this makes it do so here.
    s3 = _client(endpoint)
    s3.meta.events.register("before-call.s3.PutObject", _checksum_in_trailer)
    sent = []
    s3.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request.headers))
    s3.put_object(Bucket=BUCKET, Key="trailer", Body=b"chunked " * 5000)
    assert sent[0]["X-Amz-Content-SHA256"] == b"STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert s3.get_object(Bucket=BUCKET, Key="trailer")["Body"].read() == b"chunked " * 5000


def _checksum_in_trailer(params, **_):
    params["context"]["checksum"]["request_algorithm"]["in"] = "trailer"


def test_the_storage_verbs_work_with_the_stacks_keys(endpoint, monkeypatch):
    from store.s3 import S3Backend

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    backend, uri = S3Backend(), f"s3://{BUCKET}/verbs/ledger.json"
    backend.write_bytes(uri, b"{}")
    assert backend.create_if_absent(uri, b"[]") is False
    data, token = backend.read_versioned(uri)
    assert data == b"{}" and backend.replace_if_unchanged(uri, b"[1]", token, lock_wait_seconds=1)
    assert backend.read_bytes(uri, None, 100, None) == b"[1]" and backend.exists(uri)
    assert list(backend.list_files(f"s3://{BUCKET}/verbs", missing_ok=False)) == [uri]
    assert urllib.request.urlopen(backend.presigned_url(uri, 60), timeout=10).read() == b"[1]"
    backend.delete(uri)
    assert not backend.exists(uri)


def test_an_unsigned_put_is_refused_and_stores_nothing(endpoint):
    status, _, body = _raw(endpoint, "PUT", f"/{BUCKET}/unsigned", body=b"planted")
    assert status == 403 and b"<Code>AccessDenied</Code>" in body
    request = urllib.request.Request(f"{endpoint}/{BUCKET}/unsigned-too", data=b"planted", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert not {"unsigned", "unsigned-too"} & set(_keys(endpoint))


def test_another_secret_or_key_id_is_refused(endpoint):
    _client(endpoint).put_object(Bucket=BUCKET, Key="kept", Body=b"kept")
    wrong_secret = _client(endpoint, secret="not-the-secret-0123456789")
    assert _error_code(lambda: wrong_secret.get_object(Bucket=BUCKET, Key="kept")) in ("403", "SignatureDoesNotMatch")
    assert _error_code(lambda: wrong_secret.put_object(Bucket=BUCKET, Key="kept", Body=b"x")) == "SignatureDoesNotMatch"
    assert _error_code(lambda: wrong_secret.list_objects_v2(Bucket=BUCKET)) == "SignatureDoesNotMatch"
    wrong_id = _client(endpoint, access_key_id="AKIAOTHERKEY00000000")
    assert _error_code(lambda: wrong_id.list_objects_v2(Bucket=BUCKET)) == "InvalidAccessKeyId"
    assert _error_code(lambda: wrong_id.delete_object(Bucket=BUCKET, Key="kept")) == "InvalidAccessKeyId"
    assert _client(endpoint).get_object(Bucket=BUCKET, Key="kept")["Body"].read() == b"kept"


def test_a_stale_request_a_changed_body_or_an_unsigned_amz_header_is_refused(endpoint):
    s3 = _client(endpoint)
    past = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - datetime.timedelta(minutes=20)
    with mock.patch("botocore.auth.get_current_datetime", lambda: past):
        assert _error_code(lambda: s3.list_objects_v2(Bucket=BUCKET)) == "RequestTimeTooSkewed"

    def swap_body(request, **_):
        request.body = b"swapped"
        request.headers["Content-Length"] = "7"

    swapped = _client(endpoint)
    swapped.meta.events.register("before-send.s3.PutObject", swap_body)
    assert _error_code(lambda: swapped.put_object(Bucket=BUCKET, Key="swapped", Body=b"signed!")) == \
        "XAmzContentSHA256Mismatch"

    def add_header(request, **_):
        request.headers["x-amz-meta-added"] = "after signing"

    added = _client(endpoint)
    added.meta.events.register("before-send.s3.PutObject", add_header)
    assert _error_code(lambda: added.put_object(Bucket=BUCKET, Key="added", Body=b"x")) == "AccessDenied"
    assert not {"swapped", "added"} & set(_keys(endpoint))


def test_a_presigned_url_works_until_tampered_or_expired(endpoint):
    s3 = _client(endpoint)
    s3.put_object(Bucket=BUCKET, Key="shared/one", Body=b"one")
    s3.put_object(Bucket=BUCKET, Key="shared/two", Body=b"two")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "shared/one"}, ExpiresIn=60)
    assert urllib.request.urlopen(url, timeout=10).read() == b"one"
    signature = url.rsplit("=", 1)[1]
    forged = url.rsplit("=", 1)[0] + "=" + ("0" if signature[0] != "0" else "1") + signature[1:]
    too_long = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "shared/one"},
                                         ExpiresIn=604801)
    short = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "shared/one"}, ExpiresIn=1)
    time.sleep(2.1)
    for refused in (url.replace("shared/one", "shared/two"), forged, too_long, short):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(refused, timeout=10)
        assert answer.value.code == 403, refused


def test_a_query_the_server_behind_would_read_otherwise_is_refused(endpoint):
    """'+' (a space to the server, a plus to SigV4) and escapes that are not UTF-8 would let whoever
    holds a signed URL change what the server lists without breaking the signature."""
    s3 = _client(endpoint)
    s3.put_object(Bucket=BUCKET, Key="a b/one", Body=b"x")
    url = s3.generate_presigned_url("list_objects_v2", Params={"Bucket": BUCKET, "Prefix": "a+b"}, ExpiresIn=60)
    assert "prefix=a%2Bb" in url and b"<KeyCount>0</KeyCount>" in urllib.request.urlopen(url, timeout=10).read()
    for altered in (url.replace("prefix=a%2Bb", "prefix=a+b"), url.replace("prefix=a%2Bb", "prefix=a%FFb")):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(altered, timeout=10)
        assert answer.value.code == 400 and b"InvalidArgument" in answer.value.read(), altered


def test_the_moto_api_is_never_served(endpoint):
    _client(endpoint).put_object(Bucket=BUCKET, Key="survivor", Body=b"still here")
    for path in ("/moto-api/reset", "/moto-api/", "/moto-api", "//moto-api/reset"):
        for headers in ({}, _signature(endpoint, "POST", path)):  # a signature does not open it
            status, _, body = _raw(endpoint, "POST", path, headers)
            assert status in (403, 404) and b"control API" in body, path
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=10)
    assert _client(endpoint).get_object(Bucket=BUCKET, Key="survivor")["Body"].read() == b"still here"


def test_no_cors_even_for_a_bucket_that_configures_it(endpoint):
    s3 = _client(endpoint)
    s3.put_bucket_cors(Bucket=BUCKET, CORSConfiguration={"CORSRules": [{"AllowedOrigins": ["*"],
                                                                         "AllowedMethods": ["GET", "PUT"]}]})
    s3.put_object(Bucket=BUCKET, Key="page", Body=b"x")
    answers = []
    s3.meta.events.register("before-send.s3.GetObject",
                            lambda request, **_: request.headers.__setitem__("Origin", "http://evil.example"))
    s3.meta.events.register("after-call.s3.GetObject", lambda http_response, **_: answers.append(http_response))
    assert s3.get_object(Bucket=BUCKET, Key="page")["Body"].read() == b"x"
    assert not [name for name in answers[0].headers if name.lower().startswith("access-control-")]
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"}
    for signature in ({}, _signature(endpoint, "OPTIONS", f"/{BUCKET}/page")):
        status, headers, body = _raw(endpoint, "OPTIONS", f"/{BUCKET}/page", {**preflight, **signature})
        assert status == 403 and b"CORS" in body and not [name for name in headers if name.startswith("access-control-")]


def test_a_foreign_host_is_refused(endpoint):
    port = endpoint.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{int(port) + 1}"):
        status, _, body = _raw(endpoint, "GET", f"/{BUCKET}", host=host)
        assert status == 400 and b"InvalidHost" in body, host
    assert _keys(f"http://localhost:{port}")  # its own names pass


@pytest.mark.parametrize("plant", ["mode 0644", "link"])
def test_credentials_others_could_read_stop_the_start(tmp_path, plant):
    private = _credentials_file(tmp_path, 0o644 if plant == "mode 0644" else 0o600)
    given = private
    if plant == "link":
        given = tmp_path / "link"
        given.symlink_to(private)
    process = _start(tmp_path, _free_port(), given)
    try:
        _, errors = process.communicate(timeout=30)  # it stops before loading moto: well under a second
    finally:
        if process.poll() is None:  # it started serving: stop it, and fail
            process.kill()
            process.wait()
    assert process.returncode == 3
    lines = errors.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(given) in lines[0], errors


def test_without_credentials_nothing_is_checked_but_the_rest_is_guarded(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    log_path = tmp_path / "s3.log"
    with open(log_path, "w") as log:
        process = _start(tmp_path, int(url.rsplit(":", 1)[1]), None, log)
        try:
            _wait_for(url, process, log_path)
            anyone = _client(url, access_key_id="anything", secret="anything")
            anyone.create_bucket(Bucket=BUCKET)
            status, _, _ = _raw(url, "PUT", f"/{BUCKET}/unsigned", body=b"as before")
            assert status == 200 and anyone.get_object(Bucket=BUCKET, Key="unsigned")["Body"].read() == b"as before"
            assert _raw(url, "POST", "/moto-api/reset")[0] == 403
            assert _raw(url, "GET", f"/{BUCKET}", host="evil.example")[0] == 400
            assert anyone.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 1
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert "signatures are not checked" in log_path.read_text()


def _signed(payload_hash: str) -> sigv4.Request:
    """A request botocore signs, with ``payload_hash`` as its payload's hash."""
    from botocore.auth import S3SigV4Auth

    class Signer(S3SigV4Auth):
        def payload(self, request):
            return payload_hash

    request = AWSRequest("PUT", "http://127.0.0.1:9/bucket/key", data=b"body")
    Signer(BotoCredentials(ACCESS_KEY_ID, SECRET), "s3", "us-east-1").add_auth(request)
    request.headers["Host"] = "127.0.0.1:9"
    return sigv4.Request("PUT", "/bucket/key", tuple((name, value.decode() if isinstance(value, bytes) else value)
                                                     for name, value in request.headers.items()))


def test_verify_returns_the_digest_to_check_and_refuses_signed_chunks():
    credentials = sigv4.Credentials(ACCESS_KEY_ID, SECRET)
    digest = "230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5"  # sha256(b"body")
    assert sigv4.verify(_signed(digest), credentials) == digest
    assert sigv4.verify(_signed("UNSIGNED-PAYLOAD"), credentials) is None
    with pytest.raises(sigv4.Refused, match="aws-chunked") as refused:
        sigv4.verify(_signed("STREAMING-AWS4-HMAC-SHA256-PAYLOAD"), credentials)
    assert refused.value.status == 403


def test_a_credentials_file_must_hold_both_keys(tmp_path):
    path = tmp_path / "credentials"
    path.write_text(json.dumps({"access_key_id": ACCESS_KEY_ID}))
    path.chmod(0o600)
    with pytest.raises(sigv4.CredentialsError, match=str(path)):
        sigv4.read_credentials(path)
    made = sigv4.new_credentials()
    path.write_text(made.document())
    assert sigv4.read_credentials(path) == made and made.secret_access_key not in repr(made)
