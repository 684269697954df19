"""Screening and training speed on an accelerator (#10's GPU part), all in one run:

1. ceilings: the product's predictors (model/inference.py) in fp32 and under ``mixed_bfloat16``, at
   batch sizes 16, 64 and 256, on images decoded beforehand; and the host's share of a prediction
   (uint8 to float, ``Predictor.predict``'s own preparation) alone;
2. decode ceiling: the product's decoder processes (imaging/sandbox.py, one per core as screening
   starts them) on the real images, full resolution and with libjpeg's reduced-resolution decode;
3. screening: reading and decoding on threads and decoder processes while the accelerator predicts,
   arranged as ``tasks.screen_chunks.screen_images`` does it (without Grad-CAM, ledger or storage, which
   need Prefect and boto3);
4. training: stage 1's frozen-base features, and one epoch of stage 2 (block5 fine-tuned, Adam), in
   fp32 and under ``mixed_bfloat16``.

It runs on any Keras 3 backend: TensorFlow (the product's) on a GPU worker, or JAX where TensorFlow
cannot be installed (the lent GPU machines hold JAX and have no network). The weights are random
(no ImageNet weights here): speed does not depend on them.

    .venv/bin/python bench/gpu_bench.py --data ../shared/data/cxr --fullsize ../shared/data/cxr-fullsize
    KERAS_BACKEND=jax python bench/gpu_bench.py --data DIR             # where JAX has the GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import model  # noqa: E402,F401  (first: sets TensorFlow's runtime options before TensorFlow loads)
from bench.machine import cpu_line  # noqa: E402
from imaging.decode import IMAGE_SUFFIXES  # noqa: E402
from imaging.defaults import DECODE_TIMEOUT_SECONDS  # noqa: E402
from imaging.sandbox import DecoderPool  # noqa: E402
from model.inference import make_predictor, with_base_policy  # noqa: E402
from model.network import build_classifier, unfreeze_top_block  # noqa: E402
from model.preprocessing import Preprocessing, scale  # noqa: E402

SPEC = Preprocessing()
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}


def accelerator() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        # float32 matrix products: JAX's default precision, like TensorFlow's, lets GPUs use TF32.
        return (f"JAX {jax.__version__}: " + ", ".join(f"{d.platform} {d.device_kind}" for d in jax.devices())
                + f"; default matmul precision {jax.config.jax_default_matmul_precision or 'default (TF32 on GPUs)'}")
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
        return f"TensorFlow {tf.__version__}: " + (", ".join(names) or "no GPU, CPU only")
    return backend


def image_paths(folder: Path) -> list[Path]:
    return sorted(p.resolve() for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def timed(work, minimum_seconds: float = 2.0) -> float:
    """Seconds per call of ``work`` (after one warm-up call), repeated for at least ``minimum_seconds``."""
    work()
    calls, started = 0, time.perf_counter()
    while True:
        work()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= minimum_seconds:
            return elapsed / calls


def decode_all(pool: DecoderPool, paths: list[Path], threads: int, reduced: bool) -> tuple[np.ndarray, float]:
    """Read and decode ``paths`` as screening does: threads read, decoder processes decode."""
    def load(path: Path):
        return pool.decode(path.read_bytes(), path.as_uri(), SPEC.input_size, DECODE_TIMEOUT_SECONDS, reduced).pixels

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as readers:
        pixels = [p for p in readers.map(load, paths) if p is not None]
    return np.stack(pixels), len(paths) / (time.perf_counter() - started)


def decode_sweep(paths: list[Path], counts: list[int]) -> None:
    """Decoder processes against img/s, and how busy the screening process itself is meanwhile
    (its CPU seconds per second: near 1.0, its own Python threads are the limit)."""
    for count in counts:
        pool = DecoderPool(count)
        try:
            decode_all(pool, paths[:count * 4], 2 * count, False)  # start them
            before, started = os.times(), time.perf_counter()
            _, speed = decode_all(pool, paths, 2 * count, False)
            after, wall = os.times(), time.perf_counter() - started
            busy = (after.user + after.system - before.user - before.system) / wall
            print(f"  {count:>2} decoder processes: {speed:8.1f} img/s; screening process {busy:.2f} CPU s/s", flush=True)
        finally:
            pool.close()


def ceilings(classifier: keras.Model, predictors: dict, images: np.ndarray, batches: tuple[int, ...]
             ) -> dict[tuple[str, int], float]:
    """img/s of ``Predictor.predict`` (uint8 pixels in, converted inside the graph), beside the former
    arrangement (converted to float32 on the host, then moved)."""
    speeds = {}
    for engine, predictor in predictors.items():
        on_floats = classifier if engine == "fp32" else with_base_policy(classifier, POLICIES[engine])
        for batch in batches:
            block = images[: max(4 * batch, 256)]
            seconds = timed(lambda: predictor.predict(block, batch))
            former = timed(lambda: [np.asarray(on_floats.predict_on_batch(
                np.ascontiguousarray(scale(part.astype(np.float32) / 255.0, SPEC)))) for part in _parts(block, batch)])
            speeds[engine, batch] = len(block) / seconds
            print(f"  {engine} batch {batch:>3}: {speeds[engine, batch]:8.1f} img/s "
                  f"(float32 prepared on the host: {len(block) / former:8.1f})", flush=True)
    return speeds


def _parts(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[start : start + size] for start in range(0, len(images), size)]


def _plain_decode(path: Path) -> int:
    import cv2

    pixels = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    return cv2.resize(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), (SPEC.input_size,) * 2,
                      interpolation=cv2.INTER_AREA).size


def plain_decode(paths: list[Path], processes: int) -> float:
    """img/s of bare OpenCV decoding in a process pool: what the isolation of imaging/sandbox.py costs."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as workers:
        list(workers.map(_plain_decode, paths[:processes], chunksize=1))  # start them
        started = time.perf_counter()
        list(workers.map(_plain_decode, paths, chunksize=8))
        return len(paths) / (time.perf_counter() - started)


def host_preparation(images: np.ndarray) -> float:
    block = images[:256]
    seconds = timed(lambda: np.ascontiguousarray(scale(block.astype(np.float32) / 255.0, SPEC)), 1.0)
    return len(block) / seconds


def screening(predictor, pool: DecoderPool, paths: list[Path], batch: int, threads: int) -> float:
    """img/s of read + decode + predict, decoding running ahead on ``threads`` while the model works."""

    def load(path: Path):
        return pool.decode(path.read_bytes(), path.as_uri(), SPEC.input_size, DECODE_TIMEOUT_SECONDS, False).pixels

    started, done, pending = time.perf_counter(), 0, []
    with ThreadPoolExecutor(threads) as readers:
        for pixels in readers.map(load, paths):
            if pixels is not None:
                pending.append(pixels)
            if len(pending) == batch:
                done += len(predictor.predict(np.stack(pending), batch))
                pending = []
    if pending:
        done += len(predictor.predict(np.stack(pending), batch))
    return done / (time.perf_counter() - started)


class EpochTimes(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = getattr(self, "seconds", []) + [time.perf_counter() - self.started]


def training(classifier: keras.Model, images: np.ndarray, batch: int) -> None:
    x = np.ascontiguousarray(scale(images.astype(np.float32) / 255.0, SPEC))
    y = keras.utils.to_categorical(np.arange(len(x)) % 2, 2)
    for engine, policy in POLICIES.items():
        tuned = with_base_policy(classifier, policy)
        base = tuned.get_layer("vgg16")
        block = x[:256]
        features = len(block) / timed(lambda: base.predict_on_batch(block), 1.0)
        unfreeze_top_block(tuned)
        tuned.compile(optimizer=keras.optimizers.Adam(1e-5), loss="categorical_crossentropy")
        clock = EpochTimes()
        tuned.fit(x, y, batch_size=batch, epochs=3, verbose=0, callbacks=[clock], shuffle=True)
        epoch = min(clock.seconds[1:])  # the first epoch compiles
        print(f"  {engine}: stage 1 features {features:8.1f} img/s; stage 2 epoch of {len(x)} images "
              f"{epoch:6.2f} s ({len(x) / epoch:7.1f} img/s; first epoch, compiling, {clock.seconds[0]:.1f} s)",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr")
    parser.add_argument("--fullsize", type=Path, default=ROOT.parent / "shared" / "data" / "cxr-fullsize")
    parser.add_argument("--inputs", type=int, default=4000, help="inputs screened per screening run (files repeated)")
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--decoders", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sweep", default="", help="only the decode sweep, over these decoder counts (e.g. 4,8,16)")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))

    print(cpu_line())
    print(f"Keras {keras.__version__} on {accelerator()}")
    paths = image_paths(args.data)
    if not paths:
        raise SystemExit(f"no images under {args.data}")
    if args.sweep:
        repeated = (paths * (args.inputs // len(paths) + 1))[: args.inputs]
        print(f"\nDecode sweep ({len(repeated)} inputs; bare OpenCV in {args.decoders} processes: "
              f"{plain_decode(repeated, args.decoders):.1f} img/s):")
        decode_sweep(repeated, [int(n) for n in args.sweep.split(",")])
        return
    threads = 2 * args.decoders  # reads wait on storage; decoders are the cores
    pool = DecoderPool(args.decoders)
    try:
        print(f"\nDecode ceiling ({args.decoders} decoder processes, {threads} reader threads), img/s:")
        decoded, _ = decode_all(pool, paths, threads, False)  # starts the decoders, fills the page cache
        repeated = (paths * (args.inputs // len(paths) + 1))[: args.inputs]
        for reduced in (False, True):
            _, speed = decode_all(pool, repeated, threads, reduced)
            print(f"  {args.data.name} ({len(paths)} files, {len(repeated)} inputs), reduced={reduced}: {speed:8.1f}")
        print(f"  bare OpenCV in {args.decoders} processes, no isolation: {plain_decode(repeated, args.decoders):8.1f}")
        big = image_paths(args.fullsize) if args.fullsize.is_dir() else []
        if big:
            big_repeated = (big * (200 // len(big) + 1))[:200]
            for reduced in (False, True):
                _, speed = decode_all(pool, big_repeated, threads, reduced)
                print(f"  {args.fullsize.name} ({len(big)} files, 200 inputs), reduced={reduced}: {speed:8.1f}")

        images = np.concatenate([decoded] * (1024 // len(decoded) + 1))[:1024]
        classifier = build_classifier(2, SPEC.input_size, weights=None, head="mlp")
        print(f"\nHost preparation alone (uint8 to float32): {host_preparation(images):8.1f} img/s")
        print("Forward-pass ceilings (Predictor.predict on decoded images):")
        predictors = {engine: make_predictor(classifier, SPEC, engine) for engine in POLICIES}
        speeds = ceilings(classifier, predictors, images, batches)
        print(f"\nScreening, read + decode + predict ({len(repeated)} inputs), img/s:")
        for engine, predictor in predictors.items():
            for batch in sorted({16, max(batches)}):
                speed = screening(predictor, pool, repeated, batch, threads)
                ceiling = speeds.get((engine, batch))
                of = f" ({speed / ceiling:.0%} of its ceiling)" if ceiling else ""
                print(f"  {engine} batch {batch:>3}: {speed:8.1f}{of}", flush=True)
        print(f"\nTraining ({args.train_images} images, batch 32):")
        training(classifier, images[: args.train_images], 32)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
