"""Does GAN class balancing help? (#14) Test AUC and within-stratum AUC with and without synthetic images.

On ../shared/data/cxr COVID-19 is the majority class (360 of 636 images), so there is nothing to
balance as it stands. The founding paper's situation, few COVID-19 images, is made by keeping a
seeded random quarter of the COVID-19 patients (``--covid-keep``); the bench writes that subset as a
dataset (copies in a temporary folder) and then runs the product's own flows on it:

  for each seed:
    synthesize   the GAN on that seed's training split (the split train makes), FD against the
                 floor, the memorisation gate, the synthetic COVID-19 images
    train        without synthetic images
    train        --synthetic (share --share of the COVID-19 training images), same split and seed

Same split, seed and settings for both trainings; validation and test are real in both. Figures:
test AUC and within-stratum AUC by age_group and source_dataset, each with its patient-level 95 %
bootstrap interval (from the card), and the paired difference per seed with a 95 % interval across
seeds (t distribution). Weights none (no ImageNet download here), 64 px.

    .venv/bin/python bench/gan_bench.py                           # 3 seeds: about 14 min on 2 cores
    .venv/bin/python bench/gan_bench.py --seeds 0 --gan-epochs 5   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
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

from cli import bootstrap  # noqa: E402

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from bench.machine import cpu_line  # noqa: E402
from bench.validity_bench import shown  # noqa: E402  (value [interval], as that bench prints them)
from flows.parameters import SynthesizeParameters, TrainParameters  # noqa: E402
from flows.synthesize import synthesize  # noqa: E402
from flows.train import train  # noqa: E402
from tasks.synthesis import GeneratorRefused  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
STRATA = ["age_group", "source_dataset"]


def covid_minority(data: Path, keep: float, seed: int, folder: Path) -> tuple[str, dict[str, int]]:
    """A dataset of every non-COVID image and a seeded ``keep`` share of the COVID patients, copied
    under ``folder`` (a temporary folder, never the project) with their manifest rows."""
    rows = list(csv.DictReader(io.StringIO((data / "manifest.csv").read_text())))
    covid_patients = sorted({row["patient_id"] for row in rows if row["class"] == "covid"})
    kept = set(np.random.default_rng(seed).permutation(covid_patients)[: round(keep * len(covid_patients))])
    chosen = [row for row in rows if row["class"] != "covid" or row["patient_id"] in kept]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "class", "patient_id", *STRATA], extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in chosen:
            writer.writerow(row)
            (folder / row["file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / row["file"], folder / row["file"])
    counts = {"covid": sum(row["class"] == "covid" for row in chosen),
              "non-covid": sum(row["class"] != "covid" for row in chosen)}
    return str(folder), counts


def figures(card) -> dict:
    overall, strata = card.validity["overall"], card.validity["strata"]
    return {"auc": (overall["auc"], overall["auc_ci"]),
            **{name: (strata[name]["within_auc"], strata[name]["within_auc_ci"]) for name in STRATA}}


def across_seeds(differences: list[float]) -> str:
    values = np.array([value for value in differences if value is not None])
    if len(values) < 2:
        return "n/a (fewer than 2 seeds)"
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():+.3f} [{values.mean() - half:+.3f}, {values.mean() + half:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--covid-keep", type=float, default=0.25, help="share of COVID-19 patients kept")
    parser.add_argument("--share", type=float, default=0.3, help="train --synthetic-share")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--gan-epochs", type=int, default=40)
    parser.add_argument("--gan-width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40, help="classifier stage-1 epochs (early stopping)")
    parser.add_argument("--bootstrap", type=int, default=300)
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"no data at {args.data} (see ../shared/data/README.md)")
    started = time.perf_counter()
    print(cpu_line())
    work = Path(tempfile.mkdtemp(prefix="cxr-gan-bench-"))
    dataset, counts = covid_minority(Path(args.data), args.covid_keep, 0, work / "dataset")
    print(f"data: {args.data}, COVID-19 patients kept: {args.covid_keep:.0%} -> {counts}; classifier {args.input_size} px, "
          f"weights none; GAN {args.gan_epochs} epochs, width {args.gan_width}, 64 px; share {args.share}; "
          f"seeds {args.seeds}")

    rows = []
    for seed in args.seeds:
        common = dict(dataset_uri=dataset, model_store_uri=str(work / f"models-{seed}"), weights="none",
                      input_size=args.input_size, seed=seed, strata=STRATA, epochs=args.epochs,
                      bootstrap=args.bootstrap, force_promote=True)
        clock = time.perf_counter()
        try:
            made = synthesize(SynthesizeParameters(
                dataset_uri=dataset, out_uri=str(work / f"synthetic-{seed}"), generator_store_uri=str(work / "generators"),
                synthetic_class="covid", count=400, seed=seed, image_size=64, epochs=args.gan_epochs,
                width=args.gan_width, weights="none", input_size=args.input_size))
        except GeneratorRefused as error:
            print(f"seed {seed}: generator REFUSED by the memorisation gate: {error}")
            rows.append({"seed": seed, "refused": True})
            continue
        gan_seconds = time.perf_counter() - clock
        quality = made.quality.classes
        clock = time.perf_counter()
        real = train(TrainParameters(**common)).card
        real_seconds, clock = time.perf_counter() - clock, time.perf_counter()
        mixed = train(TrainParameters(**common, synthetic_uri=made.dataset_uri, synthetic_share=args.share)).card
        rows.append({"seed": seed, "refused": False, "real": figures(real), "mixed": figures(mixed),
                     "synthetic": mixed.dataset["synthetic"], "quality": quality,
                     "seconds": (gan_seconds, real_seconds, time.perf_counter() - clock)})
        print(f"seed {seed}: done in {gan_seconds:.0f} + {real_seconds:.0f} + {rows[-1]['seconds'][2]:.0f} s", flush=True)

    print()
    print("Generator per seed: Fréchet distance to the real training images vs the real-halves floor; memorisation")
    for row in [row for row in rows if not row["refused"]]:
        parts = [f"{name} FD {found['fd']:.3g} / floor {found['floor']:.3g} (x{found['ratio']:.1f}), NN q05 "
                 + ", ".join(f"{space} {values['synthetic_to_real']['q05']:.3g} vs real {values['real_to_real']['q05']:.3g}"
                             for space, values in found["memorisation"]["spaces"].items())
                 for name, found in row["quality"].items()]
        print(f"  seed {row['seed']}: " + "; ".join(parts))
    print()
    header = f"{'seed':5s} {'synthetic':10s} {'test AUC [95% CI]':22s} " + " ".join(
        f"{'within ' + name + ' [95% CI]':30s}" for name in STRATA)
    print(header)
    differences: dict[str, list[float]] = {"auc": [], **{name: [] for name in STRATA}}
    for row in [row for row in rows if not row["refused"]]:
        for label, key in (("none", "real"), (f"{row['synthetic']['count']} covid", "mixed")):
            found = row[key]
            print(f"{row['seed']:<5d} {label:10s} {shown(*found['auc']):22s} "
                  + " ".join(f"{shown(*found[name]):30s}" for name in STRATA))
        for name in differences:
            before, after = row["real"][name][0], row["mixed"][name][0]
            differences[name].append(None if before is None or after is None else after - before)
    print()
    print("with minus without, mean over seeds [95% interval across seeds]:")
    verdicts = []
    for name, values in differences.items():
        label = "test AUC" if name == "auc" else f"within {name}"
        print(f"  {label:24s} {across_seeds(values)}   per seed: "
              + ", ".join("n/a" if value is None else f"{value:+.3f}" for value in values))
        kept = np.array([value for value in values if value is not None])
        if len(kept) >= 2:
            half = stats.t.ppf(0.975, len(kept) - 1) * kept.std(ddof=1) / np.sqrt(len(kept))
            verdicts.append("helped" if kept.mean() - half > 0 else "hurt" if kept.mean() + half < 0 else "no difference")
    print()
    if not verdicts:
        print("Verdict: not enough seeds to say.")
    elif all(verdict == "helped" for verdict in verdicts):
        print("Verdict: synthetic images HELPED on every measure (intervals above 0).")
    else:
        print("Verdict: synthetic images did NOT measurably help: " + ", ".join(
            f"{'test AUC' if name == 'auc' else 'within ' + name}: {verdict}"
            for name, verdict in zip(differences, verdicts)) + ". Keep them optional (off by default).")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
