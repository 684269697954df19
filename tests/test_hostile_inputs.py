"""A hostile incoming folder and bucket, screened in one run each: every entry gets exactly one row
with the reason it must have, the run completes, and nothing in the incoming tree changes.

The corpus is made here (never committed): file-system kinds (FIFOs, sockets, link loops, links out
of the tree, a name that is not UTF-8, an oversized file) plus the decoders' hostile files
(``tests/hostile_files.py``).
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest

from model.scope import SCOPE_PREFIX
from store import storage
from store.phantoms import chest_phantom
from tests.hostile_files import decoder_cases
from tests.test_screen_flow import run_rows, run_screen

pytestmark = pytest.mark.slow

MAX_FILE_BYTES = 2_000_000


def phantom_png(seed: int) -> bytes:
    return cv2.imencode(".png", chest_phantom(np.random.default_rng(seed), 128))[1].tobytes()


def write_decoder_cases(write) -> dict[str, str]:
    expected = {}
    for name, data, reason in decoder_cases():
        expected[write(f"decoders/{name}", data)] = reason
    return expected


def filesystem_corpus(root: Path, outside: Path) -> tuple[dict[str, str], list[socket.socket]]:
    """Entries under ``root`` -> the substring their reason must hold ('' for an ok row)."""
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    expected: dict[str, str] = {}

    def regular(name: str, data: bytes, reason: str = "") -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[str(path)] = reason

    regular("images/plain.png", phantom_png(1))
    regular("images/a,\"quoted\"\nname.png", phantom_png(2))
    regular("images/<script>alert(1)</script>.png", phantom_png(3))
    regular("images/big.png", phantom_png(4) + os.urandom(MAX_FILE_BYTES), "file too large")
    # A name that is not UTF-8 (Linux allows any bytes): one row, under a percent-encoded file:// URI.
    raw = os.fsencode(root / "images") + b"/\xff\xfe-latin1-\xe9.png"
    Path(os.fsdecode(raw)).write_bytes(phantom_png(5))
    expected["file://" + quote(raw)] = ""

    os.mkfifo(root / "images/fifo.png")
    expected[str(root / "images/fifo.png")] = "not a regular file: a FIFO"
    os.mkfifo(root / "images/IM_FIFO")  # no suffix: would be peeked for a DICOM preamble
    expected[str(root / "images/IM_FIFO")] = "not a regular file: a FIFO"
    sockets = []
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "images/socket.png"))
    sockets.append(sock)
    expected[str(root / "images/socket.png")] = "not a regular file: a socket"

    links = {
        "links/loop.png": ("loop.png", "loop of symbolic links"),
        "links/dangling.jpg": ("nowhere.jpg", "target does not exist"),
        "links/escape.png": (str(outside / "secret.png"), "outside the incoming folder"),
        "links/passwd.dcm": ("/etc/passwd", "outside the incoming folder"),
        "links/zero.png": ("/dev/zero", "outside the incoming folder"),
        "links/inside.png": (str(root / "images/plain.png"), ""),
    }
    (outside / "secret.png").write_bytes(phantom_png(6))
    (root / "links").mkdir()
    for name, (target, reason) in links.items():
        os.symlink(target, root / name)
        expected[str(root / name)] = reason
    os.symlink(outside, root / "links/outside-folder")  # no suffix: a row that says it is not followed
    expected[str(root / "links/outside-folder")] = "outside the incoming folder"
    return expected, sockets


def regular_files(root: Path) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def check_rows(rows: list[dict], expected: dict[str, str]) -> None:
    assert sorted(row["image_uri"] for row in rows) == sorted(expected), "exactly one row per entry"
    for row in rows:
        reason = expected[row["image_uri"]]
        if reason:
            assert row["status"] == "rejected" and reason in row["reason"], (row["image_uri"], row["reason"])
        else:  # decoded: scored, or judged out of scope by the model's scope gate (a DICOM ramp is no X-ray)
            assert row["status"] == "ok" or row["reason"].startswith(SCOPE_PREFIX), (row["image_uri"], row["reason"])


def test_hostile_folder_screens_to_one_row_each(model_store, tmp_path):  # noqa: F811
    incoming, results = tmp_path / "incoming", tmp_path / "results"
    expected, sockets = filesystem_corpus(incoming, tmp_path / "outside")

    def write(name: str, data: bytes) -> str:
        path = incoming / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    expected.update(write_decoder_cases(write))
    before = regular_files(incoming)

    summary = run_screen(str(incoming), str(results), model_store, chunk_size=16, max_file_bytes=MAX_FILE_BYTES)

    assert summary.status == "completed"
    check_rows(run_rows(str(results)), expected)
    assert summary.screened == len(expected)
    assert regular_files(incoming) == before, "inputs are never changed"
    report = Path(summary.outputs["report.html"]).read_text()
    assert "<script>alert(1)" not in report
    # Rerun: nothing is new, nothing hangs.
    again = run_screen(str(incoming), str(results), model_store, max_file_bytes=MAX_FILE_BYTES)
    assert again.screened == 0 and again.already_screened == len(expected)
    for sock in sockets:
        sock.close()


def test_hostile_bucket_screens_to_one_row_each(model_store, s3_bucket, tmp_path):  # noqa: F811
    incoming, results = f"{s3_bucket}/incoming", f"{s3_bucket}/results"

    def write(name: str, data: bytes) -> str:
        uri = storage.join(incoming, name)
        storage.write_bytes(uri, data)
        return uri

    expected = write_decoder_cases(write)
    expected[write("keys/big.png", phantom_png(4) + os.urandom(MAX_FILE_BYTES))] = "file too large"
    expected[write("keys/ünïcödé name, \"quoted\".png", phantom_png(2))] = ""
    expected[write("keys/<img src=x onerror=alert(1)>.png", phantom_png(3))] = ""

    summary = run_screen(incoming, results, model_store, chunk_size=16, max_file_bytes=MAX_FILE_BYTES)

    assert summary.status == "completed"
    check_rows(run_rows(results), expected)
