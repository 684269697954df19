"""The synthesize flow (#14) end to end on phantoms, into a folder and into a moto S3 server over
HTTP; train --synthetic keeps validation and test real; the memorisation gate refuses a generator
that hands back training images; the command line's exit codes.

Tiny settings throughout (64 px GAN of width 8, a few epochs, a handful of images, an untrained 32 px feature
base): the flow and the checks are under test here, not the GAN's quality (tests/test_gan.py)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

from flows.parameters import SynthesizeParameters, TrainParameters
from flows.synthesize import synthesize
from flows.train import train
from model.bundle import BundleError
from model.gan import Generator
from store import storage
from store.datasets import DatasetError, discover_dataset, fingerprint, hash_images, split_dataset
from store.generators import GeneratorCard, load_generator
from store.phantoms import write_phantom_dataset
from store.synthetic_data import synthetic_origin, write_synthetic_dataset
from tests.conftest import flow_run_artifacts

SEED = 3
TINY = dict(count=6, image_size=64, epochs=2, width=8, batch_size=8, weights="none", input_size=32, seed=SEED)
TRAIN_SMALL = dict(input_size=32, weights="none", epochs=3, augment_draws=1, batch_size=8, bootstrap=100, seed=SEED)
BUNDLE = {"generator.keras", "gan.json", "samples.png", "quality.json", "card.md", "card.json"}


def phantoms(uri: str) -> str:
    """16 normal and 10 covid phantoms: covid is the training split's minority class."""
    written = write_phantom_dataset(uri, per_class=16, size=64, seed=SEED)
    for extra in [name for name in written if "/covid/" in name][10:]:
        storage.delete(extra)
    return uri


def real_split(dataset_uri: str):
    """train's split, rebuilt here from the split function alone: (training part, validation, test)."""
    items = hash_images(discover_dataset(dataset_uri).items)
    split = split_dataset(items, 0.2, SEED)
    fit = split_dataset(split.train, 0.2, SEED + 1)
    return fit.train, fit.test, split.test


def manifest_rows(dataset_uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(dataset_uri, "manifest.csv")).decode())))


def files_under(uri: str) -> set[str]:
    return {storage.relative_to(found, uri) for found in storage.list_files(uri, missing_ok=True)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return phantoms(str(tmp_path_factory.mktemp("synth") / "dataset"))


@pytest.mark.slow
def test_synthesize_to_a_folder_then_train_keeps_validation_and_test_real(prefect_api, dataset, tmp_path):
    out, store = str(tmp_path / "synthetic"), str(tmp_path / "generators")
    state = synthesize(SynthesizeParameters(dataset_uri=dataset, out_uri=out, generator_store_uri=store, **TINY),
                       return_state=True)
    result = state.result()

    # The generator learned from train's training part, no validation or test image.
    training, validation, test = real_split(dataset)
    generator, card = load_generator(store, result.version)
    assert card.dataset["train_fingerprint"] == fingerprint(training)
    assert card.dataset["train_images"] == {"covid": sum(i.label == "covid" for i in training),
                                            "normal": sum(i.label == "normal" for i in training)}
    assert files_under(result.bundle_uri) == BUNDLE
    assert storage.read_bytes(storage.join(result.bundle_uri, "samples.png")).startswith(b"\x89PNG")
    assert generator.config.image_size == 64 and card.classes == ["covid", "normal"]
    for name in ("covid", "normal"):  # FD against its floor at equal numbers of images, per class
        found = card.quality["classes"][name]
        assert found["fd"] > 0 and found["floor"] > 0 and found["images"] >= 2
        assert found["memorisation"]["passed"] and "features" in found["memorisation"]["spaces"]

    rows = manifest_rows(out)
    assert len(rows) == 6 and {row["class"] for row in rows} == {"covid"}
    assert {(row["synthetic"], row["generator_version"], row["seed"]) for row in rows} == {("true", result.version, "3")}
    image = cv2.imdecode(np.frombuffer(storage.read_bytes(storage.join(out, rows[0]["file"])), np.uint8),
                         cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64)  # grayscale, at the generator's size
    assert discover_dataset(out).class_counts == {"covid": 6}  # the dataset loader reads it
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert "data:image/png;base64," in artifacts["generator-samples"].data
    assert {"generator-quality", "training-progress"} <= artifacts.keys()

    # train --synthetic: the synthetic images join the training part only.
    trained = train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"), synthetic_uri=out,
                                    synthetic_share=0.3, **TRAIN_SMALL))
    recorded = trained.card.dataset
    real_covid = sum(item.label == "covid" for item in training)
    assert recorded["synthetic"]["count"] == min(6, math.floor(0.3 / 0.7 * real_covid)) > 0
    assert recorded["synthetic"]["uri"] == out and recorded["synthetic"]["generator_versions"] == [result.version]
    assert recorded["synthetic"]["share"] == 0.3 and recorded["synthetic"]["class"] == "covid"
    # The actual validation and test parts are the real-only ones, image for image (content and label).
    assert recorded["validation_fingerprint"] == fingerprint(validation)
    assert recorded["test_fingerprint"] == fingerprint(test)
    # The generator's card vouches for every image: its sha256 recorded at publishing.
    assert card.synthesized["images"] == {
        row["file"]: hashlib.sha256(storage.read_bytes(storage.join(out, row["file"]))).hexdigest() for row in rows}
    assert (recorded["train_images"], recorded["validation_images"], recorded["test_images"]) == (
        len(training), len(validation), len(test))
    assert "synthetic images (training part only)" in storage.read_bytes(
        storage.join(trained.bundle_uri, "card.md")).decode()
    # Another seed splits the patients otherwise: the generator may have seen this run's test patients.
    with pytest.raises(DatasetError, match="another training split"):
        train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"), synthetic_uri=out,
                              **{**TRAIN_SMALL, "seed": SEED + 1}))

    # Forged synthetic datasets: the unsigned manifest is not what is trusted, the generator's card is.
    test_covid = next(item for item in test if item.label == "covid")
    swapped = str(tmp_path / "swapped")  # a test image re-encoded in a synthetic image's place, manifest intact
    for row in rows:
        storage.write_bytes(storage.join(swapped, row["file"]), storage.read_bytes(storage.join(out, row["file"])))
    storage.write_bytes(storage.join(swapped, "manifest.csv"), storage.read_bytes(storage.join(out, "manifest.csv")))
    test_image = cv2.resize(cv2.imread(test_covid.uri, cv2.IMREAD_GRAYSCALE), (64, 64))
    storage.write_bytes(storage.join(swapped, rows[0]["file"]), cv2.imencode(".png", test_image)[1].tobytes())
    with pytest.raises(DatasetError, match=f"{rows[0]['file']}: sha256 differs"):
        train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"), synthetic_uri=swapped,
                              synthetic_share=0.3, **TRAIN_SMALL))
    forged = str(tmp_path / "forged")  # the guessable fingerprint and a generator that does not exist
    write_synthetic_dataset(forged, "covid", test_image[None], "vNO-SUCH-GENERATOR", SEED, SEED, 0.2,
                            fingerprint(training), store)
    with pytest.raises(BundleError, match="no such generator version"):
        train(TrainParameters(dataset_uri=dataset, model_store_uri=str(tmp_path / "models"), synthetic_uri=forged,
                              synthetic_share=0.3, **TRAIN_SMALL))


@pytest.mark.slow
def test_synthesize_to_s3_signed(prefect_api, s3_bucket, monkeypatch):
    monkeypatch.setenv("CXR_MODEL_SIGNING_KEY", "a-test-signing-key-of-some-length")
    dataset = phantoms(f"{s3_bucket}/dataset")
    params = SynthesizeParameters(dataset_uri=dataset, out_uri=f"{s3_bucket}/synthetic/{{version}}",
                                  generator_store_uri=f"{s3_bucket}/generators", **TINY)
    result = synthesize(params)

    assert result.dataset_uri == f"{s3_bucket}/synthetic/{result.version}"
    assert files_under(result.bundle_uri) == BUNDLE | {"card.json.sig"}
    assert discover_dataset(result.dataset_uri).class_counts == {"covid": 6}
    assert load_generator(f"{s3_bucket}/generators", result.version)[1].version == result.version
    monkeypatch.setenv("CXR_MODEL_SIGNING_KEY", "another-key-another-key-another")
    with pytest.raises(BundleError, match="does not match"):
        load_generator(f"{s3_bucket}/generators", result.version)


class _Copier(keras.Model):
    """A 'generator' that hands back training images of the asked class: what memorisation looks like."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        super().__init__()
        per_class = [images[labels == label] for label in range(num_classes)]
        most = max(len(found) for found in per_class)
        table = np.stack([np.resize(found, (most, *found.shape[1:])) for found in per_class])
        self.table = tf.constant(table.astype(np.float32)[..., None] / 127.5 - 1.0)
        self.counts = tf.constant([len(found) for found in per_class])

    def call(self, inputs, training=False):
        noise, labels = inputs
        labels = tf.cast(labels, tf.int32)
        picks = tf.math.floormod(tf.cast(tf.abs(noise[:, 0]) * 1000.0, tf.int32), tf.gather(self.counts, labels))
        return tf.gather_nd(self.table, tf.stack([labels, picks], axis=1))


def test_memorisation_gate_refuses_a_copying_generator_through_the_cli(prefect_api, dataset, tmp_path, monkeypatch):
    from cli import lifeline, main
    from tasks import synthesis

    def copying_gan(images, labels, config, num_classes=None, callbacks=()):
        return Generator(_Copier(images, labels, num_classes), config, num_classes)

    monkeypatch.setattr(synthesis, "train_gan", copying_gan)
    monkeypatch.setattr(lifeline, "arm", lambda: None)  # the watchdog is for a command line's own process
    out, store = tmp_path / "synthetic", tmp_path / "generators"
    result = CliRunner().invoke(main.app, ["synthesize", dataset, "--class", "covid", "--count", "6", "--out", str(out),
                                          "--generator-store", str(store), "--image-size", "64", "--epochs", "1",
                                          "--width", "8", "--weights", "none", "--input-size", "32", "--seed", "3"])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "error: generator refused, nothing published" in text and "covid: pixels" in text, text
    assert not files_under(str(store)) and not files_under(str(out))  # no bundle, no image, no manifest


def test_cli_exit_codes(prefect_api, dataset, tmp_path, monkeypatch):
    from cli import lifeline, main

    monkeypatch.setattr(lifeline, "arm", lambda: None)
    runner = CliRunner()
    usage = runner.invoke(main.app, ["synthesize", dataset, "--out", str(tmp_path / "o"), "--count", "0"])
    assert usage.exit_code == 2 and "--count" in usage.output
    usage = runner.invoke(main.app, ["train", dataset, "--synthetic", str(tmp_path / "o"), "--synthetic-share", "1"])
    assert usage.exit_code == 2 and "--synthetic-share" in usage.output
    usage = runner.invoke(main.app, ["train", dataset, "--synthetic-share", "0.2", "--weights", "none"])
    assert usage.exit_code == 2 and "only with --synthetic" in usage.output, usage.output
    missing = runner.invoke(main.app, ["synthesize", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                                      "--weights", "none"])
    assert missing.exit_code == 3 and "nowhere" in missing.output
    absent_class = runner.invoke(main.app, ["synthesize", dataset, "--class", "viral", "--out", str(tmp_path / "o"),
                                           "--weights", "none"])
    assert absent_class.exit_code == 3 and "no class 'viral'" in " ".join(absent_class.output.split())
    # A real dataset is not a synthetic one: refused before its images are used in training.
    not_synthetic = runner.invoke(main.app, ["train", dataset, "--synthetic", dataset, "--model-store",
                                            str(tmp_path / "models"), "--weights", "none", "--input-size", "32"])
    assert not_synthetic.exit_code == 3 and "not a synthetic dataset" in " ".join(not_synthetic.output.split())


def test_check_request_refuses_an_out_overlapping_the_dataset_a_used_out_and_one_class(prefect_api, dataset, tmp_path,
                                                                                         monkeypatch, s3_bucket):
    from cli import lifeline, main
    from tasks.synthesis import check_request

    monkeypatch.setattr(lifeline, "arm", lambda: None)
    store = str(tmp_path / "generators")
    inside = CliRunner().invoke(main.app, ["synthesize", dataset, "--class", "covid", "--out", f"{dataset}/covid/synth",
                                          "--generator-store", store, "--weights", "none"])
    text = " ".join(inside.output.split())
    assert inside.exit_code == 3 and f"{dataset}/covid/synth" in text and "overlap" in text, text
    real = discover_dataset(dataset)
    for out in (dataset, f"{dataset}/", str(Path(dataset).parent), f"{dataset}/../{Path(dataset).name}/synth"):
        with pytest.raises(DatasetError, match="overlap"):
            check_request.fn(real, "covid", out, store)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("someone's")
    with pytest.raises(DatasetError, match="holds files already"):
        check_request.fn(real, "covid", str(used), store)
    check_request.fn(real, "covid", str(tmp_path / "fresh"), store)  # apart, empty, writable: accepted
    assert not files_under(str(tmp_path / "fresh")) and not files_under(store)  # the write checks leave nothing

    one_class = write_phantom_dataset(str(tmp_path / "one"), per_class=4, size=64, seed=SEED)
    for name in one_class:
        if "/covid/" not in name:
            storage.delete(name)
    with pytest.raises(DatasetError, match="one class only"):
        check_request.fn(discover_dataset(str(tmp_path / "one")), "covid", str(tmp_path / "o1"), store)

    # On S3 the same, by key prefix: data/x lies inside data, dataset does not.
    on_s3 = type(real)(f"{s3_bucket}/data", real.items, real.source, ())
    for out in (f"{s3_bucket}/data", f"{s3_bucket}/data/", f"{s3_bucket}/data/x", s3_bucket):
        with pytest.raises(DatasetError, match="overlap"):
            check_request.fn(on_s3, "covid", out, f"{s3_bucket}/generators")
    check_request.fn(on_s3, "covid", f"{s3_bucket}/dataset", f"{s3_bucket}/generators")


def test_publishing_leaves_nothing_usable_until_complete_and_a_retry_completes_it(tmp_path, monkeypatch):
    from model.gan import GanConfig, generate, init_generator
    from tasks.synthesis import GeneratorRefused, Quality, publish_synthesis

    generator = init_generator(2, GanConfig(image_size=64, width=8, epochs=1, seed=SEED))
    published = generate(generator, 0, 3, seed=SEED)
    quality = Quality({}, {}, True, (), b"\x89PNG")
    card = GeneratorCard(version="v1", classes=["covid", "normal"], config=generator.config.to_dict(),
                         dataset={"uri": "d", "split_seed": SEED, "test_fraction": 0.2, "train_fingerprint": "f" * 64},
                         quality={"passed": True, "classes": {}, "feature_space": {}},
                         synthesized={"class": "covid", "count": 3, "seed": SEED, "dataset_uri": "o"})
    out, store = str(tmp_path / "out"), str(tmp_path / "generators")

    refused = Quality({}, {}, False, ("covid: pixels: copies",), b"")
    with pytest.raises(GeneratorRefused, match="nothing published"):
        publish_synthesis.fn(store, out, card, generator, refused, published)
    assert not files_under(out) and not files_under(store)

    real_create = storage.create_if_absent

    def card_write_fails(uri: str, data: bytes) -> bool:
        if uri.endswith("card.json"):
            raise storage.StorageError(uri, "connection reset")  # transient: the step is retried
        return real_create(uri, data)

    monkeypatch.setattr(storage, "create_if_absent", card_write_fails)
    with pytest.raises(storage.StorageError):
        publish_synthesis.fn(store, out, card, generator, quality, published)
    assert "manifest.csv" not in files_under(out) and "v1/card.json" not in files_under(store)
    with pytest.raises(DatasetError, match="not a synthetic dataset"):  # what was written is unusable
        synthetic_origin(discover_dataset(out))
    monkeypatch.setattr(storage, "create_if_absent", real_create)
    first = publish_synthesis.fn(store, out, card, generator, quality, published)  # the retry completes it
    again = publish_synthesis.fn(store, out, card, generator, quality, published)  # and is idempotent
    assert first.bundle_uri == again.bundle_uri and synthetic_origin(discover_dataset(out)).generator_store == store
    assert sorted(load_generator(store, "v1")[1].synthesized["images"]) == sorted(
        name for name in files_under(out) if name.endswith(".png"))


def test_tampered_generator_card_and_non_utf8_manifest_are_refused_by_name(tmp_path):
    from store.generators import publish_generator

    store = str(tmp_path / "generators")
    folder = publish_generator(store, GeneratorCard(version="v1", classes=["a"], config={}, dataset={}, quality={}),
                               {"x.bin": b"abc"})
    original = json.loads(Path(folder, "card.json").read_text())
    for edit, message in [(lambda card: card.pop("classes"), "key 'classes' missing"),
                          (lambda card: card.__setitem__("quality", ["x"]), "'quality' is list"),
                          (lambda card: card["files"].__setitem__("x.bin", 5), "'files' must map")]:
        card = json.loads(json.dumps(original))
        edit(card)
        Path(folder, "card.json").write_text(json.dumps(card))
        with pytest.raises(BundleError, match=f"card.json: {message}"):
            load_generator(store, "v1")

    out = str(tmp_path / "synthetic")
    manifest = write_synthetic_dataset(out, "covid", np.zeros((1, 64, 64), np.uint8), "v1", 0, 0, 0.2, "f" * 64, store)
    original = Path(manifest).read_bytes()
    Path(manifest).write_bytes(original.replace(b"covid", b"cov\xffid", 1))
    with pytest.raises(DatasetError, match="manifest.csv: not UTF-8"):
        discover_dataset(out)
    for old, new, message in [(b",0.2,", b",nan,", "not a fraction"), (b",v1,", b",,", "without generator_version")]:
        Path(manifest).write_bytes(original.replace(old, new))
        with pytest.raises(DatasetError, match=message):
            synthetic_origin(discover_dataset(out))
