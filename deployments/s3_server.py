"""The local stack's S3 endpoint: moto's S3 server, whose objects outlive the process.

moto keeps S3 in memory and has no persistence of its own that keeps the state as it was (its
request recorder replays requests, in the order they arrived rather than the order they were
applied, and keeps every request ever made). So this runs moto's own server application (the one
``python -m moto.server`` runs: same S3 semantics, conditional puts included) and snapshots its S3
state to a folder:

- at start, the snapshot is loaded (buckets, every version of every object with its bytes, ETag,
  metadata and modification time, tags); one that cannot be read stops the start, rather than
  starting empty and saving the emptiness over it;
- after a change (any PUT, POST or DELETE), the state is saved once the server has been quiet for
  half a second, and at least every 5 s while changes keep coming;
- on SIGTERM or SIGINT (``cxr-screen stack down``), requests in flight finish and the state is
  saved before the process exits.

A snapshot is taken while no request runs (requests share a gate that the snapshot takes alone),
written to a temporary file, flushed to disk and renamed over the last one: a crash at any point
leaves the previous snapshot whole. A process killed without warning (SIGKILL, power loss) loses
the changes of its last seconds. Each save writes the whole store, which suits a local stack's
data (up to a few GB), not a data lake.

The snapshot is a pickle, readable only by its owner (folder 0700, file 0600): it holds the
objects' bytes, which may be patient images, and loading a pickle runs code, so it must never be
a file someone else could write: one owned by another user, or that others could write, is
refused before it is opened for unpickling. ``summary.json`` beside it says what it holds.

What it trusts: with ``--credentials FILE`` (JSON ``{"access_key_id": ..., "secret_access_key": ...}``,
a regular file of this user, mode 0600, read once at start; never the environment), only requests
signed with that key pair (AWS Signature Version 4 for S3, in the Authorization header or a
presigned URL; ``deployments/sigv4.py``) reach moto, and a body whose SHA-256 was signed is checked
against it. Being on 127.0.0.1 is not enough: any local user, or a web page in a browser there,
can reach the port. Whatever the credentials, the server answers only for S3 (not moto's other
services), refuses moto's control API (``/moto-api``, which can empty every bucket), serves no
CORS (a web page cannot read its answers) and answers only requests whose Host is this server's
own address (a page that rebinds its DNS name to 127.0.0.1 is refused). Without ``--credentials``
signatures are not checked: anyone who can connect can read and write every object.

``python -m deployments.s3_server --port 5000 --state .stack/s3 --credentials .stack/s3-credentials``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

from deployments import sigv4
from model import stored_json
from store.clock import utc_timestamp
from store.private_files import write_private

__all__ = ["SNAPSHOT", "SUMMARY", "GuardedApplication", "allowed_hosts", "main", "read_summary"]

SNAPSHOT = "state.pickle"
SUMMARY = "summary.json"
FORMAT = 1
QUIET_SECONDS = 0.5  # save this long after the last change...
LONGEST_DELAY_SECONDS = 5.0  # ...or this long after the first unsaved one, whichever comes first
MUTATING_METHODS = frozenset({"PUT", "POST", "DELETE", "PATCH"})
RAW_REQUEST = "cxr.raw_request"  # environ key: the request target and headers exactly as sent
DRAIN_LIMIT_BYTES = 16 * 2**20  # a refused request's body is read up to this, so its client sees the answer


class Gate:
    """Requests pass together; a snapshot waits for those in flight and holds new ones back."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._passing = 0
        self._closed = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._closed)
            self._passing += 1
        try:
            yield
        finally:
            with self._condition:
                self._passing -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._closed)
            self._closed = True
            self._condition.wait_for(lambda: self._passing == 0)
        try:
            yield
        finally:
            with self._condition:
                self._closed = False
                self._condition.notify_all()


def _key_store_reducer(store):
    """moto's key store is a dict of version lists whose ``items()`` shows only the latest version
    and whose ``__setitem__`` appends: pickle it as its lists, so every version comes back."""
    return _rebuild_key_store, (list(store.lists()),)


def _rebuild_key_store(lists):
    from moto.s3.utils import _VersionedKeyStore

    store = _VersionedKeyStore()
    for name, versions in lists:
        store.setlist(name, versions)
    return store


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        from moto.s3.utils import _VersionedKeyStore

        if type(obj) is _VersionedKeyStore:
            return _key_store_reducer(obj)
        return NotImplemented


def _summarize(backends) -> dict:
    """Buckets with their current objects' count and bytes (delete markers and older versions aside)."""
    from moto.s3.models import FakeKey

    buckets = {}
    for _account, _region, backend in backends:
        for name, bucket in backend.buckets.items():
            current = [key for key in bucket.keys.values() if isinstance(key, FakeKey)]
            buckets[name] = {"objects": len(current), "bytes": sum(key.size for key in current)}
    return {"saved_at": utc_timestamp(), "buckets": buckets}


def read_summary(folder: Path) -> dict | None:
    """What the last snapshot in ``folder`` holds, or None when there is none; StoredStateError
    (a ValueError naming the file) when it is damaged or is not a summary this code wrote."""
    path = folder / SUMMARY
    try:
        with open(path, "rb") as handle:
            data = handle.read(stored_json.MAX_DOCUMENT_BYTES + 1)  # more is refused by loads
    except OSError:
        return None
    summary = stored_json.loads(data, str(path))
    buckets = summary.get("buckets") if isinstance(summary, dict) else None
    if not (isinstance(buckets, dict) and isinstance(summary.get("saved_at"), str)
            and all(isinstance(bucket, dict) and all(isinstance(bucket.get(count), int) and bucket[count] >= 0
                                                     for count in ("objects", "bytes"))
                    for bucket in buckets.values())):
        raise stored_json.StoredStateError(f"{path}: not a summary of the local S3's state (saved_at, and buckets "
                                           "with their objects and bytes)")
    return summary


def _refuse_foreign(path: Path, info: os.stat_result, what: str) -> None:
    """PermissionError unless ``path`` (``info``: its lstat) belongs to this user and nobody else
    can write it: the snapshot is unpickled, and unpickling runs whatever the file says."""
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}): "
                              f"a {what} this stack did not write is never loaded")
    if info.st_mode & 0o022:
        raise PermissionError(f"{path} can be written by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                              f"a {what} someone else could have written is never loaded")


class Store:
    """moto's S3 state in ``folder``: loaded once, saved after changes and at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.gate = Gate()
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._last_change = 0.0
        self._write_lock = threading.Lock()
        self._saver = threading.Thread(target=self._save_after_changes, name="s3-state-saver", daemon=True)

    def load(self) -> str:
        """Restore the snapshot into moto's S3 backends; returns what was loaded, for the log."""
        from moto.s3.models import s3_backends

        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _refuse_foreign(self.folder, os.lstat(self.folder), "folder of S3 state")
        os.chmod(self.folder, 0o700)
        path = self.folder / SNAPSHOT
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return f"no stored S3 state in {self.folder}: starting empty"
        with open(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise PermissionError(f"{path} is not a regular file")
            _refuse_foreign(path, info, "snapshot")
            state = pickle.load(handle)  # our own file (checked above), in a folder only its owner can write
        if state.get("format") != FORMAT:
            raise ValueError(f"snapshot format {state.get('format')!r}, this code reads {FORMAT}")
        for account_id, region_name, saved in state["backends"]:
            backend = s3_backends[account_id][region_name]
            backend.buckets = saved["buckets"]
            backend.tagger = saved["tagger"]
            backend.inventory_configs = saved["inventory_configs"]
        s3_backends.bucket_accounts.update(state["bucket_accounts"])
        summary = _summarize(s3_backends.iter_backends())["buckets"]
        objects = sum(bucket["objects"] for bucket in summary.values())
        return (f"loaded the S3 state saved at {state['saved_at']} from {path}: {len(summary)} bucket(s), "
                f"{objects} object(s)")

    def changed(self) -> None:
        self._last_change = time.monotonic()
        self._changed.set()

    def start(self) -> None:
        self._saver.start()

    def stop(self) -> None:
        """Stop the saver and save what changed since its last save."""
        self._stopping.set()
        self._saver.join()
        if self._changed.is_set():
            self.save()

    def save(self) -> None:
        from moto.s3.models import s3_backends

        with self._write_lock:
            with self.gate.alone():  # no request changes the state while it is copied
                self._changed.clear()
                backends = list(s3_backends.iter_backends())
                summary = _summarize(backends)
                state = {
                    "format": FORMAT, "saved_at": summary["saved_at"],
                    "bucket_accounts": dict(s3_backends.bucket_accounts),
                    "backends": [(account_id, region_name, {"buckets": backend.buckets, "tagger": backend.tagger,
                                                            "inventory_configs": backend.inventory_configs})
                                 for account_id, region_name, backend in backends],
                }
                buffer = io.BytesIO()
                _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(state)
                data = buffer.getvalue()
            write_private(self.folder / SNAPSHOT, data)
            write_private(self.folder / SUMMARY, json.dumps(summary, indent=2).encode())

    def _save_after_changes(self) -> None:
        while not self._stopping.is_set():
            if not self._changed.wait(0.2):
                continue
            first = time.monotonic()
            while not self._stopping.is_set():
                now = time.monotonic()
                wait = min(self._last_change + QUIET_SECONDS, first + LONGEST_DELAY_SECONDS) - now
                if wait <= 0:
                    break
                self._stopping.wait(wait)
            if self._stopping.is_set():
                return  # stop() saves
            try:
                self.save()
            except (OSError, pickle.PicklingError, TypeError, AttributeError) as error:
                # Keep serving; the next change (or the stop) tries again.
                print(f"error: could not save the S3 state in {self.folder}: {error}", file=sys.stderr, flush=True)
                self._changed.set()
                self._stopping.wait(LONGEST_DELAY_SECONDS)


class PersistentApplication:
    """moto's WSGI application; each request passes the store's gate, and a change is noted."""

    def __init__(self, application, store: Store) -> None:
        self.application = application
        self.store = store

    def __call__(self, environ, start_response):
        try:
            with self.store.gate.shared():
                return self.application(environ, start_response)
        finally:
            if environ.get("REQUEST_METHOD", "GET").upper() in MUTATING_METHODS:
                self.store.changed()


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host values a request may carry: this server's loopback names and ``host``, with the
    port (and without it when the port is HTTP's default)."""
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    hosts = {f"{name}:{port}" for name in names} | (names if port == 80 else set())
    return frozenset(name.lower() for name in hosts)


class GuardedApplication:
    """What reaches moto: requests for this server's Host, signed with ``credentials`` (when
    given), not for moto's control API, not CORS preflights; and moto's CORS headers never leave."""

    def __init__(self, application, credentials: sigv4.Credentials | None, hosts: frozenset[str]) -> None:
        self.application = application
        self.credentials = credentials
        self.hosts = hosts

    def __call__(self, environ, start_response):
        try:
            self._check(environ)
        except sigv4.Refused as refusal:
            return _refuse(environ, start_response, refusal)

        def without_cors(status, headers, exc_info=None):
            kept = [(name, value) for name, value in headers if not name.lower().startswith("access-control-")]
            return start_response(status, kept, exc_info)

        return self.application(environ, without_cors)

    def _check(self, environ) -> None:
        target, headers = environ[RAW_REQUEST]
        hosts = [value.strip().lower() for name, value in headers if name.lower() == "host"]
        if len(hosts) != 1 or hosts[0] not in self.hosts or environ.get("HTTP_HOST", "").lower() != hosts[0]:
            raise sigv4.Refused(400, "InvalidHost", "The Host header must name this server (127.0.0.1, localhost "
                                                    "or [::1] with its port)")
        if not target.startswith("/"):
            raise sigv4.Refused(400, "InvalidRequest", "The request target must be a path")
        if environ.get("PATH_INFO", "").lstrip("/").startswith("moto-api"):
            raise sigv4.Refused(403, "AccessDenied", "moto's control API is not served")
        if environ.get("REQUEST_METHOD", "").upper() == "OPTIONS":
            raise sigv4.Refused(403, "AccessDenied", "CORS is not served: this endpoint is not for web pages")
        if self.credentials is None:
            return
        digest = sigv4.verify(sigv4.Request(environ["REQUEST_METHOD"], target, headers), self.credentials)
        if digest is not None:
            body = _read_body(environ, limit=None)
            environ["wsgi.input"] = io.BytesIO(body)  # the body again, for moto (or for _refuse to drain)
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("wsgi.input_terminated", None)
            environ.pop("HTTP_TRANSFER_ENCODING", None)  # the body is whole now: chunked would make it read as empty
            if hashlib.sha256(body).hexdigest() != digest:
                raise sigv4.Refused(400, "XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header "
                                                                      "does not match what was computed.")


def _read_body(environ, limit: int | None) -> bytes:
    """The request's body (chunked or of Content-Length bytes); at most ``limit`` bytes of it."""
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):
        return stream.read() if limit is None else stream.read(limit)
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise sigv4.Refused(400, "InvalidArgument", "Content-Length is not a number") from None
    if limit is not None:
        length = min(length, limit)
    chunks, left = [], length
    while left > 0:
        chunk = stream.read(min(left, 2**20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _refuse(environ, start_response, refusal: sigv4.Refused):
    """An S3 error document for ``refusal``; the request never reaches moto, so nothing changes."""
    method = environ.get("REQUEST_METHOD", "")
    target = environ[RAW_REQUEST][0] if RAW_REQUEST in environ else environ.get("PATH_INFO", "")
    # ascii(): what a client sent never starts a line of its own in the log (the stack shows its 'error:' lines)
    print(f"refused {ascii(method)[1:-1]} {ascii(target)[1:-1]}: {refusal.code} ({ascii(refusal.message)[1:-1]})",
          file=sys.stderr, flush=True)
    with contextlib.suppress(sigv4.Refused, OSError):
        _read_body(environ, limit=DRAIN_LIMIT_BYTES)  # a client still sending would see a reset, not the error
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(refusal.code)}</Code>'
            f"<Message>{escape(refusal.message)}</Message></Error>").encode()
    reasons = {400: "Bad Request", 403: "Forbidden"}
    start_response(f"{refusal.status} {reasons.get(refusal.status, 'Error')}",
                   [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [] if method.upper() == "HEAD" else [body]


def _request_handler():
    """moto's request handler, also handing the application the request target and headers as
    sent (SigV4 signs those, not werkzeug's decoded path or its environ keys)."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class RequestHandler(MotoRequestHandler):
        def make_environ(self):
            environ = super().make_environ()

            def as_sent(text: str) -> str:  # http.server decodes as Latin-1; back to the bytes, read as UTF-8
                return text.encode("latin-1").decode("utf-8", "surrogateescape")

            environ[RAW_REQUEST] = (as_sent(self.path),
                                    tuple((name, as_sent(value)) for name, value in self.headers.items()))
            return environ

    return RequestHandler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--state", type=Path, required=True, help="folder of the stored state")
    parser.add_argument("--credentials", type=Path, help="JSON file (mode 0600) with the access_key_id and "
                        "secret_access_key requests must be signed with; without it, signatures are not checked")
    arguments = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(arguments.port))
    os.environ["MOTO_DISABLE_GLOBAL_CORS"] = "true"  # read when moto is imported; its headers are stripped anyway

    credentials = None
    if arguments.credentials is not None:
        try:
            credentials = sigv4.read_credentials(arguments.credentials)
        except sigv4.CredentialsError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(3)
    from moto.moto_server.werkzeug_app import create_backend_app
    from werkzeug.serving import make_server

    store = Store(arguments.state.resolve())
    try:
        print(store.load(), flush=True)
    except Exception as error:  # noqa: BLE001 (unpickling a damaged or foreign file can raise nearly anything)
        print(f"error: cannot read the stored S3 state in {store.folder} ({type(error).__name__}: {error}); "
              f"move it away, or remove it with 'cxr-screen stack down --wipe'", file=sys.stderr, flush=True)
        sys.exit(3)
    # moto's S3 application alone: its dispatcher would also serve every other AWS service moto fakes.
    application = GuardedApplication(PersistentApplication(create_backend_app("s3"), store), credentials,
                                     allowed_hosts(arguments.host, arguments.port))
    try:
        server = make_server(arguments.host, arguments.port, application, threaded=True,
                             request_handler=_request_handler())
    except OSError as error:
        print(f"error: cannot listen on {arguments.host}:{arguments.port} ({error})", file=sys.stderr, flush=True)
        sys.exit(1)
    if credentials is None:
        print("warning: no --credentials: signatures are not checked, anyone who can connect can read and "
              "write every object", file=sys.stderr, flush=True)
    else:
        print(f"requests must be signed (SigV4) with access key {credentials.access_key_id} from "
              f"{arguments.credentials}", flush=True)
    stop_signals: list[int] = []  # a plain list: a handler that took a lock could deadlock the thread it interrupts
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stop_signals.append(signum))
    serving = threading.Thread(target=server.serve_forever, name="s3-server", daemon=True)
    serving.start()
    store.start()
    print(f"serving S3 on http://{arguments.host}:{arguments.port}", flush=True)
    while not stop_signals:
        time.sleep(0.2)
    server.shutdown()
    store.stop()  # waits for requests in flight, then saves
    try:
        summary = read_summary(store.folder) or {"buckets": {}}
    except ValueError:  # written a moment ago by this process: damaged only by someone else
        summary = {"buckets": {}}
    print(f"stopped; the S3 state in {store.folder} holds {len(summary['buckets'])} bucket(s), "
          f"{sum(bucket['objects'] for bucket in summary['buckets'].values())} object(s)", flush=True)


if __name__ == "__main__":
    main()
