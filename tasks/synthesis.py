"""Prefect tasks of the synthesize flow (#14): the GAN trained on the training split, its images
measured (fidelity, memorisation), the gate, and the generator bundle and synthetic dataset written."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from model.bundle import BundleError, software_versions
from model.gan import GanConfig, Generator, generate, generator_to_files, train_gan
from model.gan_quality import (
    FeatureFunction,
    fd_against_floor,
    memorisation_check,
    vgg16_features,
)
from model.network import build_base
from model.plots import samples_png
from model.preprocessing import Preprocessing
from store import storage
from store.datasets import Dataset, DatasetError, fingerprint
from store.generators import GeneratorCard, publish_generator
from store.synthetic_data import encode_images, write_images, write_manifest
from tasks.retrying import io_step
from tasks.train_data import LabelledArrays, TrainingSplit
from tasks.train_fit import EpochReporter

__all__ = ["GeneratorRefused", "Quality", "Synthesis", "check_request", "describe_generator", "gray_training_images",
           "measure_quality", "overlapping", "publish_synthesis", "refuse_if_memorised", "report_synthesis", "train_generator"]

# A class needs this many training images from at least two patients for the checks to mean anything
# (the floor compares two halves; real-to-real neighbours skip the image's own patient).
MIN_CLASS_IMAGES = 4
SAMPLE_COLUMNS = 8


class GeneratorRefused(BundleError):
    """The generator's images are closer to real training images than those are to each other."""


@dataclass(frozen=True)
class Quality:
    """What was measured of a generator: per class its Fréchet distance against the floor and the
    memorisation report (JSON-ready), the verdict, and the samples sheet."""

    classes: dict[str, dict]
    feature_space: dict
    passed: bool
    reasons: tuple[str, ...]
    samples_png: bytes

    def to_dict(self) -> dict:
        return {"feature_space": self.feature_space, "passed": self.passed, "reasons": list(self.reasons),
                "classes": self.classes}


@dataclass(frozen=True)
class Synthesis:
    """What the synthesize flow returns."""

    version: str
    bundle_uri: str
    dataset_uri: str
    manifest_uri: str
    synthetic_class: str
    count: int
    quality: Quality


@task(**io_step(retry_delay_seconds=5))
def check_request(dataset: Dataset, synthetic_class: str, out_uri: str, store_uri: str) -> None:
    """Fail before any training: two classes at least, ``synthetic_class`` among them; ``out_uri``
    apart from the dataset (images written inside it would be read back as real ones), empty, and
    writable, as the generator store is (a write that fails after training wastes the GPU hours)."""
    if len(dataset.classes) < 2:
        raise DatasetError(f"{dataset.uri}: one class only ({', '.join(dataset.classes)}): the GAN's checks and "
                           "class balancing need at least two")
    if synthetic_class not in dataset.classes:
        raise DatasetError(f"{dataset.uri}: no class {synthetic_class!r} to synthesise (classes: "
                           f"{', '.join(dataset.classes)})")
    if overlapping(out_uri, dataset.uri):
        raise DatasetError(f"--out {out_uri} and the dataset {dataset.uri} overlap (one lies inside the other): "
                           "synthetic images there would be read as real ones; choose an --out outside the dataset")
    found = next(iter(storage.list_files(out_uri, missing_ok=True)), None)
    if found is not None:
        raise DatasetError(f"--out {out_uri} holds files already (e.g. {found}): choose an empty location")
    for location in (out_uri, store_uri):
        probe = storage.join(location, f".cxr-write-check-{secrets.token_hex(4)}")
        storage.write_bytes(probe, b"")
        storage.delete(probe)


def overlapping(first: str, second: str) -> bool:
    """Whether two locations are the same or one lies inside the other, after normalising (absolute
    local paths with links resolved, no trailing '/'); locations of different schemes never overlap."""
    a, b = storage.canonical(first), storage.canonical(second)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def gray_training_images(loaded: LabelledArrays, split: TrainingSplit) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training split's images as grayscale uint8 ``(n, s, s)``, their class indices and
    patients. Validation and test rows are never touched."""
    images = np.stack([cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in loaded.images[split.train]])
    labels = split.labels[split.train]
    patients = [split.patients[row] for row in split.train]
    for index, name in enumerate(split.classes):
        inside = labels == index
        if inside.sum() < MIN_CLASS_IMAGES or len({p for p, i in zip(patients, inside) if i}) < 2:
            raise DatasetError(f"the training split holds {int(inside.sum())} image(s) of class {name!r}: the GAN and "
                               f"its checks need at least {MIN_CLASS_IMAGES} from two patients per class")
    return images, labels, patients


@task(cache_policy=NO_CACHE)
def train_generator(images: np.ndarray, labels: np.ndarray, classes: list[str], config: GanConfig) -> Generator:
    logger = get_run_logger()
    started = time.perf_counter()
    logger.info("Training the GAN on %d training-split images (%s) at %d px for %d epochs", len(images),
                ", ".join(f"{name} {int((labels == i).sum())}" for i, name in enumerate(classes)), config.image_size,
                config.epochs)
    generator = train_gan(images, labels, config, num_classes=len(classes),
                          callbacks=[EpochReporter("GAN", config.epochs, config.epochs)])
    logger.info("GAN trained in %.0f s", time.perf_counter() - started)
    return generator


def _cached(features: FeatureFunction) -> FeatureFunction:
    """``features`` computed once per distinct image: the checks ask for the same real images'
    features several times (halves for the floor, the whole class for neighbours)."""
    memo: dict[bytes, np.ndarray] = {}

    def cached(images: np.ndarray) -> np.ndarray:
        keys = [hashlib.sha1(image.tobytes()).digest() for image in images]
        todo = list({key: index for index, key in enumerate(keys) if key not in memo}.items())
        if todo:
            for (key, _), vector in zip(todo, features(images[[index for _, index in todo]])):
                memo[key] = vector
        return np.stack([memo[key] for key in keys]) if keys else features(images)

    return cached


@task(cache_policy=NO_CACHE)
def measure_quality(generator: Generator, images: np.ndarray, labels: np.ndarray, patients: list[str],
                    classes: list[str], target: str, published: np.ndarray, weights: str | None, weights_origin: str,
                    input_size: int, seed: int) -> Quality:
    """Per class: the FD of generated images to the real training images against the real-halves
    floor, and the memorisation check (in pixels and features, real-to-real skipping the image's
    own patient). The published images are checked with the target class; every other class with
    as many images as it has real ones, since the generator is published and can make any class."""
    logger = get_run_logger()
    spec = Preprocessing(input_size=input_size)
    features = _cached(vgg16_features(build_base(input_size, weights, seed), spec))
    size = generator.config.image_size
    if images.shape[1] != size:
        images = np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for image in images])
    found, reasons, sheet_synthetic, sheet_real = {}, [], {}, {}
    for index, name in enumerate(classes):
        inside = labels == index
        real = images[inside]
        measured = generate(generator, index, len(real), seed=seed + 1 + index)
        checked = np.concatenate([published, measured]) if name == target else measured
        fidelity = fd_against_floor(measured, real, features, seed)
        report = memorisation_check(checked, real, features, patients=np.array(patients)[inside])
        found[name] = {"train_images": int(inside.sum()), **fidelity, "memorisation": report.to_dict()}
        reasons += [f"{name}: {reason}" for reason in report.reasons]
        sheet_synthetic[name] = (published if name == target else measured)[:SAMPLE_COLUMNS]
        sheet_real[name] = real[:SAMPLE_COLUMNS]
        logger.info("%s: FD %.4g against a floor of %.4g (%d images a side); memorisation check %s", name,
                    fidelity["fd"], fidelity["floor"], fidelity["images"], "passed" if report.passed else "FAILED")
    return Quality(found, {"base": "vgg16 pooled", "weights": weights_origin, "input_size": input_size},
                   not reasons, tuple(reasons), samples_png(sheet_synthetic, sheet_real, columns=SAMPLE_COLUMNS))


@task
def refuse_if_memorised(quality: Quality, dataset_uri: str) -> None:
    """The gate: a generator some of whose images are closer to a patient's image than patients'
    images are to each other is not published (copies of patients' images are a privacy leak)."""
    if quality.passed:
        return
    _quality_artifacts(quality, "Generator REFUSED: not published")
    raise GeneratorRefused(f"generator refused, nothing published: its images are copies or near copies of "
                           f"training images of {dataset_uri}: " + "; ".join(quality.reasons))


def describe_generator(version: str, generator: Generator, quality: Quality, dataset: Dataset, loaded: LabelledArrays,
                       split: TrainingSplit, test_fraction: float, seed: int, target: str, count: int, out_uri: str,
                       created_at: str) -> GeneratorCard:
    """The generator's card before publishing (no file digests yet): built once, outside the
    publishing step, so that a retried step writes the very same card."""
    labels = split.labels[split.train]
    return GeneratorCard(
        version=version, classes=list(split.classes), config=generator.config.to_dict(),
        dataset={"uri": dataset.uri, "split_seed": seed, "test_fraction": test_fraction,
                 "train_fingerprint": fingerprint([loaded.items[row] for row in split.train]),
                 "train_images": {name: int((labels == i).sum()) for i, name in enumerate(split.classes)}},
        quality=quality.to_dict(), synthesized={"class": target, "count": count, "seed": seed, "dataset_uri": out_uri},
        software=software_versions(), created_at=created_at)


@task(**io_step(retries=3, retry_delay_seconds=5))
def publish_synthesis(store_uri: str, out_uri: str, card: GeneratorCard, generator: Generator, quality: Quality,
                      published: np.ndarray) -> Synthesis:
    """Nothing usable is published unless everything is: the images (no dataset without their
    manifest), then the generator bundle whose card records every image's sha256 (card.json last),
    then manifest.csv last of all. Each write accepts its own earlier bytes, so a retry completes a
    half-done publication. Refuses a generator that failed the gate, whoever calls it."""
    if not quality.passed:
        raise GeneratorRefused("generator refused, nothing published: " + "; ".join(quality.reasons))
    target, seed = card.synthesized["class"], card.synthesized["seed"]
    images = encode_images(target, published, card.version, seed)
    write_images(out_uri, images)
    card = replace(card, synthesized={**card.synthesized, "images": {name: hashlib.sha256(data).hexdigest()
                                                                     for name, data in images.items()}})
    files = {**generator_to_files(generator), "samples.png": quality.samples_png,
             "quality.json": _json_bytes(quality.to_dict()), "card.md": _card_markdown(card).encode()}
    bundle_uri = publish_generator(store_uri, card, files)
    manifest_uri = write_manifest(out_uri, target, images, card.version, seed, card.dataset["split_seed"],
                                  card.dataset["test_fraction"], card.dataset["train_fingerprint"],
                                  storage.join(store_uri))  # absolute: train may run from another folder
    return Synthesis(card.version, bundle_uri, out_uri, manifest_uri, target, int(len(published)), quality)


def _json_bytes(data: dict) -> bytes:
    import json

    return json.dumps(data, indent=2, sort_keys=True).encode()


def _fidelity_rows(quality: Quality) -> list[dict]:
    rows = []
    for name, found in quality.classes.items():
        spaces = found["memorisation"]["spaces"]
        rows.append({"class": name, "train images": found["train_images"], "FD": round(found["fd"], 4),
                     "floor (real halves)": round(found["floor"], 4),
                     "FD / floor": None if found["ratio"] is None else round(found["ratio"], 2),
                     **{f"NN q05 {space} synthetic / real": f"{values['synthetic_to_real']['q05']:.4g} / "
                                                           f"{values['real_to_real']['q05']:.4g}"
                        for space, values in spaces.items()},
                     "memorisation": "passed" if found["memorisation"]["passed"] else "FAILED"})
    return rows


def _card_markdown(card: GeneratorCard) -> str:
    lines = [f"# Generator card: {card.version}", "",
             "A class-conditional GAN trained on the training split only (never validation or test images) of "
             f"{card.dataset['uri']} (split seed {card.dataset['split_seed']}, test fraction "
             f"{card.dataset['test_fraction']}, training-split fingerprint `{card.dataset['train_fingerprint'][:16]}`).",
             "Synthetic images are for balancing classes in training; they are not patients and must never be "
             "used for validation, testing or clinical decisions.", "",
             f"Classes: {', '.join(card.classes)}. Synthesised: {card.synthesized['count']} x "
             f"{card.synthesized['class']} (seed {card.synthesized['seed']}) to {card.synthesized['dataset_uri']}.", "",
             "| class | train images | FD | floor | FD / floor | memorisation |", "|---|---|---|---|---|---|"]
    for name, found in card.quality["classes"].items():
        ratio = "n/a" if found["ratio"] is None else f"{found['ratio']:.2f}"
        lines.append(f"| {name} | {found['train_images']} | {found['fd']:.4g} | {found['floor']:.4g} | {ratio} | "
                     f"{'passed' if found['memorisation']['passed'] else 'FAILED'} |")
    lines += ["", f"Feature space: {card.quality['feature_space']}. FD and floor at the same numbers of images; "
              "a ratio near 1 is as close to real as can be told.", ""]
    return "\n".join(lines)


def _quality_artifacts(quality: Quality, title: str, links: str = "") -> None:
    create_table_artifact(_fidelity_rows(quality), key="generator-quality",
                          description="Fréchet distance per class against the real-halves floor; nearest-neighbour "
                                      "distances (5% quantile) of synthetic and of real images")
    picture = base64.b64encode(quality.samples_png).decode()
    reasons = "".join(f"\n- {reason}" for reason in quality.reasons)
    create_markdown_artifact(key="generator-samples", description=title,
                             markdown=f"# {title}\n{reasons}\n\n{links}Real (upper row) and synthetic (lower row) "
                                      f"images per class:\n\n![samples.png](data:image/png;base64,{picture})\n")


@task
def report_synthesis(synthesis: Synthesis) -> None:
    """Log line, the quality table and the samples sheet in the Prefect UI."""
    from screening.reports import shared_link

    get_run_logger().info("Generator %s written to %s; %d synthetic %s images in %s", synthesis.version,
                          synthesis.bundle_uri, synthesis.count, synthesis.synthetic_class, synthesis.dataset_uri)
    link = shared_link(storage.join(synthesis.bundle_uri, "samples.png"))
    links = (f"Generator bundle: {synthesis.bundle_uri}" + (f" ([samples.png]({link.href}))" if link else "") +
             f"\n\nSynthetic dataset: {synthesis.dataset_uri}\n\n")
    _quality_artifacts(synthesis.quality, f"Generator {synthesis.version}", links)
