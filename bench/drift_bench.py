"""How often do the scope gate and the drift alarm err on real chest X-rays, and how soon does drift show?

The X-rays of ../shared/data/cxr are split by patient: a fifth of each (class, source_dataset)
stratum's patients is held out (--seed), the rest trains a model (flows.train: --input-size px,
weights none, 3 epochs; or give --model-store, a store trained on that same rest). Two nights go
once through the real screen flow, in this process on Prefect's ephemeral API: the held-out X-rays,
and an out-of-scope set (store.out_of_scope: --per-kind of each kind, the transformed X-rays made
from the held-out images). Everything after that resamples their rows; nothing is screened again.

Printed, each share with its 95 % Wilson interval (tasks.scope_fitting.rate):

- the gate's false-rejection rate on the held-out X-rays, and its rejection rate per out-of-scope
  kind, with the reasons given;
- the drift alarm's false-alarm rate over --nights ordinary nights. Each draw splits the held-out
  patients in two halves; tonight is --night-size rows of one half (without replacement), compared
  with the model's test split (its bundle's drift reference) and with site nights (what
  screening.drift compares with once a site has accepted nights: 14 ordinary nights merged, each
  kept as a summary keeps it, judged at the site's own bar, and at the rule's alone), drawn from the other half, so that tonight never repeats an image
  of its reference. The 14 nights repeat the other half's ~60 images; a third reference, those
  images each once, tells what the repeats cost; and the other half's patients in 3 disjoint
  nights (the fewest a site's reference takes), at their own bar and at the rule alone, tell what
  the site's own bar does when nights differ as patients do;
- the alarm rate of mixed nights, where a share (--mix) of tonight's rows are out of scope;
- which tests alarm on ordinary nights, and how often.

The nights are resampled from about 120 X-rays of about 85 patients, so they overlap: the
intervals cover the resampling, not the choice of those patients.

    .venv/bin/python bench/drift_bench.py
    .venv/bin/python bench/drift_bench.py --nights 1000 --night-size 60 --mix 0.05 0.1
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cxr-bench-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import bootstrap

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import cv2
import numpy as np

from bench.machine import cpu_line
from model.drift_tests import ALPHA, compare
from screening.drift import DRIFT_WINDOW, MIN_NIGHTS, night_profile, reason_category, site_reference
from screening.results import PredictionRow
from store import registry, storage
from store.out_of_scope import KINDS, write_out_of_scope_set
from tasks.scope_fitting import rate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
HELD_OUT = 0.2  # of each (class, source_dataset) stratum's patients


def shown(hits: int, total: int) -> str:
    figures = rate(hits, total)
    return "n/a" if not total else f"{figures['rate']:.3f} [{figures['low']:.3f}, {figures['high']:.3f}] ({hits}/{total})"


def split_by_patient(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): HELD_OUT of each stratum's patients held out."""
    strata = collections.defaultdict(set)
    for row in rows:
        strata[(row["class"], row["source_dataset"])].add(row["patient_id"])
    rng, held = np.random.default_rng(seed), set()
    for patients in strata.values():
        held |= set(rng.choice(sorted(patients), round(HELD_OUT * len(patients)), replace=False))
    return [row for row in rows if row["patient_id"] not in held], [row for row in rows if row["patient_id"] in held]


def train_model(data: Path, rows: list[dict], root: Path, input_size: int, seed: int) -> str:
    from flows.parameters import TrainParameters
    from flows.train import train

    for row in rows:
        (root / "dataset" / row["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / row["file"], root / "dataset" / row["file"])
    with open(root / "dataset" / "manifest.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    train(TrainParameters(dataset_uri=str(root / "dataset"), model_store_uri=str(root / "models"), seed=seed,
                          input_size=input_size, weights="none", epochs=3, augment_draws=1, batch_size=16,
                          force_promote=True))
    return str(root / "models")


def screened(incoming: Path, results: Path, store: str, card) -> tuple[dict, list[tuple[str, PredictionRow]]]:
    """One night through the screen flow: its drift verdict, and each row with its path under ``incoming``."""
    from flows.parameters import ScreenParameters
    from flows.screen import screen

    summary = screen(ScreenParameters(incoming_uri=str(incoming), results_uri=str(results), model_store_uri=store,
                                      model_version=card.version))
    records = [json.loads(line) for line in storage.read_bytes(summary.outputs["predictions.jsonl"]).splitlines()]
    rows = [PredictionRow.from_record(record, card.classes) for record in records]
    return summary.drift, [(storage.relative_to(row.image_uri, str(incoming)), row) for row in rows]


def rejections(name: str, rows: list[PredictionRow]) -> None:
    reasons = collections.Counter(reason_category(row.reason) for row in rows if row.status == "rejected")
    print(f"  {name:<16} {shown(sum(reasons.values()), len(rows))}  {dict(reasons.most_common())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model-store", default=None, help="a store trained on the X-rays this split does not hold out")
    parser.add_argument("--input-size", type=int, default=64, help="without --model-store")
    parser.add_argument("--per-kind", type=int, default=20)
    parser.add_argument("--nights", type=int, default=500)
    parser.add_argument("--night-size", type=int, default=40)
    parser.add_argument("--mix", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="out-of-scope shares")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "manifest.csv").exists():
        sys.exit(f"no manifest.csv under {data} (see ../shared/data/README.md)")
    print(cpu_line())
    with open(data / "manifest.csv", newline="") as file:
        training, held_out = split_by_patient(list(csv.DictReader(file)), args.seed)

    with tempfile.TemporaryDirectory(prefix="drift-bench-") as folder:
        root = Path(folder)
        store = args.model_store or train_model(data, training, root, args.input_size, args.seed)
        card = registry.load_card(store)
        test_split = registry.load_drift_reference(store, card)
        if test_split is None:
            sys.exit(f"model {card.version} keeps no drift reference (trained before it was kept)")
        (root / "night").mkdir()
        patient_of = {}
        for row in held_out:
            name = row["file"].replace("/", "__")
            shutil.copyfile(data / row["file"], root / "night" / name)
            patient_of[name] = row["patient_id"]
        greys = [cv2.imread(str(data / row["file"]), cv2.IMREAD_GRAYSCALE) for row in held_out]
        write_out_of_scope_set(str(root / "out-of-scope"), args.per_kind, greys, size=512, seed=args.seed)
        night_drift, night = screened(root / "night", root / "results-night", store, card)
        other_drift, other = screened(root / "out-of-scope", root / "results-out-of-scope", store, card)

    print(f"model {card.version}: {card.spec().input_size} px, test split of {card.dataset['test_images']} images; "
          f"{len(night)} held-out X-rays of {len(set(patient_of.values()))} patients, {len(other)} out of scope "
          f"({args.per_kind} per kind)")
    for name, drift in (("held-out night", night_drift), ("out-of-scope night", other_drift)):
        print(f"  the flow's drift verdict on the {name}: alarm {drift['alarm']}, score {drift['score']}, "
              f"against the {drift['reference']['kind']}; alarming: {[t['name'] for t in drift['tests'] if t['alarm']]}")

    print("\nscope gate: rejected (rate [95 % Wilson interval]) and the reasons given")
    rejections("real (held out)", [row for _, row in night])
    kind_of = {kind.replace(" ", "-"): kind for kind in KINDS}
    for kind in KINDS:
        rejections(kind, [row for path, row in other if kind_of[path.split("/")[0]] == kind])

    rng = np.random.default_rng(args.seed)
    patients = sorted(set(patient_of.values()))
    others = [row for _, row in other]
    references = ("test split", "site nights", "site, rule only", "site half once", "3 by patient",
                  "3 by patient, rule only")
    alarms = collections.Counter()  # (reference, mix) -> nights that alarmed
    failing = {name: collections.Counter() for name in references}
    sizes = set()  # a half may hold fewer images than --night-size

    def draw(pool: list, size: int) -> list:
        return [pool[i] for i in rng.choice(len(pool), size, replace=False)]

    for _ in range(args.nights):
        half = set(rng.choice(patients, len(patients) // 2, replace=False))
        site_pool = [row for path, row in night if patient_of[path] in half]
        tonight_pool = [row for path, row in night if patient_of[path] not in half]
        size = min(args.night_size, len(site_pool), len(tonight_pool))
        sizes.add(size)
        site, site_alpha = site_reference([night_profile(draw(site_pool, size), card.positive_class).sample(seed=index)
                                           for index in range(DRIFT_WINDOW)])
        compared = {"test split": (test_split, ALPHA), "site nights": (site, site_alpha),
                    "site, rule only": (site, ALPHA),
                    "site half once": (night_profile(site_pool, card.positive_class), ALPHA)}
        # The half's patients in MIN_NIGHTS disjoint nights: nights that differ as patients do.
        groups = np.array_split(rng.permutation(sorted(half)), MIN_NIGHTS)
        by_patient, patient_alpha = site_reference([
            night_profile([row for path, row in night if patient_of[path] in set(group)], card.positive_class).sample()
            for group in groups])
        compared["3 by patient"] = (by_patient, patient_alpha)
        compared["3 by patient, rule only"] = (by_patient, ALPHA)
        for mix in [0.0, *args.mix]:
            out = round(mix * size)
            tonight = night_profile(draw(tonight_pool, size - out) + draw(others, out), card.positive_class)
            for name, (reference, alpha) in compared.items():
                result = compare(tonight, reference, alpha)
                alarms[name, mix] += result.alarm
                if not mix:
                    failing[name].update(result.failing())

    print(f"\ndrift alarm over {args.nights} nights of {min(sizes)}-{max(sizes)} rows (rate [95 % Wilson interval])\n"
          f"  site nights: {DRIFT_WINDOW} nights drawn from the other half's patients, merged (images repeat), at the\n"
          f"  site's own bar (screening.drift.site_reference); site, rule only: the same at the Bonferroni rule alone;\n"
          f"  site half once: each of the other half's images once (the same patients, no repeats);\n"
          f"  3 by patient: the other half's patients in {MIN_NIGHTS} disjoint nights, at their own bar and at the rule alone")
    print(f"  {'out of scope':<14}" + "".join(f"{'vs ' + name:<34}" for name in references).rstrip())
    for mix in [0.0, *args.mix]:
        print(f"  {f'{mix:.0%}':<14}" + "".join(f"{shown(alarms[name, mix], args.nights):<34}"
                                              for name in references).rstrip())
    print("\ntests that alarmed on ordinary nights (nights)")
    for name, counted in failing.items():
        print(f"  vs {name:<15} {dict(counted.most_common()) or 'none'}")


if __name__ == "__main__":
    main()
