"""What does the model learn on ../shared/data/cxr: COVID-19, or children vs adults and source?

Same data, split and seed for every row:
  default   the train flow with its defaults (linear head, strata balanced automatically, L2 and
            epoch chosen on validation within-stratum AUC, calibrated)
  mlp       the previous head (Dense(64), dropout) with class weights only, no strata balancing;
            its epoch is still chosen on validation within-stratum AUC
  logreg    scikit-learn's L2-regularised logistic regression (standardised, class-balanced,
            C=0.01) on the same frozen base's pooled features, fitted on the training part
Each with overall and within-stratum AUC by age_group and by source_dataset (95 % patient-level
bootstrap intervals), the metadata-only baselines, ECE and the masked-lung AUCs where the flow
measures them. Target: the default's within-stratum AUC by age_group at least that of logreg.

    .venv/bin/python bench/validity_bench.py                  # 224 px, weights none: ~30 min on 2 cores
    .venv/bin/python bench/validity_bench.py --input-size 64  # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cxr-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks  # noqa: E402,F401  (first: through model/ it sets TensorFlow's runtime options before TensorFlow loads)
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from flows.parameters import TrainParameters  # noqa: E402
from flows.train import train  # noqa: E402
from model.network import build_base  # noqa: E402
from model.preprocessing import Preprocessing  # noqa: E402
from model.training import extract_features  # noqa: E402
from model.validity import audit  # noqa: E402
from tasks.datasets import discover_dataset, hash_images, split_dataset  # noqa: E402
from tasks.loading import load_images  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
STRATA = ["age_group", "source_dataset"]


def cpu() -> str:
    name = platform.processor() or "unknown CPU"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.*)", text).group(1)
        present = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in present)
    except (OSError, AttributeError):
        pass
    return f"{name} ({os.cpu_count()} cores; {flags or 'no AVX2'})"


def flow_row(name: str, params: TrainParameters) -> dict:
    started = time.perf_counter()
    card = train(params).card
    validity = card.validity
    return {"name": name, "seconds": time.perf_counter() - started, "overall": validity["overall"],
            "strata": validity["strata"], "masked": validity.get("masked", {}), "calibration": card.calibration,
            "warnings": card.shortcut_warnings, "balance": card.training.get("balance_strata"),
            "l2": card.training.get("selected_l2")}


def logreg_row(data: str, input_size: int, seed: int, resamples: int) -> dict:
    """The flow's split, reproduced; the flow's base (He-initialised from the same seed)."""
    started = time.perf_counter()
    spec = Preprocessing(input_size=input_size)
    items = hash_images(discover_dataset(data).items)
    split = split_dataset(items, 0.2, seed)
    fit_part = split_dataset(split.train, 0.2, seed + 1)
    train_items, test_items = list(fit_part.train), list(split.test)
    base = build_base(input_size, None, seed)

    def pooled(part):
        images = np.stack([image.pixels for image in load_images([item.uri for item in part], spec)])
        return extract_features(base, images, spec).mean(axis=(1, 2))

    x_train, x_test = pooled(train_items), pooled(test_items)
    y_train = np.array([item.label == "covid" for item in train_items])
    y_test = np.array([item.label == "covid" for item in test_items])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, class_weight="balanced", max_iter=5000))
    model.fit(x_train, y_train)
    scores = model.predict_proba(x_test)[:, 1]
    result = audit(y_test, scores, 0.5, {s: [i.metadata[s] for i in test_items] for s in STRATA},
                   [i.patient_id or i.uri for i in test_items],
                   {s: [i.metadata[s] for i in train_items] for s in STRATA}, y_train, n_resamples=resamples, seed=seed)
    return {"name": "logreg", "seconds": time.perf_counter() - started, "overall": result["overall"],
            "strata": result["strata"], "masked": {}, "calibration": {}, "warnings": result["warnings"],
            "balance": None, "l2": "C=0.01"}


def shown(value, interval=None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if interval and interval[0] is not None:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--skip-mlp", action="store_true", help="leave out the previous default (saves ~10 min)")
    parser.add_argument("--balance", default=None, help="override the default's balance_strata (to compare choices)")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"no data at {args.data} (see ../shared/data/README.md)")
    print(f"CPU: {cpu()}")
    print(f"data: {args.data}; {args.input_size} px; weights none (no ImageNet download here); seed {args.seed}")
    store = tempfile.mkdtemp(prefix="cxr-bench-models-")
    common = dict(dataset_uri=args.data, model_store_uri=store, weights="none", input_size=args.input_size,
                  seed=args.seed, strata=STRATA, bootstrap=args.bootstrap, force_promote=True)
    default = TrainParameters(**common, **({"balance_strata": args.balance} if args.balance else {}))
    rows = [flow_row("default", default)]
    if not args.skip_mlp:
        rows.append(flow_row("mlp", TrainParameters(**common, head="mlp", balance_strata="none", epochs=25)))
    rows.append(logreg_row(args.data, args.input_size, args.seed, args.bootstrap))

    print()
    header = f"{'':8s} {'overall AUC [95% CI]':24s} " + " ".join(f"{'within ' + s + ' [95% CI]':30s}" for s in STRATA)
    print(header)
    for row in rows:
        within = " ".join(f"{shown(row['strata'][s]['within_auc'], row['strata'][s]['within_auc_ci']):30s}"
                          for s in STRATA)
        print(f"{row['name']:8s} {shown(row['overall']['auc'], row['overall']['auc_ci']):24s} {within}")
    print()
    baselines = ", ".join(f"{s} {shown(rows[0]['strata'][s]['metadata_baseline_auc'])}" for s in STRATA)
    print(f"metadata-only AUC (label from the level alone, train rates): {baselines}")
    for row in rows:
        extra = []
        if row["calibration"]:
            test = row["calibration"]["test"]
            extra.append(f"test ECE {test['ece_before']:.3f} -> {test['ece_after']:.3f} "
                         f"(T {row['calibration']['temperature']:.2f})")
        if row["masked"]:
            extra.append(f"AUC lungs blanked {shown(row['masked'].get('auc_lungs_blanked'))}, "
                         f"only lungs {shown(row['masked'].get('auc_only_lungs'))}")
        overall = row["overall"]
        extra.append(f"sens/spec at threshold {shown(overall['sensitivity'])}/{shown(overall['specificity'])}")
        print(f"{row['name']:8s} {row['seconds']:6.0f} s; balanced by {row['balance']}; L2 {row['l2']}; "
              f"{'; '.join(extra)}")
        for line in row["warnings"]:
            print(f"{'':8s} warning: {line}")
    default, logreg = rows[0]["strata"]["age_group"]["within_auc"], rows[-1]["strata"]["age_group"]["within_auc"]
    if default is not None and logreg is not None:
        print(f"\nwithin age_group: default {default:.3f} vs logreg {logreg:.3f}: ratio {default / logreg:.2f} "
              f"(target >= 1.00: {'met' if default >= logreg else 'NOT met'})")


if __name__ == "__main__":
    main()
