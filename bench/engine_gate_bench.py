"""How often does each engine pass the gate, under the old rule and the new one, and is a broken engine
still refused?

For each seed, the real train flow trains a model on ../shared/data/cxr (weights none: ImageNet
weights cannot be had here; --input-size, default 128) and checks bf16 and int8 against fp32 on the
test split, as every training does. From the recorded figures the bench shows both verdicts:

  old   rule 1: flags agree on at least 99.5 % of the test images, AUC within 0.005
  new   rule 2 (model/inference.py GATE): AUC within 0.005, no probability moved by more than 0.10,
        no flip farther than 0.02 from the threshold, sensitivity and
        specificity within their bootstrap noise

and the explanation gate's figures (median correlation of the engine's Grad-CAM with fp32's, largest
lung-share difference). Then it breaks an engine on purpose (block5_conv2's kernel scaled by
1 + 0.2 x N(0, 1) per weight, run in bf16) and checks it against fp32 on the same test split: the
new rule must refuse it.

    .venv/bin/python bench/engine_gate_bench.py                    # seeds 0-3 at 128 px
    .venv/bin/python bench/engine_gate_bench.py --seeds 0 1 --input-size 64
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
import json

import keras
import numpy as np

from bench.machine import cpu_line
from model.inference import OLD_GATE, EngineCheck, check_engine, make_predictor, passes_gate
from store import registry, storage
from store.engines import ENGINES_FILE

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def old_rule(check: EngineCheck) -> bool:
    return check.flag_agreement >= OLD_GATE["min_flag_agreement"] and (
        check.auc_difference is None or check.auc_difference <= OLD_GATE.get("max_auc_difference", 0.005))


def broken_check(store: str, version: str) -> EngineCheck:
    """A deliberately broken engine against fp32 on the version's own test split, rebuilt from its card
    as `cxr-screen validate-engines` does."""
    import logging

    from tasks.train_data import build_split, discover, load_labelled

    model, card = registry.load_model(store, version)
    loaded = load_labelled(discover(card.dataset["uri"]).items, card.spec())  # tasks, run outside a flow
    split = build_split(loaded, card.positive_class, False, card.dataset["test_fraction"], card.dataset["split_seed"],
                        strata=[], leave_out=None, logger=logging.getLogger("bench"))
    images, labels = loaded.images[split.test], split.labels[split.test]
    positive = card.classes.index(card.positive_class)
    broken = keras.models.clone_model(model)
    broken.set_weights(model.get_weights())
    kernel = broken.get_layer("vgg16").get_layer("block5_conv2").kernel
    kernel.assign(kernel * (1 + 0.2 * np.random.default_rng(0).standard_normal(kernel.shape).astype("float32")))
    reference = make_predictor(model, card.spec(), "fp32").predict(images)[:, positive]
    candidate = make_predictor(broken, card.spec(), "bf16").predict(images)[:, positive]
    return check_engine("broken-bf16", reference, candidate, (labels == positive).astype(int), card.threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real chest X-rays not found at {DATA} (see ../shared/data/README.md)")
    from flows.parameters import TrainParameters
    from flows.train import train

    print(cpu_line())
    print(f"data {DATA}, {args.input_size} px, weights none, {args.epochs} epochs, seeds {args.seeds}\n")
    counts: dict[str, dict[str, int]] = {}
    header = (f"{'seed':>4} {'engine':<11} {'agree':>6} {'flips':>5} {'far':>3} {'max|dp|':>7} {'p99':>6} {'dAUC':>6} "
              f"{'dsens/noise':>11} {'dspec/noise':>11} {'old':>4} {'new':>4} {'cam r':>6} {'dshare':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            started = time.perf_counter()
            store = str(Path(folder, f"models-{seed}"))
            trained = train(TrainParameters(dataset_uri=str(DATA), model_store_uri=store, input_size=args.input_size,
                                            weights="none", epochs=args.epochs, seed=seed, force_promote=True))
            record = json.loads(storage.read_bytes(storage.join(store, trained.version, ENGINES_FILE)))
            checks = [EngineCheck(**fields) for name, fields in sorted(record["checks"].items())
                      if name in ("bf16", "int8")]
            checks.append(broken_check(store, trained.version))
            print(f"seed {seed}: trained {trained.version} in {time.perf_counter() - started:.0f} s", flush=True)
            for check in checks:
                old, new = old_rule(check), passes_gate(check)
                tally = counts.setdefault(check.engine, {"bundles": 0, "old": 0, "new": 0})
                tally["bundles"] += 1
                tally["old"] += old
                tally["new"] += new
                rows.append(
                    f"{seed:>4} {check.engine:<11} {check.flag_agreement:>6.3f} {check.flips:>5} {check.far_flips:>3} "
                    f"{check.max_probability_difference:>7.4f} {check.probability_difference_q99:>6.4f} "
                    f"{(check.auc_difference or 0):>6.4f} "
                    f"{_pair(check.sensitivity_change, check.sensitivity_noise):>11} "
                    f"{_pair(check.specificity_change, check.specificity_noise):>11} "
                    f"{'pass' if old else 'FAIL':>4} {'pass' if new else 'FAIL':>4} "
                    f"{_number(check.explanation_correlation):>6} {_number(check.explanation_lung_share_difference):>6}")
    print("\n" + header)
    print("\n".join(rows))
    print("\nPasses per engine (old rule | new rule):")
    for engine, tally in counts.items():
        print(f"  {engine:<11} {tally['old']}/{tally['bundles']} | {tally['new']}/{tally['bundles']}")


def _pair(change: float | None, noise: float | None) -> str:
    return "n/a" if change is None else f"{change:.3f}/{noise:.3f}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
