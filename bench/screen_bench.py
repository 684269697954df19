"""Screening throughput and memory, all in one run on the same images and model:

1. ceilings: each engine's bare forward pass (model/inference.py) on pre-decoded images (img/s),
   with the settings the product runs with (TensorFlow's oneDNN kernels on, see model/__init__.py),
   and the decode-and-resize stage alone in the decoder processes (decode ceiling);
2. naive baseline: per image, cv2.imread + preprocess + model.predict (img/s), in its own process,
   once with oneDNN off and once with it on (TensorFlow's default depends on the CPU). Per-image
   predict can be slower with oneDNN on, so the baseline is the faster of the two: the flow gets
   no credit for a setting that only hurts the baseline;
3. the screening flow end to end, in its own process, with --engine fp32 and with auto (img/s
   and peak RSS);
4. the flow again on N times the inputs (the same files hard-linked under other names): peak RSS.

The model is trained by the train flow on the same images (weights none, a few epochs), so its
engines are checked against fp32 on its test split as for any bundle, and auto may choose only
engines that pass the gate.

Targets: the fp32 flow reaches at least 85% of the fp32 ceiling and 1.7x the naive baseline; on a
CPU with bf16 units auto reaches 4x the fp32 flow; peak RSS on 10x the inputs grows by under 20%.

--explain-seeds runs the explanation case instead (see explanation_case): what Grad-CAM costs a
night, with --explain none, flagged and all, on fp32 and auto, one model per seed, and with
--before REV the same bundle and inputs screened by an earlier revision's flow.

    .venv/bin/python bench/screen_bench.py                   # ../shared/data/cxr, 224 px, weights none
    .venv/bin/python bench/screen_bench.py --repeat 0        # skip the (long) 10x run
    .venv/bin/python bench/screen_bench.py --explain-seeds 0 1 2 --epochs 25 --before c773ec7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
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

from cli import bootstrap  # noqa: E402

bootstrap()  # first: TensorFlow's runtime options are read when it loads
import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import cpu_line  # noqa: E402
from imaging.decode import IMAGE_SUFFIXES  # noqa: E402
from model.bundle import ModelCard, model_to_bytes  # noqa: E402
from model.inference import ENGINES, EngineCheck, make_predictor  # noqa: E402
from model.network import build_classifier  # noqa: E402
from model.preprocessing import Preprocessing  # noqa: E402
from store import engines, registry, storage  # noqa: E402
from store.loading import load_images  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"
FULLSIZE = ROOT.parent / "shared" / "data" / "cxr-fullsize"


def make_store(store: str, input_size: int) -> keras.Model:
    """An untrained model (weights none) registered as production, without engine checks (fp32 only)."""
    keras.utils.set_random_seed(0)
    model = build_classifier(2, input_size, None, head="mlp")
    data = model_to_bytes(model)
    card = ModelCard(version="v-bench", classes=["non-covid", "covid"], positive_class="covid", threshold=0.5,
                     preprocessing=Preprocessing(input_size=input_size).to_dict(), weights={"origin": "none"},
                     dataset={}, metrics={}, model_sha256=hashlib.sha256(data).hexdigest())
    registry.publish(store, card.version, {"model.keras": data}, card)
    registry.set_production(store, card.version, "benchmark")
    return model


def train_store(store: str, data: str, input_size: int, epochs: int, fine_tune_epochs: int = 0, seed: int = 0
                ) -> tuple[keras.Model, float]:
    """A model trained by the train flow (weights none, few epochs): a real bundle, its engines
    checked on its test split as always. Returns the model and the training time in seconds."""
    from flows.parameters import TrainParameters
    from flows.train import train

    started = time.perf_counter()
    trained = train(TrainParameters(dataset_uri=data, model_store_uri=store, input_size=input_size, weights="none",
                                    epochs=epochs, augment_draws=1, bootstrap=100, fine_tune_epochs=fine_tune_epochs,
                                    seed=seed, force_promote=True))
    seconds = time.perf_counter() - started
    if not trained.promoted:  # unfit by the acceptance criteria: screened anyway, to be measured
        registry.set_production(store, trained.version, "benchmark: measured whatever its verdict")
    model, _ = registry.load_model(store, trained.version)
    return model, seconds


def decode_in_threads(paths: list[Path], spec: Preprocessing) -> float:
    """Read, decode and resize in a thread pool of this process (OpenCV releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from imaging.decode import decode_image
    from model.preprocessing import resize

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda path: resize(decode_image(path.read_bytes(), str(path)), spec), paths))
    return len(paths) / (time.perf_counter() - started)


def link_or_copy(source: Path, target: Path) -> None:
    """Inputs must lie inside the incoming folder (links out of it are refused): hard links cost nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


NAIVE_LOOP = """
import sys, time
from pathlib import Path
import cv2
from model.preprocessing import preprocess
from store import registry
from imaging.decode import IMAGE_SUFFIXES
model, card = registry.load_model(sys.argv[1])
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


def flow_in_subprocess(incoming: str, results: str, store: str, batch_size: int, chunk_size: int,
                       engine: str = "auto", explain: str = "none", workers: int | None = None,
                       code_from: Path = ROOT) -> tuple[dict, float]:
    """Runs the flow in a fresh process; returns its summary and that process's peak RSS in MiB.
    ``explain`` 'none' by default: the explanation case measures explanations on their own.
    ``workers``: a local Dask cluster. ``code_from``: a checkout of another revision, whose code the
    process runs (the same bundle and inputs: before and after in one run)."""
    code = ("import json, sys; from flows.screen import screen; from flows.parameters import ScreenParameters; "
            "s = screen(ScreenParameters(incoming_uri=sys.argv[1], results_uri=sys.argv[2], model_store_uri=sys.argv[3], "
            "batch_size=int(sys.argv[4]), chunk_size=int(sys.argv[5]), engine=sys.argv[6], explain=sys.argv[7], "
            "workers=int(sys.argv[8]) or None)); "
            "print('SUMMARY ' + json.dumps(s.to_dict()))")
    script = "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); " \
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    # The wrapper measures only the flow process (and the server it starts, if larger; it is not).
    output = subprocess.run(
        [sys.executable, "-c", script, sys.executable, "-c", code, incoming, results, store, str(batch_size),
         str(chunk_size), engine, explain, str(workers or 0)],
        cwd=code_from, capture_output=True, text=True, env={**os.environ, "PREFECT_HOME": tempfile.mkdtemp()},
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
    parser.add_argument("--epochs", type=int, default=10, help="stage 1 epochs of the benchmark's model")
    parser.add_argument("--fine-tune-epochs", type=int, default=0,
                        help="stage 2 epochs of the benchmark's model (block5 fine-tuned: its features spread "
                             "out, and the engines may pass the gate where a frozen random base's do not)")
    parser.add_argument("--fullsize", type=int, default=200, help="full-size inputs for part (b) (0: skip)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive per-image loop")
    parser.add_argument("--memory-only", action="store_true", help="skip the ceiling and the naive loop")
    parser.add_argument("--explain-seeds", type=int, nargs="*", default=[],
                        help="the explanation case only: one model per seed (--epochs, --input-size), screened "
                             "with --engine fp32 and auto, each with --explain none, flagged and all")
    parser.add_argument("--explain-stores", nargs="*", default=[],
                        help="the explanation case on these model stores (their latest version) instead of "
                             "training one per seed")
    parser.add_argument("--explain-images", type=int, default=248, help="inputs of the explanation case")
    parser.add_argument("--before", default=None,
                        help="a git revision: the explanation case also runs that revision's flow (auto, flagged) "
                             "on the same bundle and inputs")
    args = parser.parse_args()
    paths = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"no images under {args.data} (see ../shared/data/README.md)")
    spec = Preprocessing(input_size=args.input_size)
    work = Path(tempfile.mkdtemp(prefix="screen-bench-"))
    store = str(work / "models")
    print(cpu_line())
    if args.explain_seeds or args.explain_stores:
        explanation_case(args, paths, work)
        return
    print(f"{len(paths)} images from {args.data}; model {args.input_size} px, weights none; "
          f"batch {args.batch_size}, chunk {args.chunk_size}")

    # Decode ceiling: the decoder processes alone (the flow's own reading and decoding path).
    started = time.perf_counter()
    loaded = load_images([str(p) for p in paths], spec)
    decode_ceiling = len(paths) / (time.perf_counter() - started)
    images = np.stack([item.pixels for item in loaded if item.pixels is not None])
    print(f"  decode    {decode_ceiling:7.2f} img/s (read, decode, resize in the decoder processes)")
    print(f"  decode    {decode_in_threads(paths, spec):7.2f} img/s (the same in 4 threads of this process, "
          "as before the decoder processes)")
    model, seconds = train_store(store, args.data, args.input_size, args.epochs, args.fine_tune_epochs)
    card = registry.load_card(store)
    print(f"  trained   {card.version} in {seconds:.0f} s ({args.epochs}+{args.fine_tune_epochs} epochs, weights none); "
          f"stage 1 features by "
          f"{card.training['features_engine']['engine']}")
    for name, check in json.loads(storage.read_bytes(storage.join(store, card.version, "engines.json")))["checks"].items():
        print(f"  check     {EngineCheck(**check).summary}: {'passes' if check['passed'] else 'FAILS'}")

    ceilings: dict[str, float] = {}
    naive = None
    if not args.memory_only:
        # 1. ceilings: decoded beforehand, only each engine's forward pass is timed.
        for engine in ENGINES:
            predictor = make_predictor(model, spec, engine, engines.load_artifacts(store, card, engine))
            predictor.predict(images[: args.batch_size], args.batch_size)  # warm-up: builds the compiled function
            started = time.perf_counter()
            predictor.predict(images, args.batch_size)
            ceilings[engine] = len(images) / (time.perf_counter() - started)
            print(f"  ceiling   {ceilings[engine]:7.2f} img/s {engine} (oneDNN "
                  f"{'on' if os.environ['TF_ENABLE_ONEDNN_OPTS'] == '1' else 'off'})")

    if not args.memory_only and not args.no_naive:
        # 2. naive: the tutorial's loop, in fresh processes, with oneDNN off and on; the faster is the baseline.
        naive_by_setting = {}
        for onednn, label in (("0", "oneDNN off"), ("1", "oneDNN on")):
            naive_by_setting[label] = naive_in_subprocess(store, args.data, onednn)
            print(f"  naive     {naive_by_setting[label]:7.2f} img/s ({label})")
        naive = max(naive_by_setting.values())
    del images

    # 3. the flow, end to end, in its own process, with fp32 and with auto.
    incoming = work / "incoming"
    for index, path in enumerate(paths):
        link_or_copy(path, incoming / f"{index:05d}{path.suffix}")
    flows, peaks = {}, {}
    for engine in ("fp32", "auto"):
        summary, peaks[engine] = flow_in_subprocess(str(incoming), str(work / f"results-{engine}"), store,
                                                    args.batch_size, args.chunk_size, engine)
        flows[engine] = summary["screened"] / summary["seconds"]
        print(f"  flow      {flows[engine]:7.2f} img/s end to end, --engine {engine} -> {summary['engine']} "
              f"({summary['screened']} images in {summary['seconds']:.1f} s), peak RSS {peaks[engine]:.0f} MiB")
        if engine == "auto":
            chosen = summary["engine"]
            print(f"            {summary['engine_reason']}")

    print()
    if ceilings:
        fp32 = flows["fp32"]
        print(f"fp32 flow / fp32 ceiling = {fp32 / ceilings['fp32']:.2f} (target >= 0.85): "
              f"{'met' if fp32 / ceilings['fp32'] >= 0.85 else 'NOT met'}")
        if naive:
            print(f"fp32 flow / naive        = {fp32 / naive:.2f} (target >= 1.7, against the faster naive loop): "
                  f"{'met' if fp32 / naive >= 1.7 else 'NOT met'}")
        bound = min(ceilings[chosen], decode_ceiling)
        print(f"auto flow / min({chosen} ceiling, decode ceiling) = {flows['auto'] / bound:.2f} (target >= 0.85; "
              f"{chosen}: the engine auto chose among those that passed the gate)")
    print(f"auto flow / fp32 flow    = {flows['auto'] / flows['fp32']:.2f} (target >= 4 on a CPU with bf16 units, "
          f"never below 1 elsewhere)")

    if args.fullsize and FULLSIZE.is_dir():
        # (b) full-size originals (up to 4280x3520), each listed many times under other names.
        originals = sorted(p for p in FULLSIZE.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        big = work / "incoming-fullsize"
        for index in range(args.fullsize):
            source = originals[index % len(originals)]
            link_or_copy(source, big / f"{index:05d}{source.suffix}")
        started = time.perf_counter()
        load_images([str(p) for p in sorted(big.iterdir())], spec)
        print(f"\n(b) {args.fullsize} full-size inputs ({len(originals)} originals from {FULLSIZE}):")
        print(f"  decode    {args.fullsize / (time.perf_counter() - started):7.2f} img/s (full decode)")
        for engine in ("fp32", "auto"):
            summary, peak = flow_in_subprocess(str(big), str(work / f"results-fullsize-{engine}"), store,
                                               args.batch_size, args.chunk_size, engine)
            print(f"  flow      {summary['screened'] / summary['seconds']:7.2f} img/s end to end, --engine {engine} -> "
                  f"{summary['engine']}, peak RSS {peak:.0f} MiB")

    if args.repeat > 1:
        many = work / f"incoming-x{args.repeat}"
        for copy in range(args.repeat):
            for index, path in enumerate(paths):
                link_or_copy(path, many / f"copy-{copy:02d}" / f"{index:05d}{path.suffix}")
        summary_many, peak_many = flow_in_subprocess(str(many), str(work / "results-many"), store,
                                                     args.batch_size, args.chunk_size)
        growth = peak_many / peaks["auto"] - 1
        print(f"x{args.repeat} inputs: {summary_many['screened']} images at "
              f"{summary_many['screened'] / summary_many['seconds']:.2f} img/s, peak RSS {peak_many:.0f} MiB vs "
              f"{peaks['auto']:.0f} MiB: {growth:+.1%} (target < +20%): {'met' if growth < 0.2 else 'NOT met'}")


def explanation_case(args: argparse.Namespace, paths: list[Path], work: Path) -> None:
    """What explanations cost a night, with a model that flags most of what it sees: the flow end to
    end with --explain none, flagged and all, on fp32 and on auto, per seed; and, with --before, the
    same bundle and inputs screened by another revision's flow (auto, flagged). auto's first run per
    model times the engines (as a machine's first night does); the others use the speeds it kept.
    Targets: flagged >= 0.85 x none on the same engine; auto with explanations >= 1.8x fp32 with
    explanations on a CPU with bf16 units."""
    incoming = work / "incoming-explain"
    for index, path in enumerate(paths[: args.explain_images]):
        link_or_copy(path, incoming / f"{index:05d}{path.suffix}")
    before = None
    if args.before:
        before = work / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
    print(f"explanation case: {args.explain_images} inputs, {args.input_size} px, weights none, {args.epochs} epochs, "
          f"seeds {args.explain_seeds}{f', stores {args.explain_stores}' if args.explain_stores else ''}"
          f"{f', before = {args.before}' if before else ''}")
    ratios: dict[str, list[float]] = {"fp32 flagged/none": [], "auto flagged/none": [], "auto/fp32 flagged": [],
                                      "auto/before flagged": [], "auto timing/fp32 flagged": []}
    # auto keeps the engine speeds it measured (screening/engine_speeds.py); per model, the first auto
    # run measures them, as the first night on a machine does, and the others use what it kept.
    speeds_file = work / "engine-speeds.json"
    os.environ["CXR_ENGINE_SPEEDS"] = str(speeds_file)
    try:
        models = [(f"seed {seed}", str(work / f"models-{seed}"), seed) for seed in args.explain_seeds]
        models += [(f"store {store}", store, None) for store in args.explain_stores]
        for name, store, seed in models:
            if seed is not None:
                _, seconds = train_store(store, args.data, args.input_size, args.epochs, args.fine_tune_epochs, seed)
            card = registry.load_card(store)
            print(f"\n{name}: {card.version}" + (f", trained in {seconds:.0f} s" if seed is not None else ""))
            for check in json.loads(storage.read_bytes(storage.join(store, card.version, "engines.json")))[
                    "checks"].values():
                print(f"  check     {EngineCheck(**check).summary}: {'passes' if check['passed'] else 'FAILS'}")
            speeds = {}
            speeds_file.unlink(missing_ok=True)
            runs = [("auto", "flagged", ROOT, "auto flagged (timing)")]
            runs += [(engine, explain, ROOT, f"{engine} {explain}") for engine in ("fp32", "auto")
                     for explain in ("none", "flagged", "all")]
            runs += [("auto", "flagged", before, "before auto flagged")] if before else []
            for engine, explain, code, label in runs:
                results = str(work / f"results-{name.replace(' ', '-').replace('/', '_')}-{label.replace(' ', '-')}")
                summary, _ = flow_in_subprocess(str(incoming), results, store, args.batch_size, args.chunk_size,
                                                engine, explain, code_from=code)
                speeds[label] = summary["screened"] / summary["seconds"]
                print(f"  {label:<22} {speeds[label]:6.2f} img/s -> {summary['engine']}, "
                      f"{summary['flagged']} of {summary['screened']} flagged", flush=True)
                if code == ROOT and explain == "flagged" and engine == "auto":
                    print(f"  {'':<22} {summary['engine_reason']}")
            ratios["fp32 flagged/none"].append(speeds["fp32 flagged"] / speeds["fp32 none"])
            ratios["auto flagged/none"].append(speeds["auto flagged"] / speeds["auto none"])
            ratios["auto/fp32 flagged"].append(speeds["auto flagged"] / speeds["fp32 flagged"])
            ratios["auto timing/fp32 flagged"].append(speeds["auto flagged (timing)"] / speeds["fp32 flagged"])
            if before:
                ratios["auto/before flagged"].append(speeds["auto flagged"] / speeds["before auto flagged"])
    finally:
        if before:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True,
                           check=False)
    print("\nratios per seed (same run, same bundle and inputs):")
    for name, values in ratios.items():
        if values:
            print(f"  {name:<26} {' '.join(f'{value:.2f}' for value in values)}")
    print("targets: flagged/none >= 0.85 on each engine; auto/fp32 with explanations >= 1.8 on a CPU with bf16 units")


if __name__ == "__main__":
    main()
