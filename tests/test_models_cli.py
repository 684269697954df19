"""``cxr-screen models``: list, show, promote, rollback on a folder and on moto S3; who and why in
production.json's history; compare-and-swap under racing promotions; approval before promotion."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import pytest
from typer.testing import CliRunner

from cli.models import models_app
from model.bundle import ModelCard, model_to_bytes
from model.network import build_classifier
from model.preprocessing import Preprocessing
from store import registry, storage

KEY = "a signing key only the trainer and the screener know"


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    keras.utils.set_random_seed(0)
    return model_to_bytes(build_classifier(2, 32, None, head="mlp"))


def publish(store: str, model: bytes, version: str, *, auc: float = 0.9, promotion: dict | None = None,
            warnings: list[str] | None = None) -> str:
    """A small bundle, registered (not promoted), made on the 2nd + n-th day for version vn."""
    day = 1 + sum(map(ord, version)) % 27
    card = ModelCard(version=version, classes=["non-covid", "covid"], positive_class="covid", threshold=0.4,
                     preprocessing=Preprocessing(input_size=32).to_dict(), weights={"origin": "none"},
                     dataset={"uri": "/data", "images": 40}, metrics={"accuracy": 0.8, "images": 8, "positive": {
                         "auc": auc, "sensitivity_at_threshold": 0.75, "specificity_at_threshold": 0.5}},
                     model_sha256=hashlib.sha256(model).hexdigest(), created_at=f"2026-11-{day:02d}T00:00:00+00:00",
                     promotion=promotion or {}, validity={"warnings": warnings or []})
    return registry.publish(store, version, {"model.keras": model, "card.md": b"# card"}, card)


def models(*args: str, store: str):
    result = CliRunner().invoke(models_app, [*args, "--model-store", store])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def as_json(*args: str, store: str) -> dict:
    result = models(*args, "--json", store=store)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def pointer(store: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(store, registry.PRODUCTION)))


def test_list_show_promote_and_rollback_record_who_and_why(location, model_bytes):
    for version in ("v1", "v2", "v3"):
        publish(location, model_bytes, version, auc=(80 + int(version[1])) / 100,
                warnings=["within site AUC 0.50 far below 0.95"] if version == "v3" else None)
    assert models("promote", "v1", "--reason", "first model", "--by", "alice", store=location).exit_code == 0

    listed = as_json("list", store=location)
    assert listed["production"] == "v1"
    assert [(row["version"], row["status"], row["auc"]) for row in listed["versions"]] == [
        ("v1", "production", 0.81), ("v2", "not promoted", 0.82), ("v3", "not promoted", 0.83)]
    assert listed["versions"][2]["warnings"] == ["within site AUC 0.50 far below 0.95"]
    text = models("list", store=location).stdout
    assert "v1" in text and "production" in text and "0.820" in text and "Production: v1" in text
    assert "Shortcut warning v3: within site AUC 0.50 far below 0.95" in " ".join(text.split())

    promoted = models("promote", "v2", "--reason", "better on site B", store=location)
    assert promoted.exit_code == 0 and "v2 is production now (was v1)" in promoted.stdout
    changed = as_json("promote", "v3", "--reason", "newest", "--by", "bob", store=location)
    assert changed["changed"] and changed["version"] == "v3" and changed["previous"] == "v2" and changed["by"] == "bob"
    same = as_json("promote", "v3", "--reason", "again", store=location)
    assert same == {"changed": False, "version": "v3"}

    # Rolling back walks back through the versions production has been, not to and fro.
    assert models("rollback", "--reason", "v3 flags too many", "--by", "carol", store=location).exit_code == 0
    assert registry.production_version(location) == "v2"
    statuses = {row["version"]: row["status"] for row in as_json("list", store=location)["versions"]}
    assert statuses == {"v1": "previous", "v2": "production", "v3": "retired"}
    assert as_json("rollback", "--reason", "v2 too", store=location)["version"] == "v1"
    ended = models("rollback", "--reason", "and again", store=location)
    assert ended.exit_code == 3 and "nothing to roll back to: production is v1" in ended.stderr

    record = pointer(location)
    assert (record["version"], record["previous"], record["reason"]) == ("v1", "v2", "v2 too")
    assert [(e["action"], e["version"], e["previous"], e["reason"]) for e in record["history"]] == [
        ("promote", "v1", None, "first model"), ("promote", "v2", "v1", "better on site B"),
        ("promote", "v3", "v2", "newest"), ("rollback", "v2", "v3", "v3 flags too many"),
        ("rollback", "v1", "v2", "v2 too")]
    assert [e["by"] for e in record["history"]][:4] == ["alice", registry.operator(), "bob", "carol"]
    assert all(e["at"].endswith("+00:00") for e in record["history"])

    shown = as_json("show", "v2", store=location)
    assert shown["version"] == "v2" and shown["threshold"] == 0.4 and shown["registry"]["status"] == "retired"
    assert [e["reason"] for e in shown["registry"]["history"]] == [
        "better on site B", "newest", "v3 flags too many", "v2 too"]
    text = " ".join(models("show", "production", store=location).stdout.split())
    assert "Model v1: production" in text and "AUC 0.810" in text
    assert "made production by promote (alice: first model)" in text


def test_usage_and_input_errors_have_their_exit_codes_and_change_nothing(tmp_path, model_bytes):
    store = str(tmp_path / "models")
    empty = models("list", store=store)
    assert empty.exit_code == 0 and "No model versions" in empty.stdout
    assert models("rollback", "--reason", "x", store=store).exit_code == 3  # no production at all
    publish(store, model_bytes, "v1")
    publish(store, model_bytes, "v2")
    models("promote", "v1", "--reason", "first", store=store)
    before = storage.read_bytes(storage.join(store, registry.PRODUCTION))

    assert models("promote", "v2", store=store).exit_code == 2  # no --reason
    blank = models("promote", "v2", "--reason", "  ", store=store)
    assert blank.exit_code == 2 and "say why" in blank.output
    unknown = models("promote", "v9", "--reason", "x", store=store)
    assert unknown.exit_code == 3 and "no such model version (known: v1, v2)" in unknown.stderr
    for bad in ("production", "../v1"):
        assert models("promote", bad, "--reason", "x", store=store).exit_code == 3
    assert models("show", "v9", store=store).exit_code == 3
    assert models("list", store="gs://bucket/models").exit_code == 3
    assert storage.read_bytes(storage.join(store, registry.PRODUCTION)) == before


def test_a_missing_bucket_is_a_configuration_error(moto_server):
    result = models("list", store="s3://no-such-bucket-for-models/models")
    assert result.exit_code == 3 and "no such bucket" in result.stderr


def test_a_production_json_from_before_histories_still_reads_and_rolls_back(tmp_path, model_bytes):
    store = str(tmp_path / "models")
    publish(store, model_bytes, "v1", promotion={"promoted": True, "reason": "no comparable production model"})
    publish(store, model_bytes, "v2", promotion={"promoted": True, "reason": "beats production"})
    storage.write_bytes(storage.join(store, registry.PRODUCTION), json.dumps(
        {"version": "v2", "previous": "v1", "reason": "beats production",
         "promoted_at": "2026-11-25T21:21:40+00:00"}, indent=2).encode())
    listed = as_json("list", store=store)
    assert {row["version"]: row["status"] for row in listed["versions"]} == {"v1": "previous", "v2": "production"}
    assert listed["history"][0]["reason"] == "beats production" and listed["history"][0]["by"] is None
    assert as_json("rollback", "--reason", "back", store=store)["version"] == "v1"
    record = pointer(store)
    assert record["version"] == "v1" and [e["version"] for e in record["history"]] == ["v2", "v1"]
    assert record["history"][0]["at"] == "2026-11-25T21:21:40+00:00"


def test_a_damaged_or_unsigned_bundle_is_never_promoted(location, model_bytes, monkeypatch):
    publish(location, model_bytes, "v1")
    folder = publish(location, model_bytes, "v2")
    models("promote", "v1", "--reason", "first", store=location)
    storage.write_bytes(storage.join(folder, "card.md"), b"# another card")
    refused = models("promote", "v2", "--reason", "x", store=location)
    assert refused.exit_code == 3 and "card.md has sha256" in refused.stderr
    assert registry.production_version(location) == "v1"

    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    refused = models("promote", "v1", "--reason", "the unsigned one", store=location)
    assert refused.exit_code == 3 and "v1/card.json: not signed" in " ".join(refused.stderr.split())
    publish(location, model_bytes, "v3")  # signed
    promoted = models("promote", "v3", "--reason", "signed", store=location)  # replaces the unsigned pointer
    assert promoted.exit_code == 0 and "production.json: not signed" in " ".join(promoted.stderr.split())
    assert registry.production_version(location) == "v3"
    assert [row["status"] for row in as_json("list", store=location)["versions"]] == ["unusable", "unusable", "production"]


def test_two_promotions_from_the_same_read_have_one_winner(location, model_bytes):
    for version in ("v0", "a1", "b1", "a2", "b2", "a3", "b3"):
        publish(location, model_bytes, version)
    registry.set_production(location, "v0", "start")
    for round_ in (1, 2, 3):  # each from a fresh read, as two trainings that compared at the same time
        seen = registry.read_production(location)
        barrier = threading.Barrier(2)

        def promote(version: str):
            barrier.wait()
            try:
                return registry.set_production(location, version, f"training {version}", expected=seen)
            except registry.PromotionConflict as error:
                return error

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(promote, (f"a{round_}", f"b{round_}")))
        won = [outcome for outcome in outcomes if isinstance(outcome, dict)]
        lost = [outcome for outcome in outcomes if isinstance(outcome, registry.PromotionConflict)]
        assert len(won) == 1 and len(lost) == 1
        winner = won[0]["version"]
        assert registry.production_version(location) == winner
        assert f"it was {seen.version}, it is now {winner}" in str(lost[0])
        assert "was not made production" in str(lost[0])
        history = pointer(location)["history"]
        assert len(history) == len(seen.history) + 1 and history[-1]["version"] == winner


def test_an_operator_who_lost_the_race_is_told_and_nothing_is_overwritten(location, model_bytes, monkeypatch):
    for version in ("v1", "v2", "v3"):
        publish(location, model_bytes, version)
    registry.set_production(location, "v1", "start")
    checking = registry.verify_bundle

    def another_operator_meanwhile(store_uri, version="production", **kwargs):
        if version == "v2":  # while v2 is being checked, someone else promotes v3
            registry.set_production(store_uri, "v3", "hotfix", by="dave")
        return checking(store_uri, version, **kwargs)

    monkeypatch.setattr(registry, "verify_bundle", another_operator_meanwhile)
    lost = models("promote", "v2", "--reason", "mine", store=location)
    assert lost.exit_code == 3
    message = " ".join(lost.stderr.split())
    assert "production changed while this was deciding: it was v1, it is now v3 by dave" in message
    assert "(hotfix); v2 was not made production" in message
    assert [e["version"] for e in pointer(location)["history"]] == ["v1", "v3"]


@pytest.mark.slow
def test_with_require_approval_training_leaves_a_candidate_until_promoted(prefect_api, tmp_path, model_bytes):
    from flows.parameters import TrainParameters
    from flows.train import train
    from store.phantoms import write_phantom_dataset
    from tasks.promotion import Promotion, promote

    dataset, store = str(tmp_path / "dataset"), str(tmp_path / "models")
    write_phantom_dataset(dataset, per_class=16, size=96)  # as tests/test_train_flow.py: seconds
    trained = train(TrainParameters(dataset_uri=dataset, model_store_uri=store, require_approval=True,
                                    force_promote=True, input_size=32, weights="none", epochs=3, augment_draws=2,
                                    batch_size=8))
    assert not trained.promoted and registry.production_version(store) is None
    assert trained.reason.startswith("candidate awaiting approval (require_approval is set; training recommends it")
    card = registry.load_card(store, trained.version)
    assert card.promotion["require_approval"] is True and card.promotion["promoted"] is False
    assert "awaiting approval" in storage.read_bytes(storage.join(trained.bundle_uri, "card.md")).decode()
    assert as_json("list", store=store)["versions"][0]["status"] == "candidate"
    assert models("promote", trained.version, "--reason", "reviewed", store=store).exit_code == 0
    assert registry.production_version(store) == trained.version

    # Training's own promotion, written against a production that has changed since it compared:
    # the new model stays a candidate and the run says why.
    publish(store, model_bytes, "v-next")
    written = promote(store, "v-next", Promotion(True, "beats production", seen=registry.Production()),
                      by="train flow run x")
    kept, reason = written.promoted, written.reason
    assert not kept and reason.startswith("left as a candidate: ")
    assert f"it was none, it is now {trained.version} by {registry.operator()}" in reason
    assert len(pointer(store)["history"]) == 1


def test_a_model_not_fit_for_screening_is_a_candidate_only_a_person_promotes(prefect_api, tmp_path):
    from flows.parameters import TrainParameters
    from flows.train import train
    from store.phantoms import write_phantom_dataset

    dataset, store = tmp_path / "dataset", str(tmp_path / "models")
    # Two folders of the same kind of healthy phantom: the label says nothing a model could learn,
    # so the default criteria must find it unfit. Even forced, training does not promote it.
    write_phantom_dataset(str(dataset), per_class=20, size=96, classes=("normal", "unused"), seed=0)
    write_phantom_dataset(str(tmp_path / "more"), per_class=20, size=96, classes=("normal", "unused"), seed=1)
    (tmp_path / "more" / "normal").rename(dataset / "covid")
    for folder in (dataset / "unused", tmp_path / "more" / "unused"):
        for image in folder.iterdir():
            image.unlink()
        folder.rmdir()
    trained = train(TrainParameters(dataset_uri=str(dataset), model_store_uri=store, force_promote=True,
                                    input_size=32, weights="none", batch_size=8))
    assert not trained.promoted and registry.production_version(store) is None
    fitness = trained.card.validity["fitness"]
    assert fitness["fit"] is False and fitness["line"].startswith("NOT FIT FOR SCREENING")
    assert fitness["criteria"]["min_auc"] == 0.75 and trained.card.training["acceptance"]["min_auc"] == 0.75
    assert "NOT FIT FOR SCREENING" in trained.reason and "models promote" in trained.reason
    assert "NOT FIT FOR SCREENING" in storage.read_bytes(storage.join(trained.bundle_uri, "card.md")).decode()
    assert as_json("list", store=store)["versions"][0]["fit"] is False
    assert "NOT FIT FOR SCREENING" in models("show", trained.version, store=store).output

    promoted = models("promote", trained.version, "--reason", "accepted by the radiology lead", store=store)
    assert promoted.exit_code == 0 and registry.production_version(store) == trained.version
    assert "not fit for screening in training" in promoted.output  # stderr is mixed in by CliRunner


def test_a_damaged_card_is_one_line_of_the_list_and_the_others_are_listed(location, model_bytes):
    """A card whose threshold is an integer of 401 digits ended ``models list`` in a traceback (#22)."""
    for version in ("v1", "v2", "v3", "v4"):
        publish(location, model_bytes, version)
    models("promote", "v1", "--reason", "first", store=location)
    huge = storage.join(location, "v2", registry.CARD)
    storage.write_bytes(huge, storage.read_bytes(huge).replace(b'"threshold": 0.4', b'"threshold": 1' + b"0" * 400))
    odd = storage.join(location, "v3", registry.CARD)  # valid for the schema, of no use to a table
    storage.write_bytes(odd, json.dumps({**json.loads(storage.read_bytes(odd)), "metrics": {
        "accuracy": "high", "positive": ["auc", 0.9]}}).encode())
    deep = storage.join(location, "v4", registry.CARD)
    storage.write_bytes(deep, storage.read_bytes(deep).replace(b'"files": {', b'"deep": ' + b"[" * 40 + b"]" * 40 +
                                                               b', "files": {'))

    listed = as_json("list", store=location)
    rows = {row["version"]: row for row in listed["versions"]}
    assert [rows[v]["status"] for v in ("v1", "v2", "v3", "v4")] == ["production", "unusable", "not promoted", "unusable"]
    assert rows["v2"]["problem"].startswith(f"{huge}: the integer 10000000000000000000... (401 characters) is beyond")
    assert rows["v4"]["problem"].startswith(f"{deep}: nested deeper than 32 levels")
    assert all("\n" not in (row["problem"] or "") for row in rows.values())
    assert rows["v3"]["auc"] is None and rows["v3"]["problem"] is None

    shown = models("list", store=location)
    assert shown.exit_code == 0 and shown.exception is None
    text = " ".join(shown.stdout.split())
    assert "Traceback" not in shown.output and "beyond +-2**53" in text and "nested deeper" in text
    assert "Production: v1" in text
    refused = models("show", "v2", store=location)
    assert refused.exit_code == 3 and refused.stderr.splitlines()[-1].startswith(f"error: {huge}: the integer")


def test_every_models_command_says_when_the_store_is_unsigned(location, model_bytes, monkeypatch):
    monkeypatch.delenv(registry.SIGNING_KEY_VARIABLE, raising=False)
    warning = registry.unsigned_warning(location)
    assert warning is not None
    publish(location, model_bytes, "v1")
    publish(location, model_bytes, "v2")
    for command in (["promote", "v1", "--reason", "first"], ["promote", "v2", "--reason", "second"],
                    ["rollback", "--reason", "back"], ["list"], ["show", "v1"], ["list", "--json"]):
        result = models(*command, store=location)
        assert result.exit_code == 0, result.output
        assert " ".join(result.stderr.split()) == f"warning: {warning}"
    assert as_json("list", store=location)["unsigned_warning"] == warning
    assert as_json("show", "v1", store=location)["unsigned_warning"] == warning

    monkeypatch.setenv(registry.SIGNING_KEY_VARIABLE, KEY)
    publish(location, model_bytes, "v3")
    promoted = models("promote", "v3", "--reason", "signed", store=location)
    assert promoted.exit_code == 0 and "UNSIGNED" not in promoted.stderr
    assert as_json("list", store=location)["unsigned_warning"] is None
