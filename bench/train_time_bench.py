"""Time of the default ``train`` before and after the fast engines, in one run on the same data.

"Before": stage 1's base features computed in fp32, as before the engines existed (forced by a
feature tolerance of 0, so bf16 never agrees). "After": as shipped (``choose_feature_base`` takes
bf16 where its features agree with fp32's and it is faster here). Each run is the whole train flow
with its defaults (weights none: ImageNet weights cannot be fetched here), including the engine
checks of the new bundle, so "after" also pays for quantising int8. Both runs use one seed and
split; the test AUCs show what the faster features cost.

    .venv/bin/python bench/train_time_bench.py                  # ../shared/data/cxr
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import bootstrap  # noqa: E402

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import model.inference as inference  # noqa: E402
from bench.machine import cpu_line  # noqa: E402
from flows.parameters import TrainParameters  # noqa: E402
from flows.train import train  # noqa: E402
from model.bundle import ModelCard  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"


def timed_train(data: str, store: str, fine_tune_epochs: int = 0) -> tuple[float, ModelCard]:
    started = time.perf_counter()
    trained = train(TrainParameters(dataset_uri=data, model_store_uri=store, weights="none",
                                    fine_tune_epochs=fine_tune_epochs))
    return time.perf_counter() - started, trained.card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--fine-tune-epochs", type=int, default=0,
                        help="stage 2 epochs in both runs (0, the default train: none); stage 2 follows stage 1's "
                             "choice, so 'before' fine-tunes in float32 and 'after' under mixed_bfloat16 where chosen")
    args = parser.parse_args()
    print(cpu_line())
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        shipped = inference.FEATURE_TOLERANCE
        for label, tolerance in (("before (fp32 features)", 0.0), ("after (as shipped)", shipped)):
            inference.FEATURE_TOLERANCE = tolerance
            results[label] = timed_train(args.data, str(Path(scratch) / label.split()[0]), args.fine_tune_epochs)
        inference.FEATURE_TOLERANCE = shipped
    stage2 = f", {args.fine_tune_epochs} fine-tuning epochs" if args.fine_tune_epochs else ""
    print(f"\ndefault train on {args.data} (weights none{stage2}):")
    for label, (seconds, card) in results.items():
        features = card.training["features_engine"]
        print(f"  {label:24} {seconds:7.0f} s; stage 1 features by {features['engine']} "
              f"({features['images_per_second']} img/s); stage 2 {features.get('fine_tune_policy', 'not run')}; "
              f"test AUC {card.metrics['positive']['auc']:.3f}")
    before, after = (seconds for seconds, _ in results.values())
    print(f"  after / before = {after / before:.2f}")


if __name__ == "__main__":
    main()
