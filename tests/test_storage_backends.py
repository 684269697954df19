"""The storage registry: a scheme is one backend registered by name, code asks its capabilities instead
of testing schemes, and product code runs unchanged on a backend it has never heard of (``mem://``,
defined here in a few lines)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from screening import leases
from screening.results import RunSummary
from store import s3, storage
from store.backend import BucketBackend, Capabilities, NotFound, Unreadable, too_large
from tests.test_storage import race_to_create


class MemoryBackend(BucketBackend):
    """``mem://bucket/key``: a dict behind a lock, with conditional writes, in this process only."""

    scheme = "mem"
    capabilities = Capabilities(shared=False, presignable=False, conditional_writes=True)

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def list_files(self, uri: str, *, missing_ok: bool) -> Iterator[str]:
        location = self.locate(uri)
        start = f"mem://{location.bucket}/{location.prefix}"
        return iter(sorted(name for name in list(self.files) if name.startswith(start)))

    def list_folders(self, uri: str, *, missing_ok: bool) -> list[str]:
        start = self.join(uri, ()).rstrip("/") + "/"
        return sorted({start + name[len(start):].split("/", 1)[0] for name in self.list_files(uri, missing_ok=True)
                       if "/" in name[len(start):]})

    def read_bytes(self, uri: str, length: int | None, max_bytes: int | None, within: str | None) -> bytes:
        try:
            data = self.files[uri]
        except KeyError:
            raise NotFound(uri, "no such key") from None
        if max_bytes is not None and length is None and len(data) > max_bytes:
            raise Unreadable(uri, too_large(len(data), max_bytes))
        return data[:length] if length is not None else data

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.files[uri] = bytes(data)

    def exists(self, uri: str) -> bool:
        return uri in self.files

    def delete(self, uri: str) -> None:
        self.files.pop(uri, None)

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        with self.lock:
            if uri in self.files:
                return False
            self.files[uri] = bytes(data)
            return True

    def read_versioned(self, uri: str) -> tuple[bytes | None, str | None]:
        data = self.files.get(uri)
        return (None, None) if data is None else (data, hashlib.sha256(data).hexdigest())

    def replace_if_unchanged(self, uri: str, data: bytes, token: str | None, lock_wait_seconds: float) -> bool:
        with self.lock:
            if self.read_versioned(uri)[1] != token:
                return False
            self.files[uri] = bytes(data)
            return True


@pytest.fixture
def memory() -> Iterator[MemoryBackend]:
    backend = MemoryBackend()
    storage.register("mem", backend)
    yield backend
    storage.unregister("mem")


def test_every_verb_reaches_a_registered_backend(memory):
    root = "mem://bucket/store"
    uri = storage.join(root, "a", "/b/", "c.PNG")
    assert uri == "mem://bucket/store/a/b/c.PNG" and storage.relative_to(uri, root) == "a/b/c.PNG"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x89PNG payload")
    storage.write_bytes(storage.join(root, "notes.txt"), b"text")
    storage.write_bytes(storage.join(root + "-sibling", "x.png"), b"not below root")
    assert storage.exists(uri) and memory.files[uri] == b"\x89PNG payload"
    assert storage.read_bytes(uri) == b"\x89PNG payload" and storage.read_bytes(uri, length=4) == b"\x89PNG"
    with pytest.raises(storage.Unreadable, match="over the limit"):
        storage.read_bytes(uri, max_bytes=3)
    assert list(storage.list_files(root)) == [uri, "mem://bucket/store/notes.txt"]
    assert list(storage.list_files(root, {".png"})) == [uri]  # suffixes are the facade's, for every backend
    assert storage.list_folders(root) == ["mem://bucket/store/a"]
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(storage.NotFound, match="no such key"):
        storage.read_bytes(uri)
    with pytest.raises(ValueError, match="is not under"):
        storage.relative_to(uri, "/store")  # another backend's location


def test_conditional_writes_through_a_registered_backend(memory):
    claim = "mem://bucket/ledger/entry.json"
    results = race_to_create(claim)
    assert results.count(True) == 1 and storage.read_bytes(claim) == f"worker {results.index(True)}".encode()

    production = "mem://bucket/models/production.json"
    assert storage.read_versioned(production) == (None, None)
    assert storage.replace_if_unchanged(production, b"v1", None) is True
    _, token = storage.read_versioned(production)
    assert storage.replace_if_unchanged(production, b"v2", token) is True
    assert storage.replace_if_unchanged(production, b"stale", token) is False
    assert storage.read_bytes(production) == b"v2"


def test_product_code_runs_on_a_new_backend_unchanged(memory):
    """Run leases (screening/leases.py) know nothing of mem://: registering the backend is enough."""
    results = "mem://bucket/results"
    leases.open_run(results, RunSummary("r1", "v1"))
    (lease,) = leases.abandoned_runs(results, after=timedelta(0))
    assert lease.run_id == "r1"
    leases.close_run(results, "r1")
    assert leases.abandoned_runs(results, after=timedelta(0)) == []


def test_questions_about_a_storage_are_its_capabilities_not_its_scheme(memory, tmp_path):
    from flows.fan_out import FanOutError, chunk_runner
    from screening.reports import shared_link

    assert storage.capabilities(str(tmp_path)) == storage.capabilities(tmp_path.as_uri()) == Capabilities(
        shared=False, presignable=False, conditional_writes=True)
    assert storage.capabilities("s3://bucket/x") == Capabilities(shared=True, presignable=True, conditional_writes=True)
    assert storage.capabilities("mem://bucket/x") is MemoryBackend.capabilities
    # Not shared: a remote Dask cluster's workers cannot reach it, whatever its scheme.
    with pytest.raises(FanOutError, match="mem://bucket/results .*cannot reach"):
        with chunk_runner(dask_address="tcp://10.1.2.3:8786", storage_uris=["mem://bucket/results"]):
            pass
    # Neither presignable nor a file: no link (the backend gives none), and no error.
    storage.write_bytes("mem://bucket/report.html", b"<html>")
    assert shared_link("mem://bucket/report.html") is None
    with pytest.raises(storage.LocationError, match="gives no links"):
        storage.presigned_url("mem://bucket/report.html", 60)


def test_a_backend_without_conditional_writes_is_refused_for_them_only(memory, monkeypatch):
    monkeypatch.setattr(memory, "capabilities", Capabilities(shared=True, presignable=False, conditional_writes=False))
    storage.write_bytes("mem://bucket/plain", b"x")
    assert storage.read_bytes("mem://bucket/plain") == b"x"
    for write in (lambda uri: storage.create_if_absent(uri, b"x"), storage.read_versioned,
                  lambda uri: storage.replace_if_unchanged(uri, b"x", None)):
        with pytest.raises(storage.LocationError, match="cannot write conditionally"):
            write("mem://bucket/ledger/entry.json")


def test_an_unknown_scheme_is_one_clear_location_error_naming_those_served(memory):
    for verb in (storage.read_bytes, storage.exists, storage.capabilities, storage.join,
                 lambda uri: list(storage.list_files(uri))):
        with pytest.raises(storage.LocationError, match=r"'gs://bucket/x': unsupported scheme \(use a path, "
                                                        r"file://, s3://, dicomweb\+http://, dicomweb\+https://, mem://\)"):
            verb("gs://bucket/x")
    storage.unregister("mem")
    with pytest.raises(storage.LocationError, match="unsupported scheme"):
        storage.read_bytes("mem://bucket/x")
    with pytest.raises(storage.LocationError, match="empty location"):
        storage.capabilities("")
    with pytest.raises(ValueError, match="a scheme is lowercase"):
        storage.register("GS", MemoryBackend())


def test_canonical_spells_one_place_one_way_and_never_across_schemes(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert storage.canonical(str(tmp_path / "link")) == storage.canonical(f"file://{tmp_path}/real/") \
        == "file:" + str((tmp_path / "real").resolve())
    assert storage.canonical("s3://bucket/prefix/") == storage.canonical("s3://bucket/prefix") == "s3://bucket/prefix"
    assert storage.canonical("s3://bucket") != storage.canonical("/s3:/bucket")


def test_the_s3_tooling_asks_the_s3_backend_for_buckets():
    """The local stack's moto server and ``cli.deploy --buckets`` are about S3 itself."""
    assert s3.bucket_of("s3://cxr/incoming") == "cxr" and s3.bucket_of("s3://cxr") == "cxr"
    assert s3.bucket_of("/data/incoming") is None and s3.bucket_of("gs://cxr/incoming") is None
    with pytest.raises(storage.LocationError, match="names no bucket"):
        s3.bucket_of("s3://")


def test_s3_conditional_writes_name_a_missing_bucket(moto_server):
    uri = "s3://no-such-bucket-for-claims/ledger/entry.json"
    with pytest.raises(storage.NotFound, match="no such bucket"):
        storage.create_if_absent(uri, b"x")
    with pytest.raises(storage.NotFound, match="no such bucket 'no-such-bucket-for-claims'"):
        storage.replace_if_unchanged(uri, b"x", '"etag"')


def test_local_paths_and_file_uris_share_one_backend(tmp_path):
    storage.write_bytes(str(tmp_path / "a.txt"), b"x")
    assert storage.read_bytes(Path(tmp_path / "a.txt").as_uri()) == b"x"
    assert storage.presigned_url(str(tmp_path / "a b.txt"), 60) == (tmp_path / "a b.txt").as_uri()
