"""Peak memory of a screening worker on hostile inputs, against its own baseline, in one run.

The worker is this process (model loaded, flow running) plus its decoder processes
(``imaging.sandbox``). Baseline: their resident memory after a warm-up run on 40 ordinary images (full batches, all
explained with Grad-CAM). Then
one screening run over a hostile corpus made here: the decoders' hostile files
(``tests/hostile_files.py``), bombs aimed at memory (a 16-bit RGBA PNG just under the pixel limit,
a link to /dev/zero, a file just under the byte cap, a deflated DICOM bomb if the corpus has one)
and real-size valid X-rays. Peaks are the kernel's own (VmHWM, reset after the warm-up through
/proc/PID/clear_refs), plus a 10 ms sampler of the whole tree's RSS for workers that were
replaced during the run.

Goal (issue #12): the worker's peak stays within +500 MB of its baseline on any input.

    .venv/bin/python bench/hostile_bench.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import bootstrap  # noqa: E402

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import cpu_line  # noqa: E402
from bench.screen_bench import make_store  # noqa: E402
from flows.parameters import ScreenParameters  # noqa: E402
from flows.screen import screen  # noqa: E402
from imaging import sandbox  # noqa: E402
from imaging.defaults import DECODE_TIMEOUT_SECONDS  # noqa: E402
from imaging.raster import encode_png  # noqa: E402
from store.phantoms import chest_phantom  # noqa: E402
from tests.hostile_files import decoder_cases  # noqa: E402

MB = 1024 * 1024
GOAL_MB = 500


def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def worker_pids() -> list[int]:
    pool = sandbox._pool
    return [worker.process.pid for worker in list(pool._workers)] if pool else []


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")


class TreeSampler(threading.Thread):
    """The largest total RSS of this process and its decoders seen every 10 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = status_kb(os.getpid(), "VmRSS") + sum(status_kb(pid, "VmRSS") for pid in worker_pids())
            self.peak_kb = max(self.peak_kb, total)
            time.sleep(0.01)


def write_corpus(folder: Path, cap: int) -> dict[str, str]:
    """Name -> what it is; every file written under ``folder``."""
    made = {}
    for name, data, _ in decoder_cases():
        (folder / "decoders" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "decoders" / name).write_bytes(data)
        made[f"decoders/{name}"] = "decoder case"
    (folder / "bombs").mkdir()
    side = 7700  # 59 MP, just under the pixel limit; 16-bit RGBA: 474 MB of samples
    rgba = np.zeros((side, side, 4), np.uint16)
    rgba[::97, ::89] = 60000
    cv2.imwrite(str(folder / "bombs" / "rgba16-59mp.png"), rgba)
    made["bombs/rgba16-59mp.png"] = f"16-bit RGBA {side}x{side} ({side * side * 8 / MB:.0f} MB decoded)"
    os.symlink("/dev/zero", folder / "bombs" / "zero.png")
    made["bombs/zero.png"] = "link to /dev/zero"
    (folder / "bombs" / "under-cap.png").write_bytes(os.urandom(cap - 1))
    made["bombs/under-cap.png"] = f"{(cap - 1) / MB:.0f} MB of noise named .png"
    (folder / "valid").mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):  # full-size X-rays as PACS exports them: 4280x3520, 16-bit
        image = cv2.resize(chest_phantom(rng, 512), (3520, 4280)).astype(np.uint16) * 64
        cv2.imwrite(str(folder / "valid" / f"full-{index}.png"), image)
        made[f"valid/full-{index}.png"] = "valid 4280x3520 16-bit"
    return made


def main() -> None:
    print(cpu_line())
    cap = ScreenParameters.default("max_file_bytes")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        store, results = str(root / "models"), str(root / "results")
        make_store(store, 224)
        # Warm-up: full batches of ordinary images, every one explained, so that the baseline holds
        # what screening itself needs (TensorFlow's buffers, Grad-CAM) and the peak only what inputs add.
        warm = root / "warm"
        warm.mkdir()
        for index in range(40):
            cv2.imwrite(str(warm / f"{index}.png"), chest_phantom(np.random.default_rng(index), 1024))
        screen(ScreenParameters(incoming_uri=str(warm), results_uri=results, model_store_uri=store, explain="all"))
        incoming = root / "incoming"
        incoming.mkdir()
        made = write_corpus(incoming, cap)

        # Baseline: warmed up, every decoder running.
        for _ in range(sandbox._pool.size):
            sandbox._pool.decode(encode_png(np.eye(128, dtype=np.uint8) * 255), "w.png", 224, DECODE_TIMEOUT_SECONDS)
        main_base = status_kb(os.getpid(), "VmRSS")
        workers_base = {pid: status_kb(pid, "VmRSS") for pid in worker_pids()}
        for pid in [os.getpid(), *workers_base]:
            reset_peak(pid)
        sampler = TreeSampler()
        sampler.start()
        started = time.perf_counter()
        summary = screen(ScreenParameters(incoming_uri=str(incoming), results_uri=results, model_store_uri=store,
                                          explain="all"))
        seconds = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
        main_peak = status_kb(os.getpid(), "VmHWM")
        workers_peak = {pid: status_kb(pid, "VmHWM") for pid in worker_pids()}

    base_kb = main_base + sum(workers_base.values())
    print(f"corpus: {len(made)} entries; run {summary.status} in {seconds:.1f} s: "
          f"{summary.ok} ok, {summary.rejected} rejected")
    print(f"{'':34}{'baseline MB':>12}{'peak MB':>10}{'peak - baseline':>17}")
    print(f"{'screening process':34}{main_base / 1024:12.0f}{main_peak / 1024:10.0f}{(main_peak - main_base) / 1024:17.0f}")
    for pid, base in workers_base.items():
        peak = workers_peak.get(pid)
        shown = f"{peak / 1024:10.0f}{(peak - base) / 1024:17.0f}" if peak else f"{'replaced':>10}{'':17}"
        print(f"{'decoder ' + str(pid):34}{base / 1024:12.0f}{shown}")
    tree_growth = (sampler.peak_kb - base_kb) / 1024
    print(f"{'whole worker (sampled every 10 ms)':34}{base_kb / 1024:12.0f}{sampler.peak_kb / 1024:10.0f}{tree_growth:17.0f}")
    verdict = "meets" if tree_growth <= GOAL_MB and (main_peak - main_base) / 1024 <= GOAL_MB else "MISSES"
    print(f"goal: within +{GOAL_MB} MB of baseline: {verdict}")


if __name__ == "__main__":
    main()
