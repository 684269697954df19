"""Engine checks beside a bundle: bound to its model, signed with the card's key, the gate re-applied."""

from __future__ import annotations

import json

import pytest

from model.bundle import BundleError, ModelCard
from model.inference import EngineCheck
from store import engines, storage

SHA = "ab" * 32


def card(version: str = "v1", sha: str = SHA) -> ModelCard:
    return ModelCard(version=version, classes=["non-covid", "covid"], positive_class="covid", threshold=0.5,
                     preprocessing={}, weights={}, dataset={}, metrics={}, model_sha256=sha)


def check(passed: bool = True, agreement: float = 1.0, auc: float | None = 0.001, engine: str = "bf16") -> EngineCheck:
    return EngineCheck(engine, 100, agreement, 0.003, auc, passed)


INT8 = {"model-int8.xml": b"<net/>", "model-int8.bin": b"\x00" * 16}


def test_a_passing_engine_may_serve(location):
    engines.record_checks(location, card(), [check()])
    assert engines.validated_engines(location, card()) == (["fp32", "bf16"], "not checked: int8")


def test_without_checks_only_fp32_and_the_note_says_how_to_check(location):
    allowed, note = engines.validated_engines(location, card())
    assert allowed == ["fp32"] and "cxr-screen validate-engines v1" in note


def test_a_failed_engine_is_never_used_and_the_note_says_why(location):
    engines.record_checks(location, card(), [check(passed=False, agreement=0.97)])
    allowed, note = engines.validated_engines(location, card())
    assert allowed == ["fp32"] and "bf16 failed the gate" in note and "97.0%" in note


def test_a_forged_verdict_is_not_believed(location):
    engines.record_checks(location, card(), [check(passed=True, agreement=0.9)])  # figures that fail the gate
    assert engines.validated_engines(location, card())[0] == ["fp32"]


def test_checks_of_another_model_are_ignored(location):
    engines.record_checks(location, card(sha="cd" * 32), [check()])
    allowed, note = engines.validated_engines(location, card())
    assert allowed == ["fp32"] and "checks of another model" in note


BAD_FIGURES = {"engine": "bf16", "images": 100, "flag_agreement": "0.999", "max_probability_difference": 0.0,
               "auc_difference": None, "passed": True}


@pytest.mark.parametrize("damage", [b"not json", b'{"model_version": "v1"}',
                                    json.dumps({"model_version": "v1", "model_sha256": SHA,
                                                "checks": {"bf16": BAD_FIGURES}}).encode(),
                                    json.dumps({"model_version": "v1", "model_sha256": SHA, "checks": {
                                        "bf16": {**BAD_FIGURES, "flag_agreement": True}}}).encode(),
                                    json.dumps({"model_version": "v1", "model_sha256": SHA, "checks": {
                                        "bf16": {"engine": "bf16", "surprise": 1}}}).encode()])
def test_a_damaged_record_means_fp32_only(location, damage):
    storage.write_bytes(storage.join(location, "v1", engines.ENGINES_FILE), damage)
    allowed, note = engines.validated_engines(location, card())
    assert allowed == ["fp32"] and "not an engine record" in note


def test_with_a_signing_key_only_signed_checks_count(location, monkeypatch):
    engines.record_checks(location, card(), [check()])  # unsigned
    monkeypatch.setenv("CXR_MODEL_SIGNING_KEY", "secret")
    allowed, note = engines.validated_engines(location, card())
    assert allowed == ["fp32"] and "not signed" in note
    engines.record_checks(location, card(), [check()])
    assert engines.validated_engines(location, card())[0] == ["fp32", "bf16"]
    monkeypatch.setenv("CXR_MODEL_SIGNING_KEY", "another")
    assert "signature does not match" in engines.validated_engines(location, card())[1]


def test_int8_serves_only_with_its_files_as_recorded(location):
    engines.record_checks(location, card(), [check(), check(engine="int8")], INT8)
    assert engines.validated_engines(location, card())[0] == ["fp32", "bf16", "int8"]
    assert engines.load_artifacts(location, card(), "int8") == INT8
    assert engines.load_artifacts(location, card(), "bf16") is None
    storage.write_bytes(storage.join(location, "v1", "model-int8.bin"), b"\x01" * 16)
    with pytest.raises(BundleError, match="model-int8.bin: does not match its sha256"):
        engines.load_artifacts(location, card(), "int8")


def test_an_int8_check_without_its_files_does_not_serve(location):
    engines.record_checks(location, card(), [check(engine="int8")])
    assert engines.validated_engines(location, card())[0] == ["fp32"]


def test_reduced_decoding_is_used_only_after_it_passed_the_gate(location):
    assert not engines.reduced_decode_allowed(location, card())
    engines.record_checks(location, card(), [check(engine="reduced-jpeg", agreement=0.98)])
    assert not engines.reduced_decode_allowed(location, card())
    engines.record_checks(location, card(), [check(), check(engine="reduced-jpeg")])
    assert engines.reduced_decode_allowed(location, card())
    assert engines.validated_engines(location, card())[0] == ["fp32", "bf16"]  # a shortcut, not an engine


def rule_two(engine: str = "bf16", far_flips: int = 0, correlation: float | None = 0.99, share: float | None = 0.01,
             claimed: bool = True) -> EngineCheck:
    """A rule-2 check: 2 flips near the threshold (99.0 % agreement, which rule 1 refused)."""
    return EngineCheck(engine, 200, 0.99, 0.02, 0.001, claimed, 0.015, 2, far_flips, 0.0, 0.03, 0.01, 0.03,
                       correlation, share, claimed)


def test_rule_two_figures_decide_when_read_and_older_records_keep_rule_one(location):
    engines.record_checks(location, card(), [rule_two()])
    assert engines.validated_engines(location, card())[0] == ["fp32", "bf16"]
    engines.record_checks(location, card(), [rule_two(far_flips=1)])  # a flip far from the threshold
    allowed, note = engines.validated_engines(location, card())
    assert allowed == ["fp32"] and "1 outside the band" in note
    engines.record_checks(location, card(), [check(agreement=0.99)])  # the same agreement, recorded under rule 1
    assert engines.validated_engines(location, card())[0] == ["fp32"]


def test_explanations_come_from_an_engine_only_after_their_own_gate(location):
    assert engines.explaining_engines(location, card()) == ["fp32"]  # no record: fp32's own maps
    engines.record_checks(location, card(), [rule_two(), rule_two("int8", correlation=0.80)], INT8)
    assert engines.validated_engines(location, card())[0] == ["fp32", "bf16", "int8"]
    assert engines.explaining_engines(location, card()) == ["fp32", "bf16"]  # int8 serves, its maps do not
    engines.record_checks(location, card(), [rule_two(share=0.2, claimed=True)])  # a forged verdict
    assert engines.explaining_engines(location, card()) == ["fp32"]
    engines.record_checks(location, card(), [rule_two(correlation=None, share=None)])  # maps not checked
    assert engines.explaining_engines(location, card()) == ["fp32"]


@pytest.mark.parametrize("field, value", [("far_flips", -1), ("flips", 1.5), ("explanation_correlation", 2.0),
                                          ("sensitivity_noise", "0.1"), ("explanation_lung_share_difference", -0.1)])
def test_rule_two_figures_out_of_range_mean_fp32_only(location, field, value):
    figures = {**rule_two().to_dict(), field: value}
    storage.write_bytes(storage.join(location, "v1", engines.ENGINES_FILE), json.dumps(
        {"model_version": "v1", "model_sha256": SHA, "checks": {"bf16": figures}}).encode())
    allowed, note = engines.validated_engines(location, card())
    assert allowed == ["fp32"] and "not an engine record" in note
