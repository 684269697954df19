"""Decoding in killable workers: a deadline and a memory ceiling cost one input, never the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest

from imaging.sandbox import DecoderPool


def png(side: int, seed: int = 0, dtype=np.uint8) -> bytes:
    noise = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, (side, side), dtype=dtype)
    return cv2.imencode(".png", noise)[1].tobytes()


@pytest.fixture
def pool():
    pool = DecoderPool(size=1)
    yield pool
    pool.close()


def test_decodes_and_resizes(pool):
    decoded = pool.decode(png(300), "a.png", 64, timeout=60)
    assert decoded.reason is None and decoded.pixels.shape == (64, 64, 3) and decoded.pixels.dtype == np.uint8


def test_an_image_crosses_to_and_from_a_worker_in_one_pipe_fill(pool):
    # Linux's default 64 KiB pipes made parent and worker take turns several times per input.
    fcntl = pytest.importorskip("fcntl")
    pool.decode(png(300), "a.png", 64, timeout=60)
    worker = next(iter(pool._workers))
    limit = int(open("/proc/sys/fs/pipe-max-size").read()) if os.path.exists("/proc/sys/fs/pipe-max-size") else 0
    for connection in (worker.requests, worker.replies):
        assert fcntl.fcntl(connection.fileno(), 1032) >= min(1 << 20, limit or 1 << 20)  # F_GETPIPE_SZ


def test_one_decoder_per_core_or_per_core_of_its_dask_share(monkeypatch):
    from imaging.sandbox import decoder_count

    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    assert decoder_count() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")  # flows/fan_out.py gives each Dask worker its share
    assert decoder_count() == 3
    # ...and never more than half the memory can hold at each decoder's ceiling.
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "64")
    pages = {"SC_PHYS_PAGES": (4 << 30) // 4096, "SC_PAGE_SIZE": 4096}  # a 4 GiB machine
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert decoder_count() == 2


def test_a_bad_file_is_a_reason_and_the_worker_goes_on(pool):
    assert pool.decode(b"<html>", "page.png", 64, timeout=60).reason.startswith("not an image")
    assert pool.decode(png(200), "b.png", 64, timeout=60).reason is None


def test_an_input_over_its_deadline_is_stopped_and_the_next_one_decodes(pool):
    big = png(5000, dtype=np.uint16)  # about half a second to decode here; far over 10 ms
    decoded = pool.decode(big, "slow.png", 64, timeout=0.01)
    assert decoded.pixels is None and "took longer than 0.01 s" in decoded.reason
    assert pool.decode(png(200), "next.png", 64, timeout=60).reason is None


def test_an_input_over_the_memory_ceiling_is_rejected_and_the_next_one_decodes():
    pool = DecoderPool(size=1, memory_bytes=40 * 1024 * 1024)
    try:
        decoded = pool.decode(png(5000, dtype=np.uint16), "huge.png", 64, timeout=60)  # 50 MB of samples
        assert decoded.pixels is None
        assert "memory" in decoded.reason, decoded.reason
        assert pool.decode(png(200), "next.png", 64, timeout=60).reason is None
    finally:
        pool.close()


def test_workers_end_with_their_parent_even_after_sigkill(tmp_path):
    script = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, sys.argv[1])
        from imaging.sandbox import DecoderPool
        pool = DecoderPool(size=2)
        pool.decode(b"x", "x.png", 64, timeout=60)
        print(*[worker.process.pid for worker in pool._workers], flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, os.getcwd()], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers and all(_alive(pid) for pid in workers)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
