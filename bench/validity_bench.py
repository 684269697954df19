"""Is the default model at least as good as a plain logistic regression on its own features?

On ../shared/data/cxr, for each input size and split seed, with the same frozen base (He-initialised
from --base-seed, weights none: ImageNet weights cannot be had here):

  default   what `cxr-screen train` does with its defaults: the linear head chosen by patient-grouped
            cross-validation over the training images (weighting, C), calibrated and thresholded on
            out-of-fold predictions (tasks/train_fit.fit_model)
  baseline  the built-in baseline: the best plain-feature logistic regression of the same search
            (with the default's candidates, the same model: the difference shows 0 by construction)
  aug-head  `--augment-head`: augmented copies of the training images join the candidates

Both are scored on the same patient-held-out test split: AUC, mean within-stratum AUC (age_group,
source_dataset, view) and the adults-only AUC, with 95 % patient-bootstrap intervals; sensitivity,
specificity, share of non-COVID-19 images flagged and ECE at the threshold; the acceptance
verdict; and the paired difference default - baseline (patient bootstrap on each split, mean over
seeds). Target: the default's AUC and mean within-stratum AUC at least the baseline's.

The features are computed once per size (plain and 3 augmentation draws, as training does) and
cached under --cache; the selection, calibration and threshold are the flow's own functions.
`--flow` also runs the real train flow on one seed to show the figures agree.

    .venv/bin/python bench/validity_bench.py                     # 64 and 224 px, seeds 0-2
    .venv/bin/python bench/validity_bench.py --sizes 64 --flow   # quick, with the flow beside it
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cxr-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import bootstrap  # noqa: E402

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import numpy as np  # noqa: E402

from bench.machine import cpu_line  # noqa: E402
from model.acceptance import Acceptance, judge  # noqa: E402
from model.augmentation import Augmentation, build_augmentation  # noqa: E402
from model.calibration import (  # noqa: E402
    apply_temperature_and_bias,
    expected_calibration_error,
    fit_temperature_and_bias,
)
from model.evaluation import auc, choose_threshold, flags  # noqa: E402
from model.linear_head import fit_selected, select_logistic_head  # noqa: E402
from model.network import build_base  # noqa: E402
from model.preprocessing import Preprocessing  # noqa: E402
from model.training import TrainingConfig, extract_features  # noqa: E402
from model.validity import audit, bootstrap_interval, within_stratum_auc  # noqa: E402
from store.datasets import discover_dataset  # noqa: E402
from store.loading import load_images  # noqa: E402
from tasks.train_data import LabelledArrays, build_split  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
STRATA = ["age_group", "source_dataset", "view"]


def load(data: str, size: int) -> LabelledArrays:
    items = discover_dataset(data).items
    decoded = load_images([item.uri for item in items], Preprocessing(input_size=size))
    kept = [(item, image) for item, image in zip(items, decoded) if image.pixels is not None]
    from dataclasses import replace
    return LabelledArrays(tuple(replace(item, sha256=image.sha256) for item, image in kept),
                          np.stack([image.pixels for _, image in kept]), ())


def features(loaded: LabelledArrays, size: int, base_seed: int, cache: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pooled base features of every image, plain and under each of the flow's augmentation draws."""
    key = hashlib.sha256("".join(item.sha256 for item in loaded.items).encode()).hexdigest()[:12]
    path = cache / f"features-{size}px-base{base_seed}-{key}.npz"
    if path.exists():
        stored = np.load(path)
        return stored["plain"], [stored[f"draw{d}"] for d in range(TrainingConfig.augment_draws)]
    started = time.perf_counter()
    spec, config = Preprocessing(input_size=size), TrainingConfig(seed=base_seed)
    base = build_base(size, None, base_seed)
    plain = extract_features(base, loaded.images, spec).mean(axis=(1, 2))
    augmentation = build_augmentation(Augmentation(), config.seed)
    draws = [extract_features(base, loaded.images, spec, augmentation).mean(axis=(1, 2))
             for _ in range(config.augment_draws)]
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, plain=plain, **{f"draw{d}": draw for d, draw in enumerate(draws)})
    print(f"  features at {size} px: {time.perf_counter() - started:.0f} s (cached in {path})", flush=True)
    return plain, draws


def score(split, loaded, rows_test, oof, oof_labels, test_probabilities, resamples, seed) -> dict:
    """Calibrate on out-of-fold predictions, threshold there, score the test split (as the flow does)."""
    positive = split.classes.index(split.positive)
    temperature, bias = fit_temperature_and_bias(oof, oof_labels)
    oof, test = (apply_temperature_and_bias(p, temperature, bias) for p in (oof, test_probabilities))
    threshold = choose_threshold(oof_labels == positive, oof[:, positive], 0.95)
    truth, scores = split.is_positive[rows_test], test[:, positive]
    levels = {name: split.levels(name, rows_test) for name in STRATA if name in split.strata}
    patients = [split.patients[i] for i in rows_test]
    found = audit(truth, scores, threshold, levels, patients, {}, [], n_resamples=resamples, seed=seed)
    adults = np.array(split.levels("age_group", rows_test)) == "adult"
    within = [found["strata"][name]["within_auc"] for name in levels if found["strata"][name]["within_auc"] is not None]
    return {"overall": found["overall"], "strata": found["strata"], "threshold": threshold,
            "mean_within_auc": float(np.mean(within)) if within else None,
            "adults_auc": auc(truth[adults], scores[adults]),
            "adults_auc_ci": list(bootstrap_interval(lambda t, s, l: auc(t, s), truth[adults], scores[adults],
                                                     np.zeros(int(adults.sum())),
                                                     [p for p, a in zip(patients, adults) if a], resamples, seed)),
            "negatives_flagged": float(flags(scores[~truth], threshold).mean()),
            "children_flagged": float(flags(scores[~adults & ~truth], threshold).mean()) if (~adults & ~truth).any() else None,
            "ece": expected_calibration_error(truth, scores), "scores": scores, "truth": truth, "levels": levels,
            "patients": patients, "fitness": judge(found["overall"], Acceptance())}


def paired_difference(a: dict, b: dict, statistic, resamples: int, seed: int) -> tuple[float, list]:
    """statistic(a) - statistic(b) on the same test images, with a patient-bootstrap interval."""
    both = np.stack([a["scores"], b["scores"]], axis=1)
    levels = np.array([" | ".join(values) for values in zip(*a["levels"].values())])

    def difference(truth, paired, lv):
        x, y = statistic(truth, paired[:, 0], lv), statistic(truth, paired[:, 1], lv)
        return None if x is None or y is None else x - y

    # bootstrap_interval takes 1-d scores; resample indices through a view of both columns.
    index = np.arange(len(both))
    low, high = bootstrap_interval(lambda t, i, lv: difference(t, both[i.astype(int)], lv), a["truth"], index,
                                   levels, a["patients"], resamples, seed)
    return difference(a["truth"], both, levels), [low, high]


def mean_within(truth, scores, joined) -> float | None:
    parts = np.array([level.split(" | ") for level in joined]) if len(joined) else np.zeros((0, 0))
    values = [within_stratum_auc(truth, scores, parts[:, k]) for k in range(parts.shape[1])] if parts.size else []
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def shown(value, interval=None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if interval and interval[0] is not None:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    return text


def run_flow(data: str, size: int, seed: int, resamples: int) -> dict:
    from flows.parameters import TrainParameters
    from flows.train import train

    store = tempfile.mkdtemp(prefix="cxr-bench-models-")
    card = train(TrainParameters(dataset_uri=data, model_store_uri=store, weights="none", input_size=size,
                                 seed=seed, bootstrap=resamples)).card
    return card.validity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--seeds", default="0,1,2", help="split seeds")
    parser.add_argument("--base-seed", type=int, default=0, help="seed of the frozen base's He initialisation")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cxr-validity-bench"))
    parser.add_argument("--flow", action="store_true", help="also run the train flow on the first seed and size")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"no data at {args.data} (see ../shared/data/README.md)")
    print(cpu_line())
    print(f"data: {args.data}; weights none (no ImageNet download here); base seed {args.base_seed}; "
          f"split seeds {args.seeds}; acceptance {Acceptance()}")
    differences: dict[tuple[int, str], list[float]] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        loaded = load(args.data, size)
        plain, draws = features(loaded, size, args.base_seed, Path(args.cache))
        print(f"\n## {size} px, {len(loaded.items)} images")
        print(f"{'seed':4s} {'model':8s} {'AUC':20s} {'mean within-stratum':20s} {'adults only':20s} "
              f"{'sens/spec at thr':17s} {'non-COVID flagged':18s} {'children flagged':16s} {'ECE':6s} chosen / fit")
        for seed in [int(s) for s in args.seeds.split(",")]:
            started = time.perf_counter()
            split = build_split(loaded, "covid", False, 0.2, seed, strata=STRATA, balance_strata="auto")
            cv = split.cross_validation(loaded.images, pooled=True)
            positive = split.classes.index(split.positive)
            both = select_logistic_head(cv, plain[cv.rows], [d[cv.rows] for d in draws], len(split.classes),
                                        positive, seed=seed)
            # The flow's default searches plain features only; its best is the built-in baseline too.
            default = select_logistic_head(cv, plain[cv.rows], [], len(split.classes), positive, seed=seed)
            rows = {}
            for name, chosen, stacks in (("default", default.head, []),
                                         ("baseline", default.baseline, []),
                                         ("aug-head", both.head, [d[cv.rows] for d in draws])):
                head = fit_selected(cv, plain[cv.rows], stacks, chosen, len(split.classes))
                rows[name] = score(split, loaded, split.test, chosen.oof, cv.labels, head.predict(plain[split.test]),
                                   args.bootstrap, seed)
                row = rows[name]
                overall = row["overall"]
                print(f"{seed:<4d} {name:8s} {shown(overall['auc'], overall['auc_ci']):20s} "
                      f"{shown(row['mean_within_auc']):20s} {shown(row['adults_auc'], row['adults_auc_ci']):20s} "
                      f"{shown(overall['sensitivity'])}/{shown(overall['specificity']):11s} "
                      f"{shown(row['negatives_flagged']):18s} {shown(row['children_flagged']):16s} "
                      f"{row['ece']:.3f}  {chosen.weighting}, {chosen.features}, C {chosen.c:g} / "
                      f"{'fit' if row['fitness'].fit else 'NOT fit'}")
            for model in ("default", "aug-head"):
                for label, statistic in (("AUC", lambda t, s, lv: auc(t, s)),
                                         ("mean within-stratum AUC", mean_within)):
                    value, interval = paired_difference(rows[model], rows["baseline"], statistic, args.bootstrap, seed)
                    differences.setdefault((size, model, label), []).append(value)
                    print(f"     {model} - baseline, {label}: {value:+.4f} [{interval[0]:+.3f}, {interval[1]:+.3f}]")
            selection = both
            print(f"     ({time.perf_counter() - started:.0f} s: {len(selection.candidates)} candidates x "
                  f"{selection.head.folds} folds)")
        if args.flow:
            seed = int(args.seeds.split(",")[0])
            validity = run_flow(args.data, size, seed, args.bootstrap)
            print(f"     the train flow itself (base seed = split seed {seed}): AUC "
                  f"{shown(validity['overall']['auc'], validity['overall']['auc_ci'])}, mean within "
                  f"{shown(validity['mean_within_auc'])}; baseline AUC {shown(validity['baseline']['overall']['auc'])}; "
                  f"{validity['fitness']['line']}")
    print("\n## Paired differences against the baseline, mean over seeds (target: default >= 0 within noise)")
    for (size, model, label), values in differences.items():
        print(f"{size} px {model} - baseline, {label}: {np.mean(values):+.4f} "
              f"(per seed {', '.join(f'{v:+.4f}' for v in values)})")


if __name__ == "__main__":
    main()
