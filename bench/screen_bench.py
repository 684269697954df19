"""Screening throughput and memory, all in one run on the same images and model:

1. ceiling: the bare model forward pass on pre-decoded tensors (img/s), with the settings the
   product runs with (TensorFlow's oneDNN kernels on, see model/__init__.py);
2. naive baseline: per image, cv2.imread + preprocess + model.predict (img/s), in its own process,
   once with oneDNN off and once with it on (TensorFlow's default depends on the CPU). Per-image
   predict can be slower with oneDNN on, so the baseline is the faster of the two: the flow gets
   no credit for a setting that only hurts the baseline;
3. the screening flow end to end, in its own process (img/s and peak RSS);
4. the flow again on N times the inputs (the same files linked under other names): peak RSS.

Targets: the flow reaches at least 85% of the ceiling and 1.7x the naive baseline; peak RSS on
10x the inputs grows by under 20%.

    .venv/bin/python bench/screen_bench.py                   # ../shared/data/cxr, 224 px, weights none
    .venv/bin/python bench/screen_bench.py --repeat 0        # skip the (long) 10x run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine starts slowly
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tasks  # noqa: E402,F401  (first: through model/ it sets TensorFlow's runtime options before TensorFlow loads)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from model.bundle import ModelCard, model_to_bytes  # noqa: E402
from model.network import build_classifier  # noqa: E402
from model.preprocessing import Preprocessing, preprocess  # noqa: E402
from tasks import registry  # noqa: E402
from tasks.images import IMAGE_SUFFIXES, decode_image  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"


def make_store(store: str, input_size: int) -> keras.Model:
    """An untrained 224 px model (weights none) registered as production: speed does not depend on training."""
    keras.utils.set_random_seed(0)
    model = build_classifier(2, input_size, None)
    data = model_to_bytes(model)
    card = ModelCard(version="v-bench", classes=["non-covid", "covid"], positive_class="covid", threshold=0.5,
                     preprocessing=Preprocessing(input_size=input_size).to_dict(), weights={"origin": "none"},
                     dataset={}, metrics={}, model_sha256=hashlib.sha256(data).hexdigest())
    registry.publish(store, card.version, {"model.keras": data}, card)
    registry.set_production(store, card.version, "benchmark")
    return model


NAIVE_LOOP = """
import sys, time
from pathlib import Path
import cv2
from model.preprocessing import preprocess
from tasks import registry
from tasks.images import IMAGE_SUFFIXES
model, card = registry.load_model(sys.argv[1], "v-bench")
spec = card.spec()
paths = sorted(p for p in Path(sys.argv[2]).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
def one(path):
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return model.predict(preprocess(image, spec)[None], verbose=0)
one(paths[0])  # warm-up: traces predict, which the naive loop pays once, not per image
started = time.perf_counter()
for path in paths:
    one(path)
print("NAIVE", len(paths) / (time.perf_counter() - started))
"""


def naive_in_subprocess(store: str, data: str, onednn: str) -> float:
    """The tutorial's loop, one image at a time, in a fresh process with oneDNN set to ``onednn``."""
    output = subprocess.run([sys.executable, "-c", NAIVE_LOOP, store, data], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn})
    if output.returncode != 0:
        sys.exit(f"naive loop failed:\n{output.stderr[-3000:]}")
    return float(next(line for line in output.stdout.splitlines() if line.startswith("NAIVE ")).split()[1])


def flow_in_subprocess(incoming: str, results: str, store: str, batch_size: int, chunk_size: int) -> tuple[dict, float]:
    """Runs the flow in a fresh process; returns its summary and that process's peak RSS in MiB."""
    code = ("import json, sys; from flows.screen import screen; from flows.parameters import ScreenParameters; "
            "s = screen(ScreenParameters(incoming_uri=sys.argv[1], results_uri=sys.argv[2], model_store_uri=sys.argv[3], "
            "batch_size=int(sys.argv[4]), chunk_size=int(sys.argv[5]))); "
            "print('SUMMARY ' + json.dumps(s.to_dict()))")
    script = "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); " \
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    # The wrapper measures only the flow process (and the server it starts, if larger; it is not).
    output = subprocess.run(
        [sys.executable, "-c", script, sys.executable, "-c", code, incoming, results, store, str(batch_size), str(chunk_size)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PREFECT_HOME": tempfile.mkdtemp()},
    )
    if output.returncode != 0:
        sys.exit(f"flow failed:\n{output.stdout[-3000:]}\n{output.stderr[-3000:]}")
    summary = json.loads(next(line for line in output.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
    peak_kb = int(next(line for line in output.stdout.splitlines() if line.startswith("PEAK_KB")).split()[1])
    return summary, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10, help="inputs multiplier for the memory run (0: skip)")
    parser.add_argument("--memory-only", action="store_true", help="skip the ceiling and the naive loop")
    args = parser.parse_args()
    paths = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"no images under {args.data} (see ../shared/data/README.md)")
    spec = Preprocessing(input_size=args.input_size)
    work = Path(tempfile.mkdtemp(prefix="screen-bench-"))
    store = str(work / "models")
    model = make_store(store, args.input_size)
    print(f"{len(paths)} images from {args.data}; model {args.input_size} px, weights none; "
          f"batch {args.batch_size}, chunk {args.chunk_size}; {os.cpu_count()} CPUs")

    ceiling = naive = None
    if not args.memory_only:
        # 1. ceiling: decoded and preprocessed beforehand, only the forward pass is timed.
        tensors = np.stack([preprocess(decode_image(p.read_bytes(), str(p)), spec) for p in paths])
        model.predict_on_batch(tensors[: args.batch_size])  # warm-up: builds the compiled predict function
        started = time.perf_counter()
        for start in range(0, len(tensors), args.batch_size):
            model.predict_on_batch(tensors[start : start + args.batch_size])
        ceiling = len(tensors) / (time.perf_counter() - started)
        del tensors
        print(f"  ceiling   {ceiling:7.2f} img/s (oneDNN {'on' if os.environ['TF_ENABLE_ONEDNN_OPTS'] == '1' else 'off'})")

        # 2. naive: the tutorial's loop, in fresh processes, with oneDNN off and on; the faster is the baseline.
        naive_by_setting = {}
        for onednn, label in (("0", "oneDNN off"), ("1", "oneDNN on")):
            naive_by_setting[label] = naive_in_subprocess(store, args.data, onednn)
            print(f"  naive     {naive_by_setting[label]:7.2f} img/s ({label})")
        naive = max(naive_by_setting.values())

    # 3. the flow, end to end, in its own process.
    incoming = work / "incoming"
    for index, path in enumerate(paths):
        link = incoming / f"{index:05d}{path.suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    summary, peak = flow_in_subprocess(str(incoming), str(work / "results"), store, args.batch_size, args.chunk_size)
    flow = summary["screened"] / summary["seconds"]
    print(f"  flow      {flow:7.2f} img/s end to end ({summary['screened']} images in {summary['seconds']:.1f} s), "
          f"peak RSS {peak:.0f} MiB")

    if ceiling and naive:
        print()
        print(f"flow / ceiling = {flow / ceiling:.2f} (target >= 0.85): {'met' if flow / ceiling >= 0.85 else 'NOT met'}")
        print(f"flow / naive   = {flow / naive:.2f} (target >= 1.7, against the faster naive loop): {'met' if flow / naive >= 1.7 else 'NOT met'}")

    if args.repeat > 1:
        many = work / f"incoming-x{args.repeat}"
        for copy in range(args.repeat):
            for index, path in enumerate(paths):
                link = many / f"copy-{copy:02d}" / f"{index:05d}{path.suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path)
        summary_many, peak_many = flow_in_subprocess(str(many), str(work / "results-many"), store,
                                                     args.batch_size, args.chunk_size)
        growth = peak_many / peak - 1
        print(f"x{args.repeat} inputs: {summary_many['screened']} images at "
              f"{summary_many['screened'] / summary_many['seconds']:.2f} img/s, peak RSS {peak_many:.0f} MiB vs "
              f"{peak:.0f} MiB: {growth:+.1%} (target < +20%): {'met' if growth < 0.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
