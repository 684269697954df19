"""Signed means signed (#22 item 4): with CXR_MODEL_SIGNING_KEY set, every document that decides what
screening does (the card, the engines record, production.json, a generator's card, a synthetic
dataset's manifest) is refused, in one line naming the file, when it is unsigned or does not match
its signature; without a key, nothing is checked and training, promotion and the models command say
so (``registry.unsigned_warning``). And every such document read back goes through
``model.stored_json``: a number no float can hold, or nesting too deep, is one named error."""

from __future__ import annotations

import hashlib
import json
import logging

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from model.bundle import BundleError, ModelCard, card_problem, model_to_bytes, sign
from model.inference import EngineCheck
from model.network import build_classifier
from model.preprocessing import Preprocessing
from store import engines, registry, storage
from store.datasets import MANIFEST_SIGNATURE, DatasetError, discover_dataset
from store.generators import GeneratorCard, load_generator, publish_generator
from store.synthetic_data import synthetic_origin, write_synthetic_dataset

KEY = "the trainer's and the screener's secret"
INT8 = {"model-int8.xml": b"<net/>", "model-int8.bin": b"\x00" * 16}


def one_line(error: BaseException | str, uri: str) -> str:
    """The message, checked to be one line that starts with the file's URI."""
    text = str(error)
    assert "\n" not in text and text.startswith(f"{uri}: "), text
    return text


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv(registry.SIGNING_KEY_VARIABLE, raising=False)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    keras.utils.set_random_seed(0)
    return model_to_bytes(build_classifier(2, 32, None, head="mlp"))


def publish(store: str, model: bytes, version: str, *, promote: bool = True, **changes) -> ModelCard:
    card = ModelCard(version=version, classes=["non-covid", "covid"], positive_class="covid", threshold=0.571,
                     preprocessing=Preprocessing(input_size=32).to_dict(), weights={"origin": "none"},
                     dataset={"uri": "/data"}, metrics={"positive": {"auc": 0.9}},
                     model_sha256=hashlib.sha256(model).hexdigest(), created_at="2026-12-01T00:00:00+00:00",
                     **changes)
    registry.publish(store, version, {"model.keras": model, "card.md": b"# card"}, card)
    if promote:
        registry.set_production(store, version, f"{version} for the test")
    return registry.load_card(store, version)


def edit_json(uri: str, change) -> None:
    value = json.loads(storage.read_bytes(uri))
    change(value)
    storage.write_bytes(uri, json.dumps(value, indent=2).encode())


# --- the one warning --------------------------------------------------------------------------------


def test_the_unsigned_warning_names_the_store_and_the_variable_and_is_gone_with_a_key(monkeypatch, no_key):
    warning = registry.unsigned_warning("s3://cxr/models")
    assert warning is not None and "\n" not in warning
    assert warning.startswith("UNSIGNED MODEL STORE s3://cxr/models: CXR_MODEL_SIGNING_KEY is not set")
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, "")  # empty is not a key
    assert registry.unsigned_warning("s3://cxr/models") == warning
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    assert registry.unsigned_warning("s3://cxr/models") is None


# --- the card: the attack of issue #22 ---------------------------------------------------------------


def test_with_a_key_the_session_models_card_edited_to_flag_nothing_is_refused(trained_model, tmp_path, key):
    """The attack: card.json's threshold raised from the model's own to 0.99999, so a COVID-19 image
    at p=0.959 goes unflagged. Signed, the model does not load at all, and the refusal names the file."""
    store = str(tmp_path / "models")
    with pytest.MonkeyPatch.context() as patch:  # the session's store is unsigned: read it without the key
        patch.delenv(registry.SIGNING_KEY_VARIABLE)
        card = registry.load_card(trained_model.store, trained_model.version)
        files = {name: storage.read_bytes(storage.join(trained_model.store, card.version, name)) for name in card.files}
    registry.publish(store, card.version, files, card)  # signed with the key
    registry.set_production(store, card.version, "signed copy of the session's model")
    _, loaded = registry.load_model(store)
    assert loaded.threshold == card.threshold < 0.99999

    card_uri = storage.join(store, card.version, registry.CARD)
    edit_json(card_uri, lambda values: values.__setitem__("threshold", 0.99999))
    for read in (registry.load_model, registry.load_card, registry.verify_bundle):
        with pytest.raises(BundleError) as refused:
            read(store)
        message = one_line(refused.value, card_uri)
        assert "signature does not match" in message and "card.json.sig" in message


def test_with_a_key_an_unsigned_card_is_refused_naming_it_and_how_to_publish_again(tmp_path, model_bytes,
                                                                                  monkeypatch):
    store = str(tmp_path / "models")
    monkeypatch.delenv(registry.SIGNING_KEY_VARIABLE, raising=False)
    publish(store, model_bytes, "v1")
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    with pytest.raises(BundleError) as refused:
        registry.load_card(store, "v1")
    message = one_line(refused.value, storage.join(store, "v1", registry.CARD))
    assert "not signed" in message and "CXR_MODEL_SIGNING_KEY is set" in message and "cxr-screen train" in message


# --- production.json ---------------------------------------------------------------------------------


def test_with_a_key_production_json_is_signed_and_an_edited_pointer_is_never_followed(location, model_bytes, key):
    """Any signed version (an experiment, a candidate found not fit) became production by editing the
    pointer. Signed, an edited pointer names no version at all, and the refusal names the file."""
    publish(location, model_bytes, "v-production")
    publish(location, model_bytes, "v-experiment", promote=False,
            promotion={"promoted": False, "reason": "trained with site=A left out: an experiment"})
    uri = storage.join(location, registry.PRODUCTION)
    record = json.loads(storage.read_bytes(uri))
    assert record["signature"].startswith("hmac-sha256:") and record["version"] == "v-production"
    assert registry.load_card(location).version == "v-production"

    def experiment(values):
        values.update(version="v-experiment")
        values["history"][-1]["version"] = "v-experiment"

    edit_json(uri, experiment)
    production = registry.read_production(location)
    assert production.version is None and "signature does not match" in one_line(production.problem, uri)
    for read in (registry.production_version, registry.load_card, registry.load_model):
        with pytest.raises(BundleError) as refused:
            read(location)
        assert "cxr-screen models promote" in one_line(refused.value, uri)

    # Without the signature at all: refused too, and the message says how to sign it again.
    edit_json(uri, lambda values: values.pop("signature"))
    with pytest.raises(BundleError) as refused:
        registry.production_version(location)
    assert "not signed" in one_line(refused.value, uri)

    # Promoting a signed version again is how: the pointer is replaced, signed, and says what it replaced.
    entry = registry.set_production(location, "v-production", "re-signed after an unsigned pointer was found")
    assert "not signed" in entry["replaced"]
    assert registry.production_version(location) == "v-production"
    assert json.loads(storage.read_bytes(uri))["signature"].startswith("hmac-sha256:")


def test_with_a_key_a_pointer_signed_by_another_key_or_with_a_broken_history_is_refused(tmp_path, model_bytes,
                                                                                        key, monkeypatch):
    store = str(tmp_path / "models")
    for version in ("v1", "v2", "v3"):
        publish(store, model_bytes, version)
    uri = storage.join(store, registry.PRODUCTION)
    signed = storage.read_bytes(uri)
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, "another key")
    assert "signature does not match" in one_line(registry.read_production(store).problem, uri)
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)

    # A history that does not lead to the version, signed with the key (as a faulty writer could):
    # the version is not followed either.
    for change, message in [(lambda values: values["history"][1].update(previous="v3"), "does not chain"),
                            (lambda values: values["history"].pop(), "ends at v2, not at 'v3'"),
                            (lambda values: values.update(history=[]), "not a list of changes"),
                            (lambda values: values.update(version="v1", previous="v2"), "ends at v3, not at 'v1'")]:
        values = json.loads(signed)
        change(values)
        values["signature"] = sign(registry._pointer_bytes(values), KEY.encode()).decode().strip()
        storage.write_bytes(uri, json.dumps(values).encode())
        problem = registry.read_production(store).problem
        assert problem is not None and message in one_line(problem, uri)
    storage.write_bytes(uri, signed)
    assert registry.read_production(store).lineage() == ["v1", "v2", "v3"]


def test_without_a_key_production_json_reads_as_before(tmp_path, model_bytes, no_key):
    store = str(tmp_path / "models")
    publish(store, model_bytes, "v1")
    publish(store, model_bytes, "v2")
    uri = storage.join(store, registry.PRODUCTION)
    assert "signature" not in json.loads(storage.read_bytes(uri))
    edit_json(uri, lambda values: values.update(version="v1"))  # nothing can tell: the warning is all there is
    assert registry.production_version(store) == "v1"


def test_training_neither_follows_nor_replaces_a_pointer_it_cannot_trust(prefect_api, tmp_path, model_bytes, key):
    """decide_promotion, on an edited pointer: no comparison, no promotion, a reason that says why."""
    from tasks.promotion import decide_promotion

    store = str(tmp_path / "models")
    publish(store, model_bytes, "v1")
    uri = storage.join(store, registry.PRODUCTION)
    edit_json(uri, lambda values: values.update(reason="edited"))
    before = storage.read_bytes(uri)
    # What the decision would weigh is never reached: the pointer is refused first.
    decided = decide_promotion(store, None, None, None, None, None)
    assert not decided.promoted and decided.compared_with is None
    assert f"production.json cannot be used, so the new model was not compared with it: {uri}: signature does not " \
           "match" in decided.reason and "cxr-screen models promote" in decided.reason
    assert storage.read_bytes(uri) == before


# --- engines.json ------------------------------------------------------------------------------------


def engine_check(engine: str, agreement: float) -> EngineCheck:
    return EngineCheck(engine, 100, agreement, 0.003, 0.001, agreement >= 0.99)


def test_with_a_key_an_engines_record_edited_to_let_int8_serve_is_refused(location, model_bytes, key):
    """The attack: int8 failed its gate; engines.json edited to figures that pass let it serve."""
    card = publish(location, model_bytes, "v1")
    engines.record_checks(location, card, [engine_check("bf16", 1.0), engine_check("int8", 0.9)], INT8)
    assert engines.validated_engines(location, card)[0] == ["fp32", "bf16"]
    uri = storage.join(location, "v1", engines.ENGINES_FILE)
    edit_json(uri, lambda values: values["checks"]["int8"].update(flag_agreement=1.0, passed=True))

    allowed, note = engines.validated_engines(location, card)
    assert allowed == ["fp32"] and note.endswith(": fp32 only")
    assert "signature does not match" in one_line(note, uri) and "cxr-screen validate-engines v1" in note
    with pytest.raises(BundleError) as refused:
        engines.load_artifacts(location, card, "int8")
    one_line(refused.value, uri)
    assert not engines.reduced_decode_allowed(location, card)

    storage.delete(storage.join(location, "v1", engines.ENGINES_SIGNATURE))
    allowed, note = engines.validated_engines(location, card)
    assert allowed == ["fp32"] and "not signed" in one_line(note, uri)


def test_without_a_key_the_same_edit_goes_unnoticed_but_for_the_warning(tmp_path, model_bytes, no_key):
    """What the warning is about: without a key nothing can tell an edited record from a real one."""
    store = str(tmp_path / "models")
    card = publish(store, model_bytes, "v1")
    engines.record_checks(store, card, [engine_check("int8", 0.9)], INT8)
    edit_json(storage.join(store, "v1", engines.ENGINES_FILE),
              lambda values: values["checks"]["int8"].update(flag_agreement=1.0))
    assert "int8" in engines.validated_engines(store, card)[0]
    assert registry.unsigned_warning(store) is not None


# --- generators and synthetic datasets ---------------------------------------------------------------


def generator(store: str, version: str = "g1") -> str:
    card = GeneratorCard(version=version, classes=["covid", "normal"], config={}, dataset={}, quality={"passed": True})
    return publish_generator(store, card, {"generator.keras": b"not read before the card is", "gan.json": b"{}"})


def test_with_a_key_an_unsigned_or_edited_generator_card_is_refused_naming_it(tmp_path, monkeypatch):
    store = str(tmp_path / "generators")
    monkeypatch.delenv(registry.SIGNING_KEY_VARIABLE, raising=False)
    folder = generator(store)
    card_uri = storage.join(folder, registry.CARD)
    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    with pytest.raises(BundleError) as refused:
        load_generator(store, "g1")
    message = one_line(refused.value, card_uri)
    assert "not signed" in message and "cxr-screen synthesize" in message

    folder = generator(store, "g2")
    card_uri = storage.join(folder, registry.CARD)
    assert storage.exists(storage.join(folder, registry.SIGNATURE))
    edit_json(card_uri, lambda values: values["quality"].update(passed=True, note="memorised, but edited"))
    with pytest.raises(BundleError) as refused:
        load_generator(store, "g2")
    assert "signature does not match" in one_line(refused.value, card_uri)


def synthetic(out: str, store: str) -> str:
    return write_synthetic_dataset(out, "covid", np.zeros((2, 32, 32), np.uint8), "g1", 0, 0, 0.2, "f" * 64, store)


def test_with_a_key_a_synthetic_manifest_is_signed_and_an_edited_generator_store_refused(location, key):
    """The manifest names the generator store whose cards vouch for its images: edited to another
    store, it would have those cards vouch instead."""
    out = storage.join(location, "synthetic")
    manifest = synthetic(out, storage.join(location, "generators"))
    assert storage.exists(storage.join(out, MANIFEST_SIGNATURE))
    dataset = discover_dataset(out)
    assert dataset.ignored == ()  # the signature is part of the dataset, not a stray file
    assert synthetic_origin(dataset).generator_store == storage.join(location, "generators")

    edited = storage.read_bytes(manifest).replace(b"/generators", b"/elsewhere")
    storage.write_bytes(manifest, edited)
    with pytest.raises(DatasetError) as refused:
        synthetic_origin(discover_dataset(out))
    message = one_line(refused.value, manifest)
    assert "signature does not match" in message and "cxr-screen synthesize" in message

    storage.delete(storage.join(out, MANIFEST_SIGNATURE))
    with pytest.raises(DatasetError) as refused:
        synthetic_origin(discover_dataset(out))
    assert "not signed" in one_line(refused.value, manifest)


def test_a_synthetic_manifest_changed_after_it_was_read_is_refused(tmp_path, key):
    out, store = str(tmp_path / "synthetic"), str(tmp_path / "generators")
    manifest = synthetic(out, store)
    dataset = discover_dataset(out)
    original = storage.read_bytes(manifest)
    storage.write_bytes(manifest, original.replace(b"/generators", b"/elsewhere"))
    storage.write_bytes(storage.join(out, MANIFEST_SIGNATURE), sign(storage.read_bytes(manifest), KEY.encode()))
    with pytest.raises(DatasetError) as refused:  # signed, but not the manifest the dataset was read from
        synthetic_origin(dataset)
    assert "changed since the dataset was read" in one_line(refused.value, manifest)


def test_without_a_key_a_synthetic_manifest_is_read_as_before(tmp_path, no_key):
    out, store = str(tmp_path / "synthetic"), str(tmp_path / "generators")
    synthetic(out, store)
    assert not storage.exists(storage.join(out, MANIFEST_SIGNATURE))
    assert synthetic_origin(discover_dataset(out)).generator_store == store


def test_a_second_manifest_leaves_the_first_ones_signature_alone(tmp_path, key):
    out, store = str(tmp_path / "synthetic"), str(tmp_path / "generators")
    synthetic(out, store)
    signature = storage.read_bytes(storage.join(out, MANIFEST_SIGNATURE))
    synthetic(out, store)  # a retry: the same manifest
    with pytest.raises(DatasetError, match="another run wrote a dataset"):
        synthetic(out, str(tmp_path / "other-generators"))
    assert storage.read_bytes(storage.join(out, MANIFEST_SIGNATURE)) == signature
    assert synthetic_origin(discover_dataset(out)).generator_store == store


# --- every stored document through model.stored_json ----------------------------------------------


HUGE = "1" + "0" * 400


def test_a_card_with_a_number_beyond_what_a_float_holds_is_one_named_error(tmp_path, model_bytes, no_key):
    store = str(tmp_path / "models")
    publish(store, model_bytes, "v1")
    uri = storage.join(store, "v1", registry.CARD)
    storage.write_bytes(uri, storage.read_bytes(uri).replace(b'"threshold": 0.571', f'"threshold": {HUGE}'.encode()))
    for read in (registry.load_card, registry.load_model):
        with pytest.raises(BundleError) as refused:
            read(store, "v1")
        assert "beyond +-2**53" in one_line(refused.value, uri)
    # Past the parser too (a card built in memory): out of range, not an OverflowError.
    values = json.loads(storage.read_bytes(uri).replace(HUGE.encode(), b"0.5"))
    assert card_problem({**values, "threshold": int(HUGE)}) == f"threshold {HUGE} is not in (0, 1)"


@pytest.mark.parametrize("document, damage, expected", [
    ("production.json", lambda text: text.replace('"reason": "v1 for the test"', f'"reason": {HUGE}'), "beyond +-2**53"),
    ("production.json", lambda text: text.replace('"reason": "v1 for the test"', '"reason": NaN'), "NaN is not a number"),
    ("engines.json", lambda text: text.replace('"images": 100', f'"images": {HUGE}'), "beyond +-2**53"),
    ("engines.json", lambda text: text.replace('"images": 100', '"images": ' + "[" * 40 + "]" * 40), "nested deeper"),
])
def test_stored_documents_with_numbers_or_nesting_no_reader_survives_are_named(tmp_path, model_bytes, no_key,
                                                                              document, damage, expected):
    store = str(tmp_path / "models")
    card = publish(store, model_bytes, "v1")
    engines.record_checks(store, card, [engine_check("bf16", 1.0)])
    uri = storage.join(store, registry.PRODUCTION) if document == "production.json" else \
        storage.join(store, "v1", engines.ENGINES_FILE)
    storage.write_bytes(uri, damage(storage.read_bytes(uri).decode()).encode())
    if document == "production.json":
        production = registry.read_production(store)
        assert production.version is None and expected in one_line(production.problem, uri)
    else:
        allowed, note = engines.validated_engines(store, card)
        assert allowed == ["fp32"] and expected in one_line(note, uri)


def test_a_generator_card_or_config_no_reader_survives_is_named(tmp_path, no_key):
    store = str(tmp_path / "generators")
    folder = generator(store)
    card_uri = storage.join(folder, registry.CARD)
    original = storage.read_bytes(card_uri)
    storage.write_bytes(card_uri, original.replace(b'"passed": true', b'"passed": Infinity'))
    with pytest.raises(BundleError) as refused:
        load_generator(store, "g1")
    assert "Infinity is not a number" in one_line(refused.value, card_uri)

    nested = b"[" * 40 + b"]" * 40
    folder = publish_generator(store, GeneratorCard(version="g2", classes=["covid"], config={}, dataset={},
                                                    quality={}), {"generator.keras": b"x", "gan.json": nested})
    with pytest.raises(BundleError) as refused:
        load_generator(store, "g2")
    assert "nested deeper" in one_line(refused.value, folder) and "gan.json" in str(refused.value)


def test_an_evaluation_no_reader_survives_is_unusable_and_named(tmp_path, model_bytes, no_key):
    from store import evaluations

    store = str(tmp_path / "models")
    card = publish(store, model_bytes, "v1")
    folder = evaluations.evaluation_folder(store, "v1", "e20261207-000000-abcdef")
    storage.write_bytes(storage.join(folder, evaluations.EVALUATION), f'{{"images": {HUGE}}}'.encode())
    [found] = evaluations.list_evaluations(store, card)
    uri = storage.join(folder, evaluations.EVALUATION)
    assert not found.fit and "beyond +-2**53" in one_line(found.problem, uri)


# --- training, promotion and the models command say the store is unsigned ---------------------------


def test_promotion_says_the_store_is_unsigned_in_its_log(prefect_api, tmp_path, model_bytes, no_key):
    from tasks.promotion import Promotion, promote

    store = str(tmp_path / "models")
    publish(store, model_bytes, "v1", promote=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("prefect").addHandler(handler)
    task_logger = logging.getLogger("prefect.task_runs")
    task_logger.addHandler(handler)
    try:
        assert promote(store, "v1", Promotion(True, "no comparable production model")).promoted
    finally:
        logging.getLogger("prefect").removeHandler(handler)
        task_logger.removeHandler(handler)
    assert any(record.getMessage() == f"Promoting v1: {registry.unsigned_warning(store)}" for record in records)


def test_the_training_artifacts_open_with_the_warning(prefect_api, model_store, no_key):
    from prefect import flow

    from tasks.bundling import TrainedModel, report_training
    from tests.conftest import flow_run_artifacts

    card = registry.load_card(model_store)
    warning = registry.unsigned_warning(model_store)

    @flow
    def report() -> str:
        from prefect.runtime import flow_run

        report_training(TrainedModel(card, storage.join(model_store, card.version), True, "test", warning))
        return flow_run.id

    artifacts = flow_run_artifacts(report())
    for key_ in ("training-summary", "model-card"):
        assert artifacts[key_].data.startswith("> **WARNING: UNSIGNED MODEL STORE ")
        assert "CXR&#95;MODEL&#95;SIGNING&#95;KEY is not set" in artifacts[key_].data


def test_the_train_command_says_the_store_is_unsigned_first_and_last(model_store, monkeypatch, no_key, tmp_path):
    """The flow itself is the session's model (no second training): what the command prints around it."""
    import flows.train
    from cli import lifeline, main
    from tasks.bundling import TrainedModel

    card = registry.load_card(model_store)
    monkeypatch.setattr(lifeline, "arm", lambda: None)
    monkeypatch.setattr(flows.train, "train", lambda params: TrainedModel(
        card, storage.join(model_store, card.version), False, "a test", registry.unsigned_warning(model_store)))
    store = str(tmp_path / "models")
    try:
        result = CliRunner().invoke(main.app, ["train", str(tmp_path / "data"), "--model-store", store, "--json"])
    finally:
        main.console.file = None
    assert result.exit_code == 0, result.output
    warning = registry.unsigned_warning(store)
    said = " ".join(result.stderr.split())
    assert said.startswith(f"warning: {warning}") and said.count(warning) == 2
    assert json.loads(result.stdout)["unsigned_warning"] == warning

    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    try:
        result = CliRunner().invoke(main.app, ["train", str(tmp_path / "data"), "--model-store", store, "--json"])
    finally:
        main.console.file = None
    assert result.exit_code == 0 and "UNSIGNED" not in result.stderr
    assert json.loads(result.stdout)["unsigned_warning"] is None
