"""Scale on paper, from measurements (issue #11): what a night of a million X-rays would cost.

(a) Per-operation costs through the project's own code (store/storage.py, screening/ledger.py,
    screening/results.py) against a moto S3 server over HTTP on 127.0.0.1, with a latency injected per
    request on the server side like real S3's (--latency-ms), beside the same at 0 ms so that the
    latency's share shows: listing 10k keys, one ledger claim, one chunk record and one part write
    (256 rows as screen_chunk writes them), the done-keys listing at 10k ledger entries, one part read
    (the report reads every part). moto's own CPU per operation is measured too: real S3 spends its
    time in the latency, so "S3-like" = wall - moto CPU is what the projection uses.
(b) The report at 10,000 and 100,000 synthetic rows (10% flagged with thumbnails and Grad-CAM
    overlays, 2% rejected) on a local folder: time and peak RSS of read_run_rows + write_outputs in a
    fresh process, against that process's own baseline (imports done, one small report rendered),
    and report.html's size.
(c) The screening flow on real X-rays (fp32): in this process, and on local Dask clusters of 1 and 2
    worker processes, each on half the images and on all, so that the steady rate and the fixed
    costs (cluster start, model loads) come apart; on a 2-core machine 2 processes should match 1
    (shared cores), and 1 worker against in-process gives Dask's steady overhead.
(d) A projection for 1,000,000 X-rays on 16 two-core workers (and on 4 GPU workers when --gpu-img-s
    is given): time per phase, the step that saturates first, whether the night fits in one hour.

    .venv/bin/python bench/scale_bench.py
    .venv/bin/python bench/scale_bench.py --quick                  # 2k keys, 2k/20k report rows
    .venv/bin/python bench/scale_bench.py --latency-ms 50 --fast-img-s 180 --gpu-img-s 900
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from model.bundle import ModelCard  # noqa: E402
from screening import ledger, reports  # noqa: E402
from screening.results import PredictionRow, ResultsLayout, RunSummary  # noqa: E402
from store import storage
from store.phantoms import chest_phantom  # noqa: E402
from tasks.screen_chunks import CLAIMS_IN_FLIGHT  # noqa: E402

CLASSES = ["non-covid", "covid"]
RUN_ID = "20261127T010000Z-bench1"
MB = 1024 * 1024
# AWS: "at least 3,500 PUT/COPY/POST/DELETE or 5,500 GET/HEAD requests per second per partitioned prefix".
PUT_PER_PREFIX, GET_PER_PREFIX = 3500, 5500
NIGHT_SECONDS = 3600

# The moto server, in its own process: moto's WSGI app behind a middleware that sleeps the injected
# latency before each request (GET /__bench__/latency?ms=N sets it), served by werkzeug, threaded.
SERVER = r"""
import logging, sys, time
from urllib.parse import parse_qs
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

logging.getLogger("werkzeug").setLevel(logging.ERROR)
latency = [0.0]
moto = DomainDispatcherApplication(create_backend_app)

def app(environ, start_response):
    if environ.get("PATH_INFO") == "/__bench__/latency":
        latency[0] = float(parse_qs(environ.get("QUERY_STRING", ""))["ms"][0]) / 1000
        start_response("204 No Content", [])
        return [b""]
    time.sleep(latency[0])
    return moto(environ, start_response)

run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=True, request_handler=MotoRequestHandler)
"""


# --- synthetic rows, as screen_images makes them ---------------------------------------------------


def bench_card() -> ModelCard:
    return ModelCard(version="v-bench", classes=CLASSES, positive_class="covid", threshold=0.5,
                     preprocessing={"version": 1, "input_size": 224, "scale_mode": "unit", "interpolation": "area"},
                     weights={"origin": "none"}, dataset={}, metrics={})


def pictures(count: int = 16) -> list[tuple[str, str]]:
    """(thumbnail, Grad-CAM overlay) pairs like screening's: 160 px JPEG at quality 80, base64."""
    made = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        gray = cv2.cvtColor(cv2.resize(chest_phantom(rng, 512, opacities=True), (160, 160)), cv2.COLOR_GRAY2BGR)
        heat = cv2.applyColorMap(cv2.GaussianBlur(rng.integers(0, 255, (160, 160), np.uint8), (41, 41), 0),
                                 cv2.COLORMAP_JET)
        made.append((jpeg_base64(gray), jpeg_base64(cv2.addWeighted(gray, 0.6, heat, 0.4, 0))))
    return made


def jpeg_base64(image: np.ndarray) -> str:
    return base64.b64encode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()).decode()


def synthetic_row(index: int, flagged_share: float, rejected_share: float,
                  shown: list[tuple[str, str]]) -> PredictionRow:
    rng = random.Random(index)
    uri = f"s3://pacs-export/incoming/2026-11-27/site-{index % 12:02d}/1.2.840.113619.2.55.3.{index:09d}.dcm"
    common = dict(image_uri=uri, sha256=f"{rng.getrandbits(256):064x}", model_version="v-bench", run_id=RUN_ID,
                  screened_at=f"2026-11-27T01:{index // 6000 % 60:02d}:{index // 100 % 60:02d}+00:00")
    draw = rng.random()
    if draw < rejected_share:
        return PredictionRow(**common, status="rejected", reason="not an image: cannot decode (PNG signature bad)",
                             predicted_class="", probabilities={c: None for c in CLASSES}, flagged=False)
    flagged = draw < rejected_share + flagged_share
    p = round(rng.uniform(0.5, 1.0) if flagged else rng.uniform(0.0, 0.5), 6)
    thumbnail, explanation = shown[index % len(shown)] if flagged else (None, None)
    return PredictionRow(**common, status="ok", reason="", predicted_class=CLASSES[flagged],
                         probabilities={"non-covid": round(1 - p, 6), "covid": p}, flagged=flagged, engine="fp32",
                         cam_lung_share=round(rng.random(), 4) if flagged else None,
                         thumbnail=thumbnail, explanation=explanation)


def part_bytes(rows: list[PredictionRow]) -> bytes:
    """A part file as screen_chunk writes it."""
    return "".join(json.dumps(row.to_record(with_thumbnail=True), sort_keys=True) + "\n" for row in rows).encode()


def write_run(results: str, count: int, chunk_size: int, flagged_share: float, rejected_share: float) -> None:
    """A finished run's parts and chunk records under ``results``."""
    layout, shown = ResultsLayout(results).run(RUN_ID), pictures()
    for chunk, start in enumerate(range(0, count, chunk_size)):
        numbers = range(start, min(start + chunk_size, count))
        rows = [synthetic_row(i, flagged_share, rejected_share, shown) for i in numbers]
        storage.write_bytes(layout.chunk_inputs(chunk), json.dumps([row.image_uri for row in rows]).encode())
        storage.write_bytes(layout.part(chunk), part_bytes(rows))


# --- (a) per-operation costs against moto S3 with latency ----------------------------------------


class LatentS3:
    """A moto S3 server over HTTP in its own process; AWS_* variables point store.storage at it."""

    def __enter__(self) -> LatentS3:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the moto server did not start")
                time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}", AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def set_latency(self, milliseconds: float) -> None:
        urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__bench__/latency?ms={milliseconds}").read()

    def fresh_buckets(self, prefix: str, latencies: list[float] | None) -> Iterator[tuple[float, str]]:
        """(latency, bucket) for each latency (default 0 and 32 ms): a new, empty bucket each, to fill
        at no latency; the latency is the caller's to set once it has filled it."""
        import boto3

        for latency in latencies or [0.0, 32.0]:
            bucket = f"{prefix}-{int(latency)}-{int(time.time())}"
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield latency, bucket

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass
class Cost:
    """One operation: mean wall seconds, and moto's CPU seconds within them."""

    wall: float
    server_cpu: float

    @property
    def s3_like(self) -> float:
        """What it would cost where the server's time is only the latency (real S3)."""
        return max(self.wall - self.server_cpu, 0.0)


def measure(server: LatentS3, operation: Callable[[int], object], samples: int) -> Cost:
    operation(-1)  # warm: connections open, code paths loaded
    cpu, started = server.cpu_seconds(), time.perf_counter()
    for sample in range(samples):
        operation(sample)
    return Cost((time.perf_counter() - started) / samples, (server.cpu_seconds() - cpu) / samples)


@dataclass
class Bucket:
    """What the operations work on: ``keys`` inputs and as many ledger entries, one chunk's rows."""

    incoming: str
    results: str
    image: str  # one input of a realistic size
    part_rows: list[PredictionRow]


def populate(bucket: str, keys: int, chunk_size: int, image_kb: int) -> Bucket:
    """Inputs under incoming/ and ledger entries (claimed through ledger.claim), 32 at a time."""
    made = Bucket(storage.join(bucket, "incoming"), storage.join(bucket, "results"),
                  storage.join(bucket, "images", "one.jpeg"), [])
    shown = pictures()
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda i: storage.write_bytes(storage.join(made.incoming, f"scan-{i:07d}.dcm"), b"DICM"),
                      range(keys)))
        list(pool.map(lambda i: ledger.claim(made.results, synthetic_row(i, 0.1, 0.02, shown)), range(keys)))
    storage.write_bytes(made.image, os.urandom(image_kb * 1024))
    made.part_rows = [synthetic_row(i, 0.1, 0.02, shown) for i in range(chunk_size)]
    storage.write_bytes(ResultsLayout(made.results).run(RUN_ID).part(0), part_bytes(made.part_rows))
    return made


FRESH = itertools.count(10_000_000)  # row numbers nobody claimed yet


def operation_costs(server: LatentS3, latency_ms: float, samples: int, bucket: Bucket) -> dict[str, Cost]:
    part, tag = part_bytes(bucket.part_rows), f"{latency_ms:g}ms"
    inputs = json.dumps([row.image_uri for row in bucket.part_rows]).encode()
    shown = pictures()
    claims = [synthetic_row(next(FRESH), 0.1, 0.02, shown) for _ in range(samples + 1)]  # [-1]: the warm-up's
    runs, first_part = storage.join(bucket.results, "runs", RUN_ID), ResultsLayout(bucket.results).run(RUN_ID).part(0)
    repeats = max(2, samples // 10)
    server.set_latency(latency_ms)
    try:
        return {
            "list": measure(server, lambda _: sum(1 for _ in storage.list_files(bucket.incoming)), repeats),
            "done_keys": measure(server, lambda _: ledger.done_keys(bucket.results, "v-bench"), repeats),
            "claim": measure(server, lambda n: ledger.claim(bucket.results, claims[n]), samples),
            "chunk_record": measure(server, lambda n: storage.write_bytes(
                storage.join(runs, "chunks", f"{tag}-{n}.json"), inputs), samples),
            "part_write": measure(server, lambda n: storage.write_bytes(
                storage.join(runs, "parts", f"{tag}-{n}.jsonl"), part), max(1, samples // 2)),
            "part_read": measure(server, lambda _: storage.read_bytes(first_part), max(1, samples // 2)),
            "image_read": measure(server, lambda _: storage.read_bytes(bucket.image), samples),
        }
    finally:
        server.set_latency(0)


def print_costs(base: dict[str, Cost], latent: dict[str, Cost], args: argparse.Namespace, part_kb: float) -> None:
    latency_ms, keys, chunk = args.latency_ms, args.keys, args.chunk_size
    names = {"list": f"list {keys:,} keys (storage.list_files)",
             "done_keys": f"done keys at {keys:,} (ledger.done_keys)",
             "claim": "one ledger claim (ledger.claim)", "chunk_record": f"one chunk record write ({chunk} inputs)",
             "part_write": f"one part write ({chunk} rows, {part_kb:.0f} KB)", "part_read": "one part read (report)",
             "image_read": f"one input read ({args.image_kb} KB)"}
    print(f"  {'operation':44}{'0 ms':>10}{f'{latency_ms:g} ms':>10}{'ratio':>8}{'latency':>9}"
          f"{'moto CPU':>10}{'S3-like':>10}")
    for key, label in names.items():
        zero, cost = base[key], latent[key]
        print(f"  {label:44}{ms(zero.wall):>10}{ms(cost.wall):>10}{cost.wall / zero.wall:7.1f}x"
              f"{1 - zero.wall / cost.wall:8.0%} {ms(cost.server_cpu):>10}{ms(cost.s3_like):>10}")
    print("  (latency: the share of the latent figure that the latency adds; S3-like: latent wall - moto CPU, "
          "used in (d))")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --- (b) the report at scale -------------------------------------------------------------------------


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_report(results: str) -> dict:
    """In a fresh process: read_run_rows + write_outputs of the run under ``results``; its time,
    and its peak RSS against the RSS after imports and one small report (the baseline)."""
    card = bench_card()
    warm = [synthetic_row(i, 0.5, 0.1, pictures(2)) for i in range(20)]
    reports.report_html(RunSummary(RUN_ID, card.version).tally(warm, CLASSES, 0.5), warm, card)
    baseline_kb = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here
    started = time.perf_counter()
    rows = reports.read_run_rows(results, RUN_ID, card)
    read = time.perf_counter() - started
    summary = RunSummary(RUN_ID, card.version, seconds=1.0).tally(rows, CLASSES, card.threshold)
    summary = reports.write_outputs(results, rows, card, summary)
    sizes = {name: Path(uri).stat().st_size for name, uri in summary.outputs.items()}
    return {"rows": len(rows), "flagged": summary.flagged, "rejected": summary.rejected, "read_s": read,
            "total_s": time.perf_counter() - started, "baseline_mb": baseline_kb / 1024,
            "peak_mb": status_kb("VmHWM") / 1024, "sizes": sizes}


def report_in_subprocess(count: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="scale-bench-report-") as folder:
        write_run(folder, count, args.chunk_size, args.flagged_share, args.rejected_share)
        output = subprocess.run([sys.executable, __file__, "--measure-report", folder], cwd=ROOT,
                                capture_output=True, text=True)
    if output.returncode != 0:
        sys.exit(f"report run failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def print_reports(small: dict, large: dict) -> None:
    print(f"  {'rows':>9}{'flagged':>9}{'rejected':>9}{'read s':>8}{'total s':>9}{'baseline MB':>13}{'peak MB':>9}"
          f"{'increase MB':>13}{'report.html':>13}{'predictions.csv':>17}")
    for run in (small, large):
        print(f"  {run['rows']:9,}{run['flagged']:9,}{run['rejected']:9,}{run['read_s']:8.1f}{run['total_s']:9.1f}"
              f"{run['baseline_mb']:13.0f}{run['peak_mb']:9.0f}{increase(run):13.0f}"
              f"{run['sizes']['report.html'] / MB:10.1f} MB{run['sizes']['predictions.csv'] / MB:14.1f} MB")
    rows = large["rows"] / small["rows"]
    print(f"  {large['rows']:,} / {small['rows']:,} rows ({rows:.0f}x): "
          f"time {large['total_s'] / small['total_s']:.1f}x, "
          f"peak RSS increase {increase(large) / increase(small):.1f}x, report.html "
          f"{large['sizes']['report.html'] / small['sizes']['report.html']:.2f}x "
          f"(at most {reports.MAX_FLAGGED} flagged images and {reports.MAX_REJECTED} rejected inputs shown)")


def increase(run: dict) -> float:
    return run["peak_mb"] - run["baseline_mb"]


# --- (c) throughput and (d) projection ---------------------------------------------------------


def worker_throughput(args: argparse.Namespace) -> dict[int, float]:
    """(c) The screening flow on real X-rays, fp32, in this process (key 0) and on local Dask
    clusters of 1 and 2 worker processes. Each runs twice, on half the images and on all: the
    difference is the steady rate, free of the fixed costs (cluster start, model loads), which
    are shown apart."""
    from bench.screen_bench import DEFAULT_DATA, flow_in_subprocess, link_or_copy, make_store

    sources = sorted(path for path in DEFAULT_DATA.rglob("*") if path.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not sources:
        print(f"  not measured: no X-rays under {DEFAULT_DATA} (see ../shared/data/README.md)")
        return {}
    measured = {}
    with tempfile.TemporaryDirectory() as folder:
        sizes = (args.flow_images // 2, args.flow_images)
        for size in sizes:
            for index in range(size):  # the data set again under other names when it is smaller
                source = sources[index % len(sources)]
                link_or_copy(source, Path(folder, f"in-{size}", str(index // len(sources)),
                                          source.relative_to(DEFAULT_DATA)))
        make_store(f"{folder}/models", 224)
        for workers in (0, 1, 2):
            # The best of --repeats runs a size: the steady rate is a difference of two times,
            # and a busy moment in one run would otherwise swing it.
            seconds = [min(flow_in_subprocess(f"{folder}/in-{size}", f"{folder}/results-{workers}-{size}-{repeat}",
                                              f"{folder}/models", 16, args.flow_chunk_size, engine="fp32",
                                              workers=workers or None)[0]["seconds"] for repeat in range(args.repeats))
                       for size in sizes]
            measured[workers] = (sizes[1] - sizes[0]) / (seconds[1] - seconds[0])
            fixed = seconds[1] - sizes[1] / measured[workers]
            where = f"{workers} local Dask worker process(es)" if workers else "in process (no Dask)"
            print(f"  {where:38}{sizes[0]} / {sizes[1]} images in {seconds[0]:5.1f} / {seconds[1]:5.1f} s: "
                  f"{measured[workers]:6.2f} img/s steady, {measured[workers] / measured[0]:.2f}x in process; "
                  f"fixed {fixed:4.1f} s a run")
    print(f"  2 worker processes / 1 on these {os.cpu_count()} cores: {measured[2] / measured[1]:.2f} "
          f"(the cores are shared, so about 1 is right: no oversubscription, no idle core)")
    return measured


def dask_efficiency(measured: dict[int, float]) -> float:
    """What one Dask worker keeps of the in-process throughput (cluster start, task and model
    loading overheads), applied to every worker of the projection: each has its own cores there."""
    if not measured:
        print("  Dask overhead: not measured; none assumed")
        return 1.0
    return min(1.0, measured[1] / measured[0])


@dataclass
class Night:
    """One projected night: the time of each phase (seconds) and the rates (img/s) each resource allows."""

    listing: float  # the flow, before the fan-out
    done_keys: float
    compute: float  # per worker; compute and part writes take turns inside a chunk
    claims: float  # per worker, in threads beside compute (overlapped)
    part_writes: float
    input_reads: float  # per worker, in threads that run ahead of compute (overlapped)
    report: float  # the flow, after the fan-out
    worker_img_s: float  # what one worker delivers, everything included
    ceilings: dict[str, float]

    @property
    def fan_out(self) -> float:
        return max(self.compute + self.part_writes, self.claims, self.input_reads)

    @property
    def total(self) -> float:
        return self.listing + self.done_keys + self.fan_out + self.report


def project_night(costs: dict[str, Cost], workers: int, img_s: float, args: argparse.Namespace, efficiency: float,
                  report_s_per_row: float) -> Night:
    images, per_worker = args.images, args.images / workers
    claim_s = costs["claim"].s3_like / args.claims_in_flight  # per image
    write_s = (costs["part_write"].s3_like + costs["chunk_record"].s3_like) / args.chunk_size  # per image
    read_s = costs["image_read"].s3_like / args.read_threads  # per image
    compute_s = 1 / (img_s * efficiency)
    parts = 2 * images / args.chunk_size  # parts and chunk records, read back for the report
    return Night(
        listing=images / args.keys * costs["list"].s3_like,
        done_keys=images / args.keys * costs["done_keys"].s3_like,
        compute=per_worker * compute_s, claims=per_worker * claim_s, part_writes=per_worker * write_s,
        input_reads=per_worker * read_s,
        report=parts * costs["part_read"].s3_like / reports.READ_AHEAD + images * report_s_per_row,
        worker_img_s=min(1 / (compute_s + write_s), 1 / claim_s, 1 / read_s),
        ceilings={"compute": workers * img_s * efficiency,
                  f"claims, {args.claims_in_flight} in flight a worker": workers / claim_s,
                  f"input reads, {args.read_threads} in flight a worker": workers / read_s,
                  f"S3 PUTs on the ledger's prefix ({PUT_PER_PREFIX:,}/s, one claim an image)": PUT_PER_PREFIX,
                  f"S3 GETs on the inputs' prefix ({GET_PER_PREFIX:,}/s, one read an image)": GET_PER_PREFIX},
    )


def print_night(title: str, night: Night, args: argparse.Namespace) -> None:
    rate = args.images / night.fan_out
    phases = [
        (f"listing {args.images:,} inputs (flow, one page after another)", night.listing),
        (f"done-keys listing at {args.images:,} ledger entries (flow)", night.done_keys),
        ("compute (each worker; all in parallel)", night.compute),
        (f"claims, one per image, {args.claims_in_flight} in flight beside compute (overlapped)", night.claims),
        ("chunk record + part write, one each per chunk", night.part_writes),
        (f"input reads, {args.read_threads} threads ahead of compute (overlapped)", night.input_reads),
        (f"report: parts and chunk records read {reports.READ_AHEAD} at a time, outputs built", night.report),
    ]
    print(f"  {title}")
    for label, seconds in phases:
        print(f"    {label:66}{minutes(seconds)}")
    verdict = "fits in one hour" if night.total <= NIGHT_SECONDS else "does NOT fit in one hour"
    print(f"    {'total (listings + fan-out + report)':66}{minutes(night.total)}  {verdict} "
          f"({night.total / NIGHT_SECONDS:.2f} of the hour)")
    print(f"    a worker delivers {night.worker_img_s:.1f} img/s with its claims, writes and reads; the night "
          f"{rate:,.0f} img/s")
    for name, ceiling in sorted(night.ceilings.items(), key=lambda item: item[1]):
        print(f"      ceiling {ceiling:9,.0f} img/s  {name}: the night uses {rate / ceiling:.0%}")
    print(f"    first to saturate: {min(night.ceilings, key=night.ceilings.get)}; storage (the ledger's prefix) "
          f"at about {PUT_PER_PREFIX / night.worker_img_s:,.0f} such workers")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:7.1f} min"


def print_projection(costs: dict[str, Cost], large: dict | None, args: argparse.Namespace,
                     measured: dict[int, float]) -> None:
    efficiency = dask_efficiency(measured)
    per_row = large["total_s"] / large["rows"] if large else 0.0
    report_cpu = f"{per_row * 1e6:.0f} us a row from (b)" if large else "not measured (--skip-report: counted as 0)"
    print(f"  assumptions: chunk {args.chunk_size}; S3-like costs from (a) at {args.latency_ms:g} ms; listings "
          f"linear in keys (from {args.keys:,}); S3 limits per prefix from the AWS docs ({PUT_PER_PREFIX:,} PUT/s, "
          f"{GET_PER_PREFIX:,} GET/s), the ledger one prefix, the inputs one prefix; report CPU {report_cpu}; "
          f"claims beside compute ({args.claims_in_flight} in flight); Dask overhead {1 - efficiency:.0%} (from (c)); "
          f"not included: the outputs' upload")
    print(f"  the done-keys listing covers every entry of the model version: it grows by a night's inputs each night")
    scenarios = [(f"{args.workers} two-core workers, fp32 at {args.worker_img_s:g} img/s each", args.workers,
                  args.worker_img_s),
                 (f"{args.workers} two-core workers, fast engine at {args.fast_img_s:g} img/s each", args.workers,
                  args.fast_img_s)]
    if args.gpu_img_s:
        scenarios.append((f"{args.gpu_workers} GPU workers at {args.gpu_img_s:g} img/s each", args.gpu_workers,
                          args.gpu_img_s))
    for title, workers, img_s in scenarios:
        print_night(title, project_night(costs, workers, img_s, args, efficiency, per_row), args)
    if not args.gpu_img_s:
        print(f"  {args.gpu_workers} GPU workers: not measured (give --gpu-img-s)")


# --- main --------------------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 keys, fewer samples, 2k and 20k report rows")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="injected per request (real S3: 20-50 ms)")
    parser.add_argument("--keys", type=int, help="keys listed and ledger entries (default 10,000; quick 2,000)")
    parser.add_argument("--samples", type=int, help="claims timed per latency (default 30; quick 10)")
    parser.add_argument("--report-rows", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="rows of the two report runs (default 10,000 100,000; quick 2,000 20,000)")
    parser.add_argument("--flagged-share", type=float, default=0.10)
    parser.add_argument("--rejected-share", type=float, default=0.02)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--image-kb", type=int, default=186, help="input size (median of ../shared/data/cxr: 186 KB)")
    parser.add_argument("--read-threads", type=int, default=4, help="input reads in flight a worker (screen_images)")
    parser.add_argument("--images", type=int, default=1_000_000, help="X-rays in the projected night")
    parser.add_argument("--workers", type=int, default=16, help="two-core CPU workers in the projection")
    parser.add_argument("--worker-img-s", type=float, default=10.5, help="one two-core worker, fp32 (img/s)")
    parser.add_argument("--fast-img-s", type=float, default=150.0, help="one two-core worker, fast engine (img/s)")
    parser.add_argument("--gpu-img-s", type=float, help="one GPU worker (img/s); without it: not measured")
    parser.add_argument("--gpu-workers", type=int, default=4)
    parser.add_argument("--claims-in-flight", type=int, default=CLAIMS_IN_FLIGHT,
                        help=f"claims a worker keeps in flight (tasks/screen_chunks.py: {CLAIMS_IN_FLIGHT})")
    parser.add_argument("--flow-images", type=int, help="X-rays of the larger run in (c), half in the smaller (default 480; quick 128)")
    parser.add_argument("--flow-chunk-size", type=int, default=32, help="chunk size in (c), so chunks spread")
    parser.add_argument("--skip-flow", action="store_true", help="skip (c)")
    parser.add_argument("--repeats", type=int, default=1, help="runs a size in (c), the fastest kept "
                                                                   "(more on a busy machine)")
    parser.add_argument("--skip-report", action="store_true", help="skip (b)")
    parser.add_argument("--measure-report", metavar="FOLDER", help=argparse.SUPPRESS)  # (b)'s fresh process
    args = parser.parse_args()
    args.keys = args.keys or (2000 if args.quick else 10_000)
    args.samples = args.samples or (10 if args.quick else 30)
    args.flow_images = args.flow_images or (128 if args.quick else 480)
    args.report_rows = args.report_rows or ([2000, 20_000] if args.quick else [10_000, 100_000])
    return args


def main() -> None:
    args = parse_arguments()
    if args.measure_report:
        print(json.dumps(measure_report(args.measure_report)))
        return
    print(cpu_line())
    started = time.perf_counter()
    print(f"\n(a) per operation through store/storage.py and screening/ledger.py, moto S3 over HTTP on 127.0.0.1, "
          f"mean of {args.samples} claims and writes, {max(2, args.samples // 10)} listings")
    with LatentS3() as server:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        bucket = populate("s3://bench", args.keys, args.chunk_size, args.image_kb)
        base = operation_costs(server, 0, args.samples, bucket)
        latent = operation_costs(server, args.latency_ms, args.samples, bucket)
    print_costs(base, latent, args, len(part_bytes(bucket.part_rows)) / 1024)

    large = None
    if not args.skip_report:
        small_rows, large_rows = args.report_rows
        print(f"\n(b) report from a run's parts on a local folder ({args.flagged_share:.0%} flagged with pictures, "
              f"{args.rejected_share:.0%} rejected), read_run_rows + write_outputs in a fresh process")
        small = report_in_subprocess(small_rows, args)
        large = report_in_subprocess(large_rows, args)
        print_reports(small, large)

    measured = {}
    if not args.skip_flow:
        print(f"\n(c) screening throughput, {args.flow_images // 2} and {args.flow_images} real X-rays, fp32, untrained 224 px VGG16, "
              f"chunks of {args.flow_chunk_size}, no Grad-CAM")
        measured = worker_throughput(args)

    print(f"\n(d) projection: {args.images:,} X-rays in one night")
    print_projection(latent, large, args, measured)
    print(f"\nbench took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
