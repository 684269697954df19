"""What do explanations cost a night? Screening with Grad-CAM from the engine's own forward pass
against Grad-CAM from a float32 pass of its own (what every engine did before, and what still runs
for an engine whose explanations have not passed their gate), and against no explanations at all.

Trains a bundle with the train flow on ../shared/data/cxr (weights none; --input-size, default
224; its engines checked on its test split as always), then screens --images real X-rays in this
process with tasks.screen_chunks.screen_images (decoding, prediction, explanations, thumbnails and
maps for the part files: everything but storage) for each engine, three ways:

  none      --explain none
  forward   --explain all, maps from the engine's own forward pass
  float32   --explain all, maps from a float32 forward pass of their own

`all` is the worst case: a screener tuned for 95 % sensitivity flags a large share of what it sees
(the issue measured 228 of 248). Each figure is the best of --repeats runs after a warm-up.

    .venv/bin/python bench/explain_bench.py
    .venv/bin/python bench/explain_bench.py --input-size 128 --images 128 --epochs 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cxr-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import bootstrap

bootstrap()  # first: TensorFlow's runtime options are read when it loads

from bench.machine import cpu_line
from imaging.decode import IMAGE_SUFFIXES
from model.inference import ENGINES, make_predictor
from store import engines, registry
from tasks.screen_chunks import LoadedModel, screen_images

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def rate(uris: list[str], loaded: LoadedModel, batch_size: int, explain: str, repeats: int) -> tuple[float, int]:
    best, explained = 0.0, 0
    for attempt in range(repeats + 1):  # the first run warms up (compiles the graphs)
        started = time.perf_counter()
        rows = list(screen_images(uris, loaded, batch_size, explain=explain))
        seconds = time.perf_counter() - started
        explained = sum(1 for row in rows if getattr(row, "cam", None))
        if attempt:
            best = max(best, len(uris) / seconds)
    return best, explained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real chest X-rays not found at {DATA} (see ../shared/data/README.md)")
    from flows.parameters import TrainParameters
    from flows.train import train

    print(cpu_line())
    uris = sorted(str(path) for path in DATA.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)[: args.images]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        trained = train(TrainParameters(dataset_uri=str(DATA), model_store_uri=folder, input_size=args.input_size,
                                        weights="none", epochs=args.epochs, force_promote=True))
        print(f"bundle {trained.version}: {args.input_size} px, weights none, {args.epochs} epochs, trained in "
              f"{time.perf_counter() - started:.0f} s; {len(uris)} images, batch {args.batch_size}\n")
        model, card = registry.load_model(folder, trained.version)
        allowed, notes = engines.validated_engines(folder, card)
        print(f"may serve it: {', '.join(allowed)}{f' ({notes})' if notes else ''}\n")
        print(f"{'engine':<6} {'none':>8} {'forward':>8} {'float32':>8}   forward/none  forward/float32")
        for engine in ENGINES:
            try:
                predictor = make_predictor(model, card.spec(), engine, engines.load_artifacts(folder, card, engine))
            except Exception as error:  # noqa: BLE001 - a bench shows what it could not run
                print(f"{engine:<6} not measured: {error}")
                continue
            speeds = {}
            for name, explain, from_forward in (("none", "none", True), ("forward", "all", True),
                                                ("float32", "all", False)):
                loaded = LoadedModel(card, predictor, model, name, explains_from_forward=from_forward)
                speeds[name], explained = rate(uris, loaded, args.batch_size, explain, args.repeats)
                assert explain == "none" or explained == len(uris), (name, explained)
            print(f"{engine:<6} {speeds['none']:>8.2f} {speeds['forward']:>8.2f} {speeds['float32']:>8.2f}   "
                  f"{speeds['forward'] / speeds['none']:>12.2f}  {speeds['forward'] / speeds['float32']:>15.2f}",
                  flush=True)
    print("\nimg/s, best of", args.repeats, "after a warm-up; decoding, prediction, explanations, thumbnails, maps")


if __name__ == "__main__":
    main()
