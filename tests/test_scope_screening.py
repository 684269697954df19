"""The scope gate from training to the report: fitted and measured at training, kept in the bundle,
applied to every screened image, counted by reason."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from model.bundle import BundleError
from model.scope import REASONS, SCOPE_FILE
from store import registry, storage
from store.out_of_scope import out_of_scope_images
from store.phantoms import chest_phantom
from tasks import screen_chunks
from tests.conftest import copy_tree
from tests.test_screen_flow import run_rows, run_screen


def test_training_fits_the_scope_measures_it_and_keeps_it_in_the_bundle(model_store):
    card = registry.load_card(model_store)
    assert SCOPE_FILE in card.files  # hashed like every other file, signed through the card
    scope = registry.load_scope(model_store, card)
    assert scope is not None and scope.template is not None and scope.pass_rate == 0.99
    record = card.scope
    # 32 phantoms are too few for the feature score to refuse anything: the record says so.
    assert record["threshold"] is None and scope.threshold == float("inf") and record["calibration_images"] < 200
    test = record["test_false_rejection"]
    assert test["of"] == card.dataset["test_images"] and test["low"] <= test["rate"] <= test["high"]
    kinds = record["out_of_scope"]["kinds"]
    assert set(kinds) == {"photograph", "document", "other modality", "blank or noise", "inverted", "rotated",
                          "partial view"}
    assert all(figures["of"] == 20 for figures in kinds.values())
    # The pixels alone decide photographs, whatever the features: in colour (at 32 px a view of a grey
    # part may lose it, and then its layout is nothing like a chest X-ray's).
    assert kinds["photograph"]["count"] == 20 and kinds["photograph"]["reasons"][REASONS["colour"]] >= 18
    markdown = storage.read_bytes(storage.join(model_store, card.version, "card.md")).decode()
    assert "## Scope: what it refuses to score" in markdown and "out of scope: photograph" in markdown
    assert "too few to say what is typical" in markdown


def write(uri: str, image: np.ndarray) -> None:
    storage.write_bytes(uri, cv2.imencode(".png", image)[1].tobytes())


def test_screening_refuses_what_is_not_a_chest_radiograph_and_says_why(model_store, tmp_path):
    incoming = tmp_path / "incoming"
    photograph = next(image for kind, image in out_of_scope_images(1, size=128) if kind == "photograph")
    phantom = chest_phantom(np.random.default_rng(42), 128)
    cases = {
        "photo.png": (photograph, REASONS["colour"]),
        # Almost flat (a flat one the loader refuses before the model: "every pixel has the same value").
        "blank.png": (np.uint8(90 + np.random.default_rng(1).integers(0, 3, (128, 128))), REASONS["blank"]),
        "noise.png": (np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8), REASONS["noise"]),
        "inverted.png": (255 - phantom, REASONS["inverted"]),
        "rotated.png": (np.ascontiguousarray(np.rot90(phantom)), REASONS["rotated"]),
    }
    for name, (image, _) in cases.items():
        write(str(incoming / name), image)
    results = str(tmp_path / "results")

    summary = run_screen(str(incoming), results, model_store, explain="all")

    rows = {row["image_uri"].rsplit("/", 1)[-1]: row for row in run_rows(results)}
    assert {name: rows[name]["reason"] for name in cases} == {name: reason for name, (_, reason) in cases.items()}
    for name in cases:
        row = rows[name]
        assert row["status"] == "rejected" and row["flagged"] == "False" and row["prob_covid"] == ""
        assert row["scope_score"] != "" and float(row["scope_score"]) >= 0  # the score is kept for every image
        assert row["cam_lung_share"] == ""  # never explained
    assert summary.rejected == len(cases) and summary.flagged == 0
    report = storage.read_bytes(summary.outputs["report.html"]).decode()
    for _, reason in cases.values():
        assert f"<tr><td>{reason}</td><td>1</td></tr>" in report


def test_ordinary_phantoms_pass_with_their_score(model_store, tmp_path):
    incoming = tmp_path / "incoming"
    for seed in range(6):
        write(str(incoming / f"{seed}.png"), chest_phantom(np.random.default_rng(100 + seed), 128))
    results = str(tmp_path / "results")
    summary = run_screen(str(incoming), results, model_store)
    rows = run_rows(results)
    assert summary.screened == 6 and sum(row["status"] == "ok" for row in rows) >= 5, [r["reason"] for r in rows]
    assert all(row["scope_score"] != "" for row in rows)


def test_a_version_trained_before_the_scope_gate_is_screened_as_before(model_store, tmp_path, caplog):
    store = str(tmp_path / "models")
    copy_tree(model_store, store)
    card = registry.load_card(store)
    # As an older trainer wrote it: no scope file, no scope record (the store is unsigned here).
    card_uri = storage.join(store, card.version, "card.json")
    values = json.loads(storage.read_bytes(card_uri))
    del values["files"][SCOPE_FILE]
    values["scope"] = {}
    storage.write_bytes(card_uri, json.dumps(values).encode())
    storage.delete(storage.join(store, card.version, SCOPE_FILE))
    incoming = tmp_path / "incoming"
    photograph = next(image for kind, image in out_of_scope_images(1, size=64) if kind == "photograph")
    write(str(incoming / "photo.png"), photograph)
    screen_chunks._model.cache_clear()

    summary = run_screen(str(incoming), str(tmp_path / "results"), store)

    assert summary.screened == 1 and summary.rejected == 0  # scored, whatever it shows, as before
    assert run_rows(str(tmp_path / "results"))[0]["scope_score"] == ""
    assert "trained before the scope gate" in caplog.text


def test_a_damaged_scope_file_refuses_the_version(model_store, tmp_path):
    store = str(tmp_path / "models")
    copy_tree(model_store, store)
    card = registry.load_card(store)
    storage.write_bytes(storage.join(store, card.version, SCOPE_FILE), b"PK\x03\x04 damaged")
    with pytest.raises(BundleError, match="scope.npz"):
        registry.load_scope(store, card)


def test_too_few_training_images_for_a_scope_leave_the_version_without_one(tmp_path, caplog):
    """Training goes on (the version is screened as before, and says so) rather than fail."""
    import logging

    from model.network import build_classifier
    from model.preprocessing import Preprocessing
    from store.phantoms import write_phantom_dataset
    from tasks.scope_fitting import fit_scope_model
    from tasks.train_data import build_split, discover, load_labelled

    write_phantom_dataset(str(tmp_path / "data"), per_class=8, size=64, seed=3)
    spec = Preprocessing(input_size=32)
    loaded = load_labelled(discover(str(tmp_path / "data")).items, spec)  # tasks, run outside a flow
    split = build_split(loaded, "covid", False, 0.2, 0, strata=[], leave_out=None, logger=logging.getLogger("test"))
    rows = split.train[:4]  # as if training had kept four images' features
    fitted = fit_scope_model(build_classifier(2, 32, None, head="linear"), loaded, split, spec, 0.99,
                             pooled=(rows, np.random.default_rng(0).random((4, 512))))
    assert fitted.model is None and fitted.record == {}
    assert "No scope gate for this version" in caplog.text
