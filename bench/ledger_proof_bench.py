"""What the ledger as proof costs a night (issue #22): before, an input counted as screened when the
ledger listing had its name (one listing, no reads); now its entry is read back (``ledger.READERS``
at a time) and the run it names must be open or publish its row (one read of that run's
predictions.jsonl). The first night pays this for every already-screened input the incoming listing
holds; what it proved is remembered with each entry's listing stamp, so later nights read only new
or changed entries.

Against bench/scale_bench.py's moto S3 server (its own process, a latency injected per request):
--entries ledger entries of one published run, checked as the screen flow checks them.

    .venv/bin/python bench/ledger_proof_bench.py                       # 3,000 entries, at 0 and 32 ms
    .venv/bin/python bench/ledger_proof_bench.py --entries 10000 --latency-ms 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_line
from bench.scale_bench import LatentS3  # bootstraps first: TensorFlow's options before it loads
from screening import ledger
from screening.results import PredictionRow, ResultsLayout, entry_key
from store import storage

CLASSES = ["normal", "covid"]
RUN_ID = "20261201T010000Z-bench0"


def populate(results: str, entries: int) -> list[str]:
    """``entries`` claimed rows of one published run; returns their inputs."""
    inputs = [f"s3://pacs/incoming/day-{i % 30}/image-{i:07d}.png" for i in range(entries)]
    rows = [PredictionRow(uri, "0" * 64, "ok", "", "v1", "normal", {"normal": 0.7, "covid": 0.3}, False,
                          "2026-12-01T01:00:00+00:00", RUN_ID) for uri in inputs]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda row: ledger.claim(results, row), rows))
    outputs = ResultsLayout(results).run(RUN_ID).outputs
    storage.write_bytes(outputs["predictions.jsonl"], b"".join(json.dumps(row.to_record()).encode() + b"\n"
                                                               for row in rows))
    storage.write_bytes(outputs["summary.json"], json.dumps({"run_id": RUN_ID, "model_version": "v1"}).encode())
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=3000, help="already-screened inputs in the incoming listing")
    parser.add_argument("--latency-ms", type=float, action="append", help="injected per request (default: 0 and 32)")
    args = parser.parse_args()
    print(cpu_line())
    with LatentS3() as server:
        for latency, bucket in server.fresh_buckets("proof", args.latency_ms):
            results = f"s3://{bucket}/results"
            inputs = populate(results, args.entries)
            server.set_latency(latency)
            try:
                started = time.perf_counter()
                done = ledger.done_keys(results, "v1")
                listed = [uri for uri in inputs if entry_key(uri) in done]
                before = time.perf_counter() - started
                nights = []
                for _ in range(2):  # the first night reads every entry; the second remembers their proofs
                    started = time.perf_counter()
                    stamps = ledger.stamped_keys(results, "v1")
                    listed = [uri for uri in inputs if entry_key(uri) in stamps]
                    proven, unproven = ledger.screened(results, "v1", listed, CLASSES, stamps=stamps)
                    nights.append(time.perf_counter() - started)
                    assert len(proven) == args.entries and not unproven, (len(proven), unproven)
            finally:
                server.set_latency(0)
            print(f"{args.entries:,} already-screened inputs, {latency:g} ms a request:")
            print(f"  before (the listing's names):                                 {before:7.2f} s")
            print(f"  first night (listing, every entry read {ledger.READERS} at a time, the run's rows): "
                  f"{nights[0]:7.2f} s  ({nights[0] / before:.1f}x before)")
            print(f"  later nights (listing with stamps, proofs remembered):          {nights[1]:7.2f} s  "
                  f"({nights[1] / before:.1f}x before)")


if __name__ == "__main__":
    main()
