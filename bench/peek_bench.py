"""Finding inputs among keys without an image's name (issue #22 item 6): each such key is peeked into
(a 132-byte ranged GET) for a DICOM preamble. Before: one at a time, every night, for ever (such a key
gets no row, so nothing remembered it). Now: ``PEEKS_IN_FLIGHT`` at a time, and what a peek found is
remembered under the results with the key's ETag, so a night peeks only into new or changed keys.

Against bench/scale_bench.py's moto S3 server (its own process, a latency injected per request):
``find_inputs`` over --keys such keys (and a few images and suffix-less DICOMs), timed as before
(one peek at a time, nothing remembered), on the first night (nothing remembered yet), the second
(nothing changed) and a night after 1% of the keys changed.

    .venv/bin/python bench/peek_bench.py                     # 1,500 keys, at 0 and 32 ms
    .venv/bin/python bench/peek_bench.py --keys 5000 --latency-ms 32
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_line
from bench.scale_bench import LatentS3  # bootstraps first: TensorFlow's options before it loads
from store import storage
from tasks import screen_chunks

DICOM = bytes(128) + b"DICM" + bytes(64)


def night(incoming: str, results: str | None, peeks_in_flight: int) -> tuple[float, int]:
    saved = screen_chunks.PEEKS_IN_FLIGHT
    screen_chunks.PEEKS_IN_FLIGHT = peeks_in_flight
    try:
        started = time.perf_counter()
        found = screen_chunks.find_inputs.fn(incoming, exclude=[results] if results else [], results_uri=results)
        return time.perf_counter() - started, len(found)
    finally:
        screen_chunks.PEEKS_IN_FLIGHT = saved


def populate(incoming: str, keys: int) -> list[str]:
    """``keys`` plain-text keys without an image's name, 10 suffix-less DICOMs and 10 images."""
    names = [f"exports/day-{i % 7}/report-{i:06d}" for i in range(keys)]
    files = {**{name: b"plain text " * 8 for name in names}, **{f"pacs/1.2.840.{i}": DICOM for i in range(10)},
             **{f"img-{i}.png": b"x" for i in range(10)}}
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda item: storage.write_bytes(storage.join(incoming, item[0]), item[1]), files.items()))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1500, help="keys without an image's name")
    parser.add_argument("--latency-ms", type=float, action="append", help="injected per request (default: 0 and 32)")
    args = parser.parse_args()
    print(cpu_line())
    with LatentS3() as server:
        for latency, bucket in server.fresh_buckets("peek", args.latency_ms):
            incoming, results = f"s3://{bucket}/incoming", f"s3://{bucket}/results"
            names = populate(incoming, args.keys)
            sum(1 for _ in storage.list_files(incoming))  # warm: the client made, connections open
            server.set_latency(latency)
            try:
                before, found = night(incoming, None, 1)
                first, found_first = night(incoming, results, screen_chunks.PEEKS_IN_FLIGHT)
                second, found_second = night(incoming, results, screen_chunks.PEEKS_IN_FLIGHT)
                changed = names[:: 100]
                server.set_latency(0)
                for name in changed:
                    storage.write_bytes(storage.join(incoming, name), b"changed text")
                server.set_latency(latency)
                third, found_third = night(incoming, results, screen_chunks.PEEKS_IN_FLIGHT)
            finally:
                server.set_latency(0)
            assert found == found_first == found_second == found_third == 20, (found, found_first, found_second)
            print(f"{args.keys:,} keys without an image's name (+10 DICOM, +10 images), {latency:g} ms a request:")
            print(f"  before (one peek at a time, nothing remembered): {before:7.2f} s, every night")
            print(f"  first night ({screen_chunks.PEEKS_IN_FLIGHT} peeks in flight, nothing remembered yet): "
                  f"{first:7.2f} s")
            print(f"  second night (nothing changed):                    {second:7.2f} s")
            print(f"  a night after {len(changed)} keys changed:                   {third:7.2f} s")


if __name__ == "__main__":
    main()
