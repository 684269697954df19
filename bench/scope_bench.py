"""Does the scope gate tell chest X-rays from what is not one, and what does it cost?

The real X-rays of ../shared/data/cxr are split by patient (80/20, --seed). On the training part:
the orientation template (model.scope.fit_template) and, with --model-store, the feature score
(model.scope.fit_scope on the pooled block5 features of that store's latest model). Then the
held-out real X-rays and an out-of-scope set (store.out_of_scope: --per-kind of each kind, its
transformed X-rays made from the held-out patients' images) go through the gate as screening sees
them (decoded and resized by store.loading). Printed: the pixel statistics of each group against
the gate's bounds, the false-rejection rate on real X-rays and the rejection rate per kind, each
with a 95 % Wilson interval, the reasons given, and the gate's time per image against the forward
pass's.

    .venv/bin/python bench/scope_bench.py
    .venv/bin/python bench/scope_bench.py --model-store /tmp/models --per-kind 40
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cxr-bench-prefect-"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import bootstrap

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import cv2
import numpy as np

from bench.machine import cpu_line
from model import scope
from model.preprocessing import Preprocessing
from store.loading import load_images
from store.out_of_scope import KINDS, write_out_of_scope_set
from tasks.scope_fitting import rate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def shown(hits: int, total: int) -> str:
    figures = rate(hits, total)
    return "n/a" if not total else f"{figures['rate']:.3f} [{figures['low']:.3f}, {figures['high']:.3f}] ({hits}/{total})"


def statistics(pixels: np.ndarray, template: np.ndarray) -> dict[str, float]:
    grey = pixels.mean(axis=2)
    matches = scope.template_matches(scope.thumbnail(pixels), template)
    best_other = max(value for name, value in matches.items() if name != "as is")
    return {"colourfulness": scope.colourfulness(pixels), "spread": float(grey.std()),
            "neighbours": scope.neighbour_correlation(grey), "match": matches["as is"],
            "other orientation - as is": best_other - matches["as is"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model-store", default=None, help="adds the feature score of this store's latest model")
    parser.add_argument("--input-size", type=int, default=224, help="without --model-store")
    parser.add_argument("--per-kind", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "manifest.csv").exists():
        sys.exit(f"no manifest.csv under {data} (see ../shared/data/README.md)")
    print(cpu_line())
    rows = list(csv.DictReader((data / "manifest.csv").open()))
    paths = [str(data / row["file"]) for row in rows]
    patients = np.array([row["patient_id"] for row in rows])
    rng = np.random.default_rng(args.seed)
    unique = np.unique(patients)
    held_out = set(rng.choice(unique, len(unique) // 5, replace=False))
    test = np.array([patient in held_out for patient in patients])

    model = card = None
    if args.model_store:
        from store import registry

        model, card = registry.load_model(args.model_store, registry.load_card(args.model_store).version)
    spec = card.spec() if card else Preprocessing(input_size=args.input_size)
    real = np.stack([item.pixels for item in load_images(paths, spec)])
    work = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    xrays = [cv2.imread(path, cv2.IMREAD_GRAYSCALE) for path, held in zip(paths, test) if held]
    write_out_of_scope_set(str(work), args.per_kind, xrays, size=512, seed=args.seed)
    kinds = [kind for kind in KINDS for _ in range(args.per_kind)]
    other_paths = [str(work / kind.replace(" ", "-") / f"{index:04d}.png") for kind in KINDS
                   for index in range(args.per_kind)]
    loaded = load_images(other_paths, spec)
    refused = [kind for kind, item in zip(kinds, loaded) if item.pixels is None]  # e.g. a flat image: the loader
    kinds = [kind for kind, item in zip(kinds, loaded) if item.pixels is not None]
    other = np.stack([item.pixels for item in loaded if item.pixels is not None])
    print(f"{len(real)} real X-rays ({int(test.sum())} of held-out patients), {len(other)} out of scope "
          f"({args.per_kind} per kind), {spec.input_size} px")

    layout = scope.fit_layout(real[~test])
    template, min_match = layout[0], layout[1]
    groups = {"real (held out)": real[test]} | {kind: other[[k == kind for k in kinds]] for kind in KINDS}
    if refused:
        print(f"refused by the loader before any check: {dict(collections.Counter(refused))}")
    print("\npixel statistics, 1st / 50th / 99th percentile (bounds: colourfulness <= "
          f"{scope.MAX_COLOURFULNESS}, spread >= {scope.MIN_SPREAD}, neighbours >= {scope.MIN_NEIGHBOUR_CORRELATION}, "
          f"other orientation - as is <= {scope.ORIENTATION_MARGIN}, match >= {min_match:.2f} fitted, named orientation or part >= {layout[2]:.2f})")
    for name, images in groups.items():
        figures = [statistics(image, template) for image in images]
        line = "  ".join(f"{key} {np.percentile(values, 1):.2f}/{np.percentile(values, 50):.2f}/"
                         f"{np.percentile(values, 99):.2f}" for key in figures[0]
                         for values in [[figure[key] for figure in figures]])
        print(f"  {name:<16} {line}")

    started = time.perf_counter()
    pixel_reasons = [scope.pixel_reason(image, layout) for image in np.concatenate([real[test], other])]
    pixel_seconds = (time.perf_counter() - started) / len(pixel_reasons)
    features_out = np.zeros(len(pixel_reasons), bool)
    forward_seconds = score_seconds = None
    if model is not None:
        from tasks.scope_fitting import features_of

        def features(images: np.ndarray) -> np.ndarray:
            return features_of(model, spec, images)

        features(real[:32])  # compiles the graph outside the timing
        started = time.perf_counter()
        train_features = features(real[~test])
        forward_seconds = (time.perf_counter() - started) / int((~test).sum())
        fitted = scope.fit_scope(train_features, patients[~test])
        checked = features(np.concatenate([real[test], other]))
        started = time.perf_counter()
        features_out = ~fitted.in_scope(checked)
        score_seconds = (time.perf_counter() - started) / len(checked)
        print(f"\nfeature score: threshold {fitted.threshold:.1f} (pass rate {fitted.pass_rate}, "
              f"{fitted.calibration_images} out-of-fold scores)")
    reasons = [reason or ("features" if out else None) for reason, out in zip(pixel_reasons, features_out)]
    reasons += ["loader"] * len(refused)
    names = ["real (held out)"] * int(test.sum()) + kinds + refused
    print("\nrejected (rate [95 % Wilson interval]) and the reasons given")
    for name in groups:
        given = [reason for reason, named in zip(reasons, names) if named == name]
        rejected = sum(reason is not None for reason in given)
        counted = collections.Counter(reason for reason in given if reason)
        print(f"  {name:<16} {shown(rejected, len(given))}  {dict(counted.most_common())}")
    print(f"\ngate per image: pixel checks {1000 * pixel_seconds:.2f} ms"
          + (f", feature score {1000 * score_seconds:.3f} ms; the forward pass {1000 * forward_seconds:.0f} ms "
             f"(share of the two: {(pixel_seconds + score_seconds) / forward_seconds:.1%})" if forward_seconds else ""))


if __name__ == "__main__":
    main()
