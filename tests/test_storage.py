"""Every storage verb against a temp folder and against a moto S3 server over HTTP."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from store import storage


@pytest.fixture
def root(location) -> str:
    """conftest's location (a local folder, then a moto S3 prefix), under this module's usual name."""
    return location


def race_to_create(uri: str, workers: int = 8) -> list[bool]:
    """``workers`` threads call create_if_absent on ``uri`` at once; which of them created it."""
    barrier = threading.Barrier(workers)

    def create(worker: int) -> bool:
        barrier.wait()
        return storage.create_if_absent(uri, f"worker {worker}".encode())

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(create, range(workers)))


def test_write_read_round_trip(root):
    uri = storage.join(root, "a", "b.bin")
    storage.write_bytes(uri, b"\x00payload\xff")
    assert storage.read_bytes(uri) == b"\x00payload\xff"
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"


def test_exists(root):
    uri = storage.join(root, "present.txt")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"x")
    assert storage.exists(uri)


def test_delete_removes_one_file_and_tolerates_a_missing_one(root):
    keep, gone = storage.join(root, "lease", "keep.json"), storage.join(root, "lease", "gone.json")
    storage.write_bytes(keep, b"1")
    storage.write_bytes(gone, b"2")
    storage.delete(gone)
    assert list(storage.list_files(root)) == [keep]
    storage.delete(gone)  # already gone: a second closer of the same lease is not an error
    assert storage.read_bytes(keep) == b"1"


def test_list_is_recursive_sorted_and_filters_suffixes_case_insensitively(root):
    names = ["b/2.PNG", "a/1.png", "a/deep/er/3.jpg", "notes.txt", "c.png"]
    for name in names:
        storage.write_bytes(storage.join(root, name), b"x")
    listed = [storage.relative_to(uri, root) for uri in storage.list_files(root)]
    assert listed == sorted(names)
    images = [storage.relative_to(uri, root) for uri in storage.list_files(root, {".png", ".jpg"})]
    assert images == ["a/1.png", "a/deep/er/3.jpg", "b/2.PNG", "c.png"]


def test_list_does_not_match_sibling_prefixes(root):
    storage.write_bytes(storage.join(root, "in", "x.png"), b"x")
    storage.write_bytes(storage.join(root, "incoming", "y.png"), b"y")
    listed = [storage.relative_to(uri, root) for uri in storage.list_files(storage.join(root, "in"))]
    assert listed == ["in/x.png"] or listed == ["x.png"]
    assert all("incoming" not in uri for uri in storage.list_files(storage.join(root, "in")))


def test_keys_with_spaces_and_unicode(root):
    name = "patient 001/Thorax – März ü 肺.png"
    uri = storage.join(root, name)
    storage.write_bytes(uri, b"unicode")
    assert storage.read_bytes(uri) == b"unicode"
    (listed,) = storage.list_files(root)
    assert listed == uri
    assert storage.relative_to(listed, root) == name


def test_create_if_absent_never_overwrites(root):
    uri = storage.join(root, "ledger", "entry.json")
    assert storage.create_if_absent(uri, b"first") is True
    assert storage.create_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_create_if_absent_race_has_exactly_one_winner(root):
    uri = storage.join(root, "race", "claim")
    results = race_to_create(uri)
    assert results.count(True) == 1
    winner = results.index(True)
    assert storage.read_bytes(uri) == f"worker {winner}".encode()


def test_missing_key_names_the_uri(root):
    uri = storage.join(root, "nope", "missing.png")
    with pytest.raises(storage.NotFound) as caught:
        storage.read_bytes(uri)
    assert uri in str(caught.value)
    assert "no such" in caught.value.reason


def test_listing_2500_keys_pages_through_everything(s3_bucket):
    from store.s3 import client as s3_client

    client = s3_client()
    bucket = s3_bucket[len("s3://") :]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"many/{i:05d}.png", Body=b""), range(2500)))
    listed = list(storage.list_files(f"{s3_bucket}/many", {".png"}))
    assert len(listed) == 2500
    assert listed[0] == f"{s3_bucket}/many/00000.png" and listed[-1] == f"{s3_bucket}/many/02499.png"


def test_missing_bucket_is_named(moto_server):
    uri = "s3://no-such-bucket-here/x/y.png"
    for operation in (storage.read_bytes, lambda u: list(storage.list_files(u)), storage.exists,
                      lambda u: list(storage.list_files(u, missing_ok=True))):
        with pytest.raises(storage.NotFound) as caught:
            operation(uri)
        assert "no such bucket 'no-such-bucket-here'" in str(caught.value)
    with pytest.raises(storage.NotFound, match="no such bucket"):
        storage.write_bytes(uri, b"x")


def test_a_folder_not_made_yet_lists_as_empty_when_allowed(root):
    assert list(storage.list_files(storage.join(root, "ledger", "v1"), missing_ok=True)) == []
    storage.write_bytes(storage.join(root, "ledger", "v1", "a.json"), b"{}")
    assert list(storage.list_files(storage.join(root, "ledger", "v1"), missing_ok=True)) == [
        storage.join(root, "ledger", "v1", "a.json")]


def test_local_folder_errors(tmp_path):
    with pytest.raises(storage.NotFound, match="no such folder"):
        list(storage.list_files(str(tmp_path / "absent")))
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(storage.NotAFolder, match="not a folder"):
        list(storage.list_files(str(file)))
    with pytest.raises(storage.NotAFolder):
        storage.write_bytes(str(file / "child.txt"), b"x")


def test_unreadable_file_and_folder_are_listed_and_refused_one_by_one():
    """As a non-root runner sees them (root reads anything, so as root the check runs as 'nobody')."""
    import os
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="cxr-perm-"))
    try:
        root.chmod(0o755)
        (root / "ok.png").write_bytes(b"x")
        (root / "locked.png").write_bytes(b"x")
        (root / "locked.png").chmod(0)
        (root / "closed").mkdir()
        (root / "closed" / "inside.png").write_bytes(b"x")
        (root / "closed").chmod(0)
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                listed = list(storage.list_files(str(root)))
                lines = [repr(sorted(uri.rsplit("/", 1)[1] for uri in listed))]
                for uri in listed:
                    try:
                        storage.read_bytes(uri)
                        lines.append("read")
                    except storage.Unreadable as error:
                        lines.append(error.reason)
                os.write(write_end, "\n".join(lines).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            lines = pipe.read().splitlines()
        os.waitpid(child, 0)
        assert lines[0] == "['closed', 'locked.png', 'ok.png']"  # the folder itself: its content is unknown
        assert lines[1:] == ["a folder that cannot be listed: permission denied", "permission denied", "read"]
    finally:
        (root / "closed").chmod(0o755)
        shutil.rmtree(root)


def test_s3_bad_credentials_are_access_denied(s3_bucket, monkeypatch):
    """moto accepts any key unless IAM checks are on; a real S3 answers 403 InvalidAccessKeyId."""
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "bad key"}}, "GetObject")
    from store.s3 import storage_error

    translated = storage_error(f"{s3_bucket}/k", error)
    assert isinstance(translated, storage.AccessDenied)
    assert f"{s3_bucket}/k" in str(translated)


def test_local_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    uri = str(tmp_path / "out" / "predictions.csv")
    storage.write_bytes(uri, b"a" * 1_000_000)
    storage.create_if_absent(str(tmp_path / "out" / "claim"), b"x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["claim", "predictions.csv"]


def test_file_uris_and_plain_paths_are_the_same_place(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/with%20space.txt", b"x")
    assert (tmp_path / "with space.txt").read_bytes() == b"x"
    assert list(storage.list_files(f"file://{tmp_path}")) == [str(tmp_path / "with space.txt")]


@pytest.mark.parametrize("bad", ["", "s3://", "gs://bucket/x", "file://otherhost/x"])
def test_bad_uris_are_refused_with_a_message(bad):
    with pytest.raises(ValueError):
        storage.read_bytes(bad)


def test_join_and_relative_to():
    assert storage.join("s3://b", "x", "y.png") == "s3://b/x/y.png"
    assert storage.join("s3://b/p/", "/x/") == "s3://b/p/x"
    assert storage.join("/data", "a/b") == str(Path("/data/a/b"))
    assert storage.relative_to("s3://b/p/x/y.png", "s3://b/p") == "x/y.png"
    with pytest.raises(ValueError):
        storage.relative_to("s3://other/p/x", "s3://b/p")


def test_read_a_prefix_of_a_file(root):
    uri = storage.join(root, "dicom-without-suffix")
    storage.write_bytes(uri, bytes(128) + b"DICM" + b"rest of the file")
    assert storage.read_bytes(uri, length=132) == bytes(128) + b"DICM"
    empty = storage.join(root, "empty")
    storage.write_bytes(empty, b"")
    assert storage.read_bytes(empty, length=132) == b""


def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_file(tmp_path):
    """A real full file system where this runner may mount one; else a file-size limit (EFBIG)."""
    import os
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                             capture_output=True, check=False).returncode == 0
    try:
        if mounted:
            with pytest.raises(storage.NoSpace, match="No space left on device; nothing was written"):
                storage.write_bytes(str(full / "out" / "predictions.csv"), b"x" * 200_000)
            with pytest.raises(storage.NoSpace):
                storage.create_if_absent(str(full / "ledger" / "entry.json"), b"x" * 200_000)
            assert [p.name for p in full.rglob("*") if p.is_file()] == []
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            import resource
            import signal

            try:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
                try:
                    storage.write_bytes(str(tmp_path / "capped" / "predictions.csv"), b"x" * 200_000)
                    message = "written"
                except storage.NoSpace as error:
                    message = str(error)
                os.write(write_end, message.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            message = pipe.read()
        os.waitpid(child, 0)
        assert message.endswith("predictions.csv: cannot write: File too large; nothing was written")
        assert list((tmp_path / "capped").iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(full)], check=False)


def test_listing_survives_deep_nesting_and_reads_never_leave_the_tree_through_a_linked_folder(tmp_path):
    import os
    import sys

    root = tmp_path / "incoming"
    deep = root.joinpath(*["d"] * 400)
    deep.mkdir(parents=True)
    (deep / "x.png").write_bytes(b"x")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)  # deeper nesting than the stack allows: a recursive walk would fail
    try:
        assert list(storage.list_files(str(root))) == [str(deep / "x.png")]
    finally:
        sys.setrecursionlimit(limit)

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside, root / "linked")  # e.g. a folder swapped for a link after the listing
    with pytest.raises(storage.Unreadable, match="outside the incoming folder through a linked folder"):
        storage.read_bytes(str(root / "linked" / "secret.png"), within=str(root))
    assert storage.read_bytes(str(root / "linked" / "secret.png")) == b"secret"  # trusted reads are not limited


# --- compare-and-swap (production.json) ------------------------------------------------------------


def test_replace_if_unchanged_writes_only_over_the_version_it_read(root):
    uri = storage.join(root, "models", "production.json")
    assert storage.read_versioned(uri) == (None, None)
    assert storage.replace_if_unchanged(uri, b"first", None) is True
    assert storage.replace_if_unchanged(uri, b"again from nothing", None) is False
    data, token = storage.read_versioned(uri)
    assert data == b"first" and token
    assert storage.replace_if_unchanged(uri, b"second", token) is True
    _, second_token = storage.read_versioned(uri)
    assert storage.replace_if_unchanged(uri, b"third", second_token) is True
    assert storage.replace_if_unchanged(uri, b"stale", second_token) is False
    assert storage.replace_if_unchanged(uri, b"stale", token) is False
    assert storage.read_bytes(uri) == b"third"
    assert [storage.relative_to(u, root) for u in storage.list_files(root)] == ["models/production.json"]


def test_replace_if_unchanged_race_from_one_read_has_exactly_one_winner(root):
    uri = storage.join(root, "race", "production.json")
    storage.write_bytes(uri, b"start")
    _, token = storage.read_versioned(uri)
    barrier = threading.Barrier(8)

    def swap(worker: int) -> bool:
        barrier.wait()
        return storage.replace_if_unchanged(uri, f"worker {worker}".encode(), token)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(swap, range(8)))
    assert results.count(True) == 1
    assert storage.read_bytes(uri) == f"worker {results.index(True)}".encode()


def test_replace_if_unchanged_after_the_file_was_deleted_loses(root):
    uri = storage.join(root, "gone", "production.json")
    storage.write_bytes(uri, b"x")
    _, token = storage.read_versioned(uri)
    storage.delete(uri)
    assert storage.replace_if_unchanged(uri, b"y", token) is False
    assert not storage.exists(uri)


def test_a_lock_left_by_a_killed_writer_is_named_not_broken(tmp_path):
    uri = str(tmp_path / "models" / "production.json")
    storage.write_bytes(uri, b"x")
    _, token = storage.read_versioned(uri)
    lock = tmp_path / "models" / "production.json.lock"
    lock.write_text("pid 1\n")
    with pytest.raises(storage.StorageError, match=r"production.json.lock has been held for over 0.1 s.*remove it"):
        storage.replace_if_unchanged(uri, b"y", token, lock_wait_seconds=0.1)
    assert storage.read_bytes(uri) == b"x" and lock.exists()
    lock.unlink()
    assert storage.replace_if_unchanged(uri, b"y", token) and not lock.exists()


@pytest.fixture
def umask():
    """Sets the process' umask for the test, and puts the old one back."""
    import os

    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize(("mask", "mode"), [(0o027, 0o640), (0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_local_outputs_keep_the_umasks_mode(tmp_path, umask, monkeypatch, mask, mode):
    """Every way a file is written (replaced, created once by a hard link or, where a file system
    has none, with O_EXCL, replaced under the lock) gets 0666 less the umask, as any program's
    files do: a site that keeps outputs from others with umask 027 gets 0640, not a forced 0644."""
    import errno
    import os
    import stat

    umask(mask)
    out = tmp_path / "results"
    storage.write_bytes(str(out / "predictions.csv"), b"a,b\n")
    storage.create_if_absent(str(out / "ledger" / "0001.json"), b"{}")
    _, token = storage.read_versioned(str(out / "production.json"))
    assert storage.replace_if_unchanged(str(out / "production.json"), b"{}", token)
    storage.write_bytes(str(out / "predictions.csv"), b"a,b\n1,2\n")  # a replacement, not the first write

    def no_hard_links(*_arguments, **_options):
        raise OSError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as patched:
        patched.setattr(os, "link", no_hard_links)
        storage.create_if_absent(str(out / "ledger" / "0002.json"), b"{}")

    written = {path.relative_to(out).as_posix(): stat.S_IMODE(path.stat().st_mode)
               for path in out.rglob("*") if path.is_file()}
    assert written == {name: mode for name in ("predictions.csv", "ledger/0001.json", "ledger/0002.json",
                                               "production.json")}, {k: oct(v) for k, v in written.items()}
    folders = {stat.S_IMODE(path.stat().st_mode) for path in (out, out / "ledger")}
    assert folders == {0o777 & ~mask}
