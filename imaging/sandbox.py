"""Decoding untrusted files in worker processes that can be killed.

A decoder that hangs on a crafted file, or allocates until the machine swaps, cannot be stopped
from inside a thread. Each input is therefore decoded (and resized) in a small worker process
with a memory ceiling (``RLIMIT_DATA``) and a deadline: an input that overruns either costs its
own rejected row and a fresh worker, never the run. Workers import only NumPy, OpenCV, Pillow and
pydicom (no TensorFlow, no Prefect), start in about half a second, are reused for every input of
the process, and exit when their parent does, even after a SIGKILL (their pipe closes).

Run as ``python -m imaging.sandbox READ_FD WRITE_FD DATA_LIMIT``: that is a worker.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from imaging.dicom_identity import Study

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_MEMORY_BYTES", "Decoded", "DecoderPool", "decode_isolated"]

# Headroom over a worker's own footprint: the largest file we read (128 MB by default) plus the
# decoded-size budget of imaging.decode and the copies made while converting and resizing.
DEFAULT_MEMORY_BYTES = 768 * 1024 * 1024
_OUT_OF_MEMORY = 75  # a worker's exit status when it hit its ceiling
_START_SECONDS = 120  # imports on a loaded machine; a worker that cannot start is a fault of the host


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray | None  # (input_size, input_size, 3) uint8, or None when rejected
    reason: str | None = None
    study: Study | None = None  # a DICOM input's identifiers (imaging.dicom_identity), checked again here


class DecoderPool:
    """``size`` worker processes shared by any number of threads; ``decode`` blocks for a free one."""

    def __init__(self, size: int, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.memory_bytes = memory_bytes
        self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(size):
            self._idle.put(None)  # started on first use
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self.size = size

    def decode(self, data: bytes, uri: str, input_size: int, timeout: float, reduced: bool = False,
               frontal_chest_only: bool = False) -> Decoded:
        """``reduced``: a JPEG at least twice ``input_size`` a side is decoded at reduced resolution;
        ``frontal_chest_only``: a DICOM whose header says it is not a frontal chest X-ray is refused."""
        worker = self._idle.get()
        try:
            if worker is not None and not worker.alive():
                self._stop(worker)
                worker = None
            if worker is None:
                worker = self._start()
            decoded, healthy = worker.decode(data, uri, input_size, timeout, reduced, frontal_chest_only)
        except BaseException:
            # Interrupted between request and reply: its next reply would answer the wrong input.
            if worker is not None:
                self._stop(worker)
            self._idle.put(None)
            raise
        if not healthy:
            self._stop(worker)
            worker = None
        self._idle.put(worker)
        return decoded

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.stop()

    def _start(self) -> _Worker:
        worker = _Worker(self.memory_bytes)
        with self._lock:
            self._workers.add(worker)
        return worker

    def _stop(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.stop()


class _Worker:
    def __init__(self, memory_bytes: int) -> None:
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        _widen(to_child_write)
        _widen(from_child_write)
        try:
            # -P: the working folder is not on the path (a folder named 'tasks' there must not be imported).
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "imaging.sandbox", str(to_child_read), str(from_child_write),
                 str(memory_bytes)],
                pass_fds=(to_child_read, from_child_write), env=_worker_environment(), stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C meant for the run is handled by the run, not by every worker
            )
        except OSError:
            for descriptor in (to_child_read, to_child_write, from_child_read, from_child_write):
                os.close(descriptor)
            raise
        finally:
            if hasattr(self, "process"):
                os.close(to_child_read)
                os.close(from_child_write)
        self.requests = Connection(to_child_write, readable=False)
        self.replies = Connection(from_child_read, writable=False)
        # Its imports must not count against the first input's deadline.
        try:
            ready = self.replies.poll(_START_SECONDS) and self.replies.recv_bytes() == b"ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.stop()
            raise RuntimeError(f"a decoder worker did not start within {_START_SECONDS} s")

    def alive(self) -> bool:
        return self.process.poll() is None

    def decode(self, data: bytes, uri: str, input_size: int, timeout: float, reduced: bool,
               frontal_chest_only: bool) -> tuple[Decoded, bool]:
        """The outcome, and whether this worker may be used again."""
        import numpy as np

        try:
            request = {"uri": uri, "input_size": input_size, "reduced": reduced,
                       "frontal_chest_only": frontal_chest_only}
            self.requests.send_bytes(json.dumps(request).encode("utf-8", "surrogatepass"))
            self.requests.send_bytes(data)
            if not self.replies.poll(timeout):
                return Decoded(None, f"decoding took longer than {timeout:g} s (decode_timeout_seconds): stopped"), False
            header = json.loads(self.replies.recv_bytes())
            try:
                # Only identifiers that fit their grammar cross back: a worker parses hostile files.
                study = Study.from_record(header.get("study"))
            except ValueError:
                return Decoded(None, "the decoder sent identifiers out of their grammar: stopped"), False
            if header["status"] == "ok":
                pixels = np.frombuffer(self.replies.recv_bytes(), np.uint8).reshape(header["shape"])
                return Decoded(pixels, study=study), True
            return Decoded(None, header["reason"], study), not header.get("recycle", False)
        except (EOFError, OSError):
            return Decoded(None, self._death()), False

    def _death(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "the decoder stopped answering: stopped"
        if code == _OUT_OF_MEMORY:
            return "decoding needs more memory than a decoder worker may use: not decoded"
        if code < 0 and -code in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            name = signal.Signals(-code).name
            return f"the decoder crashed on this file ({name}; out of its memory budget or a decoder fault)"
        return f"the decoder crashed on this file (exit status {code})"

    def stop(self) -> None:
        for connection in (self.requests, self.replies):
            try:
                connection.close()
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _widen(pipe: int) -> None:
    """A pipe that holds a whole image: Linux's default 64 KiB makes the parent and the worker take
    turns several times per input, which on many cores held the decoders back (bench/gpu_bench.py)."""
    try:
        import fcntl

        fcntl.fcntl(pipe, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
    except (ImportError, OSError):  # not Linux, or over /proc/sys/fs/pipe-max-size: the default works
        pass


_PIPE_BYTES = 1 << 20
# A decoder's own size before its ceiling applies (Python, NumPy, OpenCV, pydicom), rounded up.
_WORKER_FOOTPRINT = 256 << 20


def _worker_environment() -> dict[str, str]:
    """What a decoder needs, and no secret: it parses hostile files, so credentials and the model
    signing key stay with the parent (which does all reading)."""
    kept = {name: value for name, value in os.environ.items()
            if name in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")}
    return {**kept, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


_pool: DecoderPool | None = None
_pool_lock = threading.Lock()


def decoder_count() -> int:
    """Decoder processes for this process: one per core it may use, as far as memory allows. A Dask
    worker sharing the machine with others is given its share in TF_NUM_INTRAOP_THREADS (flows/fan_out.py). On a 16-core GPU
    machine the former cap of 4 held screening to 278 img/s against 765 with 16 (bench/gpu_bench.py)."""
    share = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
    if share.isdigit() and int(share) > 0:
        cores = int(share)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Each decoder may grow to its ceiling on a hostile input: all of them together may take at most
    # half of the machine's memory, whatever the number of cores.
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return max(1, cores)
    return max(1, min(cores, memory // 2 // (DEFAULT_MEMORY_BYTES + _WORKER_FOOTPRINT)))


def _shared_pool() -> DecoderPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = DecoderPool(size=decoder_count())
            atexit.register(_pool.close)
        return _pool


def decode_isolated(data: bytes, uri: str, input_size: int, timeout: float, reduced: bool = False,
                    frontal_chest_only: bool = False) -> Decoded:
    """Decode ``data`` and resize it to ``input_size`` in a worker process of this process' pool."""
    return _shared_pool().decode(data, uri, input_size, timeout, reduced, frontal_chest_only)


# ---------------------------------------------------------------------------------------------
# The worker


def _serve(read_fd: int, write_fd: int, memory_bytes: int) -> None:
    import resource

    import cv2

    import imaging.decode  # noqa: F401
    import imaging.dicom  # noqa: F401 - pydicom too: the first DICOM must not pay for it
    import model.preprocessing  # noqa: F401 - imported before the ceiling is set

    cv2.setNumThreads(1)  # parallelism comes from the number of workers
    requests, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    _exit_with_parent()
    # From here on every allocation counts against the ceiling; the imports above do not.
    used = _data_segment_bytes()
    resource.setrlimit(resource.RLIMIT_DATA, (used + memory_bytes, used + memory_bytes))
    replies.send_bytes(b"ready")
    try:
        _answer(requests, replies)
    except MemoryError:
        # Whatever held the memory, this process may now be in any state: the parent starts another.
        os._exit(_OUT_OF_MEMORY)


def _answer(requests: Connection, replies: Connection) -> None:
    import numpy as np

    from imaging.decode import ImageDecodeError, decode_image_and_study
    from imaging.dicom_identity import DicomRejected
    from model.preprocessing import Preprocessing, resize

    while True:
        try:
            request = json.loads(requests.recv_bytes().decode("utf-8", "surrogatepass"))
            data = requests.recv_bytes()
        except (EOFError, OSError):
            return
        uri = request["uri"]
        try:
            size = request["input_size"]
            decoded, study = decode_image_and_study(data, uri, reduce_to=size if request.get("reduced") else None,
                                                    frontal_chest_only=bool(request.get("frontal_chest_only")))
            pixels = resize(decoded, Preprocessing(input_size=size))
            header, body = {"status": "ok", "shape": list(pixels.shape)}, np.ascontiguousarray(pixels).tobytes()
            header["study"] = None if study is None else study.to_record()
        except ImageDecodeError as error:
            # After running out of memory this process may hold anything: the parent starts another.
            header, body = {"status": "rejected", "reason": error.reason,
                            "recycle": error.reason.startswith("out of memory")}, None
            header["study"] = error.study.to_record() if isinstance(error, DicomRejected) else None
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a decoder bug on one file must cost only that file
            header, body = {"status": "rejected", "recycle": True,
                            "reason": f"the decoder failed on this file ({type(error).__name__})"}, None
        del data
        replies.send_bytes(json.dumps(header).encode())
        if body is not None:
            replies.send_bytes(body)


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _exit_with_parent() -> None:
    """A worker busy decoding does not read its pipe, so it also watches for its parent's end."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
