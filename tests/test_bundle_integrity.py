"""Nothing a model store returns is trusted: the card's schema, a manifest of every file, and an
optional HMAC signature of card.json (CXR_MODEL_SIGNING_KEY)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import keras
import pytest

from model.bundle import BundleError, ModelCard, model_to_bytes
from model.network import build_classifier
from model.preprocessing import Preprocessing
from store import registry, storage

KEY = "a signing key only the trainer and the screener know"


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    keras.utils.set_random_seed(0)
    return model_to_bytes(build_classifier(2, 32, None, head="mlp"))


def make_card(model: bytes, version: str = "v1", **changes) -> ModelCard:
    card = ModelCard(version=version, classes=["non-covid", "covid"], positive_class="covid", threshold=0.4,
                     preprocessing=Preprocessing(input_size=32).to_dict(), weights={"origin": "none"},
                     dataset={"uri": "/data"}, metrics={"positive": {"auc": 0.9}},
                     model_sha256=hashlib.sha256(model).hexdigest(), created_at="2026-11-27T00:00:00+00:00")
    return dataclasses.replace(card, **changes)


def bundle_files(model: bytes) -> dict[str, bytes]:
    return {"model.keras": model, "history.json": b'{"loss": [1.0]}', "curves.png": b"\x89PNG curves",
            "card.md": b"# Model card"}


def publish(store: str, model: bytes, version: str = "v1") -> str:
    folder = registry.publish(store, version, bundle_files(model), make_card(model, version))
    registry.set_production(store, version, "test")
    return folder


def card_values(model: bytes, **changes) -> dict:
    return {**json.loads(make_card(model).to_json()), **changes}


# --- the card's schema -------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"threshold": 1.5}, "threshold 1.5 is not in (0, 1)"),
    ({"threshold": 0}, "threshold 0 is not in (0, 1)"),
    ({"threshold": 1.0}, "threshold 1.0 is not in (0, 1)"),
    ({"threshold": float("nan")}, "NaN is not a number JSON allows"),  # refused by model.stored_json
    ({"threshold": 10**400}, "the integer 10000000000000000000... (401 characters) is beyond +-2**53"),
    ({"threshold": "0.5"}, "threshold '0.5' is not a number"),
    ({"threshold": True}, "threshold True is not a number"),
    ({"threshold": None}, "threshold None is not a number"),
    ({"classes": []}, "is not a list of two or more non-empty names"),
    ({"classes": ["covid"]}, "is not a list of two or more non-empty names"),
    ({"classes": "covid,normal"}, "is not a list of two or more non-empty names"),
    ({"classes": ["covid", ""]}, "is not a list of two or more non-empty names"),
    ({"classes": ["covid", 3]}, "is not a list of two or more non-empty names"),
    ({"classes": ["covid", "covid"]}, "names a class twice"),
    ({"positive_class": "pneumonia"}, "positive_class 'pneumonia' is not one of the classes"),
    ({"positive_class": ["covid"]}, "positive_class ['covid'] is not one of the classes"),
    ({"version": "../../elsewhere"}, "version '../../elsewhere' is not a safe name"),
    ({"version": 3}, "version 3 is not a safe name"),
    ({"preprocessing": [224]}, "preprocessing is list, not a JSON object"),
    ({"metrics": "great"}, "metrics is str, not a JSON object"),
    ({"validity": {"warnings": "one line"}}, "validity.warnings 'one line' is not a list of strings"),
    ({"model_sha256": "abc"}, "model_sha256 'abc' is not a sha256"),
    ({"files": {"../model.keras": "0" * 64}}, "files: '../model.keras' is not a bundle file name"),
    ({"files": {"card.json": "0" * 64}}, "files: 'card.json' is not a bundle file name"),
    ({"files": {"model.keras": "Z" * 64}}, "files: model.keras: 'ZZ"),
    ({"files": {"history.json": "0" * 64}}, "files: model.keras does not have the card's model_sha256"),
    ({"created_at": "last night"}, "created_at 'last night' is not an ISO 8601 time"),
])
def test_the_card_schema_refuses_what_screening_could_not_use(model_bytes, changes, message):
    data = json.dumps(card_values(model_bytes, **changes)).encode()
    with pytest.raises(BundleError) as raised:
        ModelCard.from_json(data, "s3://models/v1/card.json")
    assert str(raised.value).startswith("s3://models/v1/card.json: ") and message in str(raised.value)


def test_the_card_schema_keeps_what_it_does_not_know_out_and_still_loads(model_bytes):
    values = card_values(model_bytes, written_by_a_newer_version={"x": 1})
    del values["training"], values["files"]  # optional fields take their defaults
    card = ModelCard.from_json(json.dumps(values))
    assert card.threshold == 0.4 and card.files == {} and card.training == {}
    for data, message in ((b"{not json", "not a model card"), (b"\xff\xfe", "not a model card"),
                          (b"[1, 2]", "a JSON object was expected, found list"),
                          (json.dumps({"version": "v1"}).encode(), "classes, positive_class, threshold")):
        with pytest.raises(BundleError, match=message):
            ModelCard.from_json(data)


def test_the_registry_names_the_file_of_a_card_that_fails_its_schema(tmp_path, model_bytes):
    store = str(tmp_path / "models")
    publish(store, model_bytes)
    uri = storage.join(store, "v1", "card.json")
    storage.write_bytes(uri, json.dumps({**json.loads(storage.read_bytes(uri)), "threshold": 1.5}).encode())
    with pytest.raises(BundleError, match=f"^{uri}: threshold 1.5 is not in \\(0, 1\\)$"):
        registry.load_card(store)


def test_a_card_must_lie_in_the_folder_of_its_version(tmp_path, model_bytes):
    store = str(tmp_path / "models")
    publish(store, model_bytes)
    for name in ("model.keras", "card.json"):
        storage.write_bytes(storage.join(store, "v2", name), storage.read_bytes(storage.join(store, "v1", name)))
    with pytest.raises(BundleError, match="the card says version 'v1', but it lies in folder 'v2'"):
        registry.load_card(store, "v2")


def test_a_production_pointer_cannot_lead_outside_the_store(tmp_path, model_bytes):
    store = str(tmp_path / "models")
    publish(store, model_bytes)
    storage.write_bytes(storage.join(store, registry.PRODUCTION), json.dumps({"version": "../../etc"}).encode())
    with pytest.raises(BundleError, match="version '../../etc' is not a safe name"):
        registry.load_card(store)
    registry.set_production(store, "v1", "repaired")  # a damaged pointer does not block promotion
    assert registry.load_card(store).version == "v1"


def test_publishing_refuses_a_bundle_that_could_never_load(tmp_path, model_bytes):
    store = str(tmp_path / "models")
    with pytest.raises(BundleError, match="threshold 1.5 is not in"):
        registry.publish(store, "v1", bundle_files(model_bytes), make_card(model_bytes, threshold=1.5))
    with pytest.raises(BundleError, match="the card is for version v1, not v2"):
        registry.publish(store, "v2", bundle_files(model_bytes), make_card(model_bytes))
    with pytest.raises(BundleError, match="manifest does not match"):
        registry.publish(store, "v1", bundle_files(model_bytes),
                         make_card(model_bytes, files={"model.keras": hashlib.sha256(model_bytes).hexdigest()}))
    assert registry.list_versions(store) == [] and not storage.exists(storage.join(store, "v1", "model.keras"))


def test_publishing_an_existing_version_leaves_its_files_alone(tmp_path, model_bytes):
    store = str(tmp_path / "models")
    publish(store, model_bytes)
    files = {**bundle_files(model_bytes), "history.json": b'{"loss": [0.0]}'}
    with pytest.raises(BundleError, match="version v1 already exists"):
        registry.publish(store, "v1", files, make_card(model_bytes))
    registry.verify_bundle(store)


# --- the manifest ------------------------------------------------------------------------------------


def test_the_card_lists_the_sha256_of_every_other_file(location, model_bytes):
    publish(location, model_bytes)
    card = registry.verify_bundle(location)
    assert card.files == {name: hashlib.sha256(data).hexdigest() for name, data in bundle_files(model_bytes).items()}
    model, loaded = registry.load_model(location)
    assert loaded == card and model.output_shape == (None, 2)


@pytest.mark.parametrize("name", ["model.keras", "history.json", "curves.png", "card.md"])
def test_a_tampered_file_of_any_kind_is_refused(location, model_bytes, name):
    folder = publish(location, model_bytes)
    uri = storage.join(folder, name)
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match=f"{name} has sha256 .* the file is damaged or was replaced"):
        registry.verify_bundle(location)
    if name == "model.keras":
        with pytest.raises(BundleError, match="model.keras has sha256"):
            registry.load_model(location)
        registry.verify_bundle(location, include_model=False)  # left to load_model, which checks it anyway
    else:
        with pytest.raises(BundleError, match=f"{name} has sha256"):
            registry.verify_bundle(location, include_model=False)
        with pytest.raises(BundleError, match=f"{name} has sha256"):
            registry.read_file(location, registry.load_card(location), name)


def test_a_file_removed_from_a_bundle_is_refused_and_one_added_is_named(tmp_path, model_bytes, caplog):
    store = str(tmp_path / "models")
    folder = publish(store, model_bytes)
    storage.write_bytes(storage.join(folder, "extra.py"), b"import os")
    with caplog.at_level(logging.WARNING, logger="store.registry"):
        registry.verify_bundle(store)  # nothing reads it
    assert "extra.py not in the card's file manifest: not part of the bundle, ignored" in caplog.text
    storage.delete(storage.join(folder, "curves.png"))
    with pytest.raises(BundleError, match="curves.png missing"):
        registry.verify_bundle(store)
    with pytest.raises(BundleError, match="'../card.json' is not a bundle file name"):
        registry.read_file(store, registry.load_card(store), "../card.json")


def test_a_bundle_from_before_manifests_loads_with_a_warning_and_its_model_still_checked(tmp_path, model_bytes,
                                                                                         caplog):
    store = str(tmp_path / "models")
    folder = publish(store, model_bytes)
    card_uri = storage.join(folder, "card.json")
    old = json.loads(storage.read_bytes(card_uri))
    del old["files"]
    storage.write_bytes(card_uri, json.dumps(old).encode())
    with caplog.at_level(logging.WARNING, logger="store.registry"):
        model, card = registry.load_model(store)
    assert card.files == {} and "has no file manifest" in caplog.text and card_uri in caplog.text
    storage.delete(storage.join(folder, "curves.png"))
    storage.delete(storage.join(folder, "history.json"))
    storage.delete(storage.join(folder, "card.md"))
    registry.verify_bundle(store)  # model.keras is all an old card vouches for
    storage.write_bytes(storage.join(folder, "model.keras"), model_bytes[:-1] + bytes([model_bytes[-1] ^ 1]))
    with pytest.raises(BundleError, match="model.keras has sha256"):
        registry.load_model(store)


# --- signatures ---------------------------------------------------------------------------------------


def test_a_signed_bundle_loads_with_its_key(location, model_bytes, monkeypatch):
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    folder = publish(location, model_bytes)
    assert storage.read_bytes(storage.join(folder, registry.SIGNATURE)).startswith(b"hmac-sha256:")
    model, card = registry.load_model(location)
    assert registry.verify_bundle(location) == card


def test_with_a_key_set_a_wrong_or_missing_signature_refuses_the_bundle(tmp_path, model_bytes, monkeypatch):
    store = str(tmp_path / "models")
    publish(store, model_bytes, "v-unsigned")  # no key yet: no signature
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    with pytest.raises(BundleError, match=r"/v-unsigned/card.json: not signed \(\S+/v-unsigned/card.json.sig missing\), "
                                          r"and CXR_MODEL_SIGNING_KEY is set"):
        registry.load_model(store, "v-unsigned")

    folder = publish(store, model_bytes, "v-signed")
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, "another key")
    with pytest.raises(BundleError, match=r"/v-signed/card.json: signature does not match \(\S+/v-signed/card.json.sig"):
        registry.load_card(store, "v-signed")

    # A card rewritten to a valid but different threshold, with a manifest that still matches.
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    card_uri = storage.join(folder, "card.json")
    storage.write_bytes(card_uri, json.dumps({**json.loads(storage.read_bytes(card_uri)), "threshold": 0.99}).encode())
    with pytest.raises(BundleError, match=f"^{card_uri}: signature does not match"):
        registry.verify_bundle(store, "v-signed")
    storage.write_bytes(storage.join(folder, registry.SIGNATURE), b"hmac-sha256:" + b"0" * 64)
    with pytest.raises(BundleError, match=f"^{card_uri}: signature does not match"):
        registry.load_card(store, "v-signed")


def test_without_a_key_signatures_are_not_checked(tmp_path, model_bytes, monkeypatch):
    store = str(tmp_path / "models")
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    publish(store, model_bytes, "v-signed")
    monkeypatch.delenv(registry.SIGNING_KEY_VARIABLE)
    publish(store, model_bytes, "v-unsigned")
    assert not storage.exists(storage.join(store, "v-unsigned", registry.SIGNATURE))
    storage.write_bytes(storage.join(store, "v-signed", registry.SIGNATURE), b"hmac-sha256:forged")
    assert registry.verify_bundle(store, "v-signed").version == "v-signed"
    assert registry.verify_bundle(store, "v-unsigned").version == "v-unsigned"


# --- promotion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.keras", "card.md"])
def test_a_damaged_bundle_is_never_made_production(location, model_bytes, name):
    publish(location, model_bytes, "v1")
    folder = registry.publish(location, "v2", bundle_files(model_bytes), make_card(model_bytes, "v2"))
    uri = storage.join(folder, name)
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match=f"{name} has sha256"):
        registry.set_production(location, "v2", "better")
    storage.delete(uri)
    with pytest.raises(BundleError, match=f"{name} missing"):
        registry.set_production(location, "v2", "better")
    assert registry.production_version(location) == "v1"


def test_with_a_key_set_an_unsigned_bundle_is_never_made_production(tmp_path, model_bytes, monkeypatch):
    store = str(tmp_path / "models")
    registry.publish(store, "v-unsigned", bundle_files(model_bytes), make_card(model_bytes, "v-unsigned"))
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    with pytest.raises(BundleError, match="v-unsigned/card.json: not signed"):
        registry.set_production(store, "v-unsigned", "forward")
    publish(store, model_bytes, "v-a")
    publish(store, model_bytes, "v-b")
    storage.delete(storage.join(store, "v-a", registry.SIGNATURE))  # what rollback would restore, unsigned now
    with pytest.raises(BundleError, match="v-a/card.json: not signed"):
        registry.rollback(store, "back")
    assert registry.production_version(store) == "v-b"


def test_a_pointer_unsigned_when_the_key_came_is_replaced_by_the_next_promotion(tmp_path, model_bytes, monkeypatch):
    """A store used before the key was set: its pointer is not followed (it names no version), and
    its unsigned history is not carried into the signed one; the entry that replaces it says so."""
    store = str(tmp_path / "models")
    publish(store, model_bytes, "v-old")
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    with pytest.raises(BundleError, match="production.json: not signed"):
        registry.load_card(store)
    publish(store, model_bytes, "v-new")
    production = registry.read_production(store)
    assert production.version == "v-new" and production.lineage() == ["v-new"]
    assert "production.json: not signed" in production.history[-1]["replaced"]
    with pytest.raises(BundleError, match="nothing to roll back to"):
        registry.rollback(store, "back")
