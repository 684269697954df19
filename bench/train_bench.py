"""Stage-1 epoch time: naive frozen training vs training the head on cached base features.

Both run in this one process on the same images, split, seed and configuration, so their times
are comparable. Prints the per-epoch times, the ratio (target: cached epochs after the first at
least 10x faster) and both models' test metrics.

    .venv/bin/python bench/train_bench.py                    # ../shared/data/cxr, 224 px, weights none
    .venv/bin/python bench/train_bench.py --input-size 64    # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import bootstrap  # noqa: E402

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import keras  # noqa: E402
import numpy as np  # noqa: E402

from model.evaluation import evaluate  # noqa: E402
from model.network import build_classifier  # noqa: E402
from model.preprocessing import Preprocessing  # noqa: E402
from model.training import (  # noqa: E402
    TrainingConfig,
    TrainingData,
    fit_head_cached,
    fit_naive_frozen,
    predict_probabilities,
)
from store.datasets import discover_dataset, training_parts  # noqa: E402
from store.loading import load_images  # noqa: E402
from tasks.train_data import class_layout  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


class EpochTimer(keras.callbacks.Callback):
    def __init__(self, started: float) -> None:
        super().__init__()
        self.started, self.ends = started, []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())

    def durations(self) -> list[float]:
        edges = [self.started, *self.ends]
        return [b - a for a, b in zip(edges, edges[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--augment-draws", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.data).is_dir() and "://" not in args.data:
        sys.exit(f"no data at {args.data} (see ../shared/data/README.md)")

    spec = Preprocessing(input_size=args.input_size)
    dataset = discover_dataset(args.data)
    loaded = [image for image in load_images([item.uri for item in dataset.items], spec) if image.pixels is not None]
    pixels = {image.uri: image.pixels for image in loaded}
    items = tuple(item for item in dataset.items if item.uri in pixels)
    classes, labels = class_layout(items, "covid", multiclass=False)
    parts = training_parts(items, 0.2, args.seed)  # the train flow's own split
    position = {item.uri: i for i, item in enumerate(items)}
    images = np.stack([pixels[item.uri] for item in items])

    def rows(part):
        return np.array([position[item.uri] for item in part])

    train_rows, val_rows, test_rows = rows(parts.train), rows(parts.validation), rows(parts.test)
    data = TrainingData(images[train_rows], labels[train_rows], images[val_rows], labels[val_rows], len(classes))
    # Patience above the epoch count: both paths run every epoch, so their times compare.
    config = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, augment_draws=args.augment_draws,
                            seed=args.seed, patience=args.epochs + 1)
    print(f"{len(items)} images at {spec.input_size} px: {len(train_rows)} train, {len(val_rows)} validation, "
          f"{len(test_rows)} test; {args.epochs} epochs, {args.augment_draws} augmentation draws, weights none")

    results = {}
    for name, fit in (("naive", fit_naive_frozen), ("cached", fit_head_cached)):
        keras.utils.set_random_seed(args.seed)
        model = build_classifier(len(classes), spec.input_size, None, seed=args.seed, head="mlp")
        started = time.perf_counter()
        timer = EpochTimer(started)
        fit(model, data, spec, config, [timer])
        total = time.perf_counter() - started
        probabilities = predict_probabilities(model, images[test_rows], spec)
        metrics = evaluate(labels[test_rows], probabilities, classes, "covid", 0.5)
        results[name] = (timer.durations(), total, metrics)
        print(f"  {name:6s} done in {total:.1f} s")

    naive_epochs, _, naive_metrics = results["naive"]
    cached_epochs, _, cached_metrics = results["cached"]
    naive_later = float(np.mean(naive_epochs[1:] or naive_epochs))
    cached_later = float(np.mean(cached_epochs[1:] or cached_epochs))
    print()
    print(f"{'':34s}{'naive':>12s}{'cached':>12s}{'ratio':>10s}")
    print(f"{'epoch 1 (cached: + feature cache)':34s}{naive_epochs[0]:11.2f}s{cached_epochs[0]:11.2f}s"
          f"{naive_epochs[0] / cached_epochs[0]:9.2f}x")
    print(f"{'epochs after the first, mean':34s}{naive_later:11.2f}s{cached_later:11.3f}s"
          f"{naive_later / cached_later:9.1f}x")
    print(f"{'all epochs':34s}{sum(naive_epochs):11.2f}s{sum(cached_epochs):11.2f}s"
          f"{sum(naive_epochs) / sum(cached_epochs):9.2f}x")
    for name, metrics in (("naive", naive_metrics), ("cached", cached_metrics)):
        auc = metrics["positive"]["auc"]
        print(f"test metrics, {name:6s}: accuracy {metrics['accuracy']:.3f}, covid AUC "
              f"{'n/a' if auc is None else f'{auc:.3f}'}, covid sensitivity {metrics['per_class']['covid']['sensitivity']:.3f}, "
              f"specificity {metrics['per_class']['covid']['specificity']:.3f}")
    target = naive_later / cached_later >= 10
    print(f"target (cached epochs after the first >= 10x faster): {'met' if target else 'NOT met'}")


if __name__ == "__main__":
    main()
