"""auto's engine speeds: measured once per machine and week, kept in a file, never trusted blindly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import keras
import pytest

from model import inference
from model.inference import make_predictor
from model.network import build_classifier
from model.preprocessing import Preprocessing
from screening import engine_speeds
from screening.engine_speeds import MAX_AGE, machine_key, recall, remember
from tasks import screen_chunks

SPEC = Preprocessing(input_size=48)
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def speeds_path(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "engine-speeds.json"
    monkeypatch.setenv("CXR_ENGINE_SPEEDS", str(path))
    return path


@pytest.fixture(scope="module")
def predictors() -> list:
    keras.utils.set_random_seed(0)
    model = build_classifier(2, SPEC.input_size, None, head="linear")
    return [make_predictor(model, SPEC, engine) for engine in ("fp32", "bf16")]


@pytest.fixture
def timings(monkeypatch) -> list[list[str]]:
    """The engines each real timing (model.inference.fastest) measured."""
    made: list[list[str]] = []

    def recording(predictors, batch_size=inference.BATCH_SIZE, batches=2):
        made.append([predictor.engine for predictor in predictors])
        return inference.fastest(predictors, batch_size, batches=1)

    monkeypatch.setattr(screen_chunks, "fastest", recording)
    return made


def key(batch_size: int = 16, engines: tuple[str, ...] = ("bf16", "fp32")) -> dict:
    return machine_key(list(engines), SPEC.input_size, batch_size)


def test_kept_speeds_come_back_for_the_same_key_only():
    remember(key(), {"fp32": 7.0, "bf16": 14.0}, now=NOW)
    found = recall(key(), now=NOW + timedelta(hours=1))
    assert found is not None and found.speeds == {"fp32": 7.0, "bf16": 14.0} and found.measured_at == NOW
    assert recall(key(batch_size=32), now=NOW) is None
    assert recall(key(engines=("bf16", "fp32", "int8")), now=NOW) is None
    other_machine = {**key(), "cpu": "another CPU"}
    assert recall(other_machine, now=NOW) is None


def test_the_key_names_what_speeds_depend_on(monkeypatch):
    measured = key()
    assert {"cpu", "cpu_flags", "cores", "threads", "gpus", "engines", "input_size", "batch_size", "tensorflow",
            "openvino", "onednn"} <= set(measured)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    default = key()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    assert key() == default  # unset and '1' are both TensorFlow's default
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert key() != default  # oneDNN off makes bf16 another engine


def test_speeds_are_measured_again_after_a_week_and_not_from_the_future():
    remember(key(), {"fp32": 7.0, "bf16": 14.0}, now=NOW)
    assert recall(key(), now=NOW + MAX_AGE - timedelta(minutes=1)) is not None
    assert recall(key(), now=NOW + MAX_AGE + timedelta(minutes=1)) is None
    assert recall(key(), now=NOW - timedelta(days=1)) is None  # the clock went back: measure again


@pytest.mark.parametrize("content", [
    b"\x00\xff not json",
    b"[]",
    b'{"format": 1}',
    b'{"format": 99, "entries": []}',
    b'{"format": 1, "entries": [{"key": {}, "speeds": {"fp32": -1}, "measured_at": "2026-12-07T12:00:00+00:00"}]}',
    b'{"format": 1, "entries": [{"key": {}, "speeds": {"fp32": NaN}, "measured_at": "2026-12-07T12:00:00+00:00"}]}',
    b'{"format": 1, "entries": [{"key": {}, "speeds": {"fp32": 1}, "measured_at": "2026-12-07T12:00:00"}]}',
    b'{"format": 1, "entries": [{"key": {}, "speeds": {}, "measured_at": "yesterday"}]}',
])
def test_a_damaged_file_is_ignored_and_replaced(speeds_path, content, caplog):
    speeds_path.parent.mkdir(parents=True)
    speeds_path.write_bytes(content)
    assert recall(key(), now=NOW) is None
    assert "is damaged" in caplog.text and str(speeds_path) in caplog.text
    remember(key(), {"fp32": 7.0, "bf16": 14.0}, now=NOW)
    assert recall(key(), now=NOW).speeds == {"fp32": 7.0, "bf16": 14.0}
    assert [path.name for path in speeds_path.parent.iterdir()] == [speeds_path.name]  # no temporary left


def test_speeds_that_do_not_cover_the_engines_are_not_used(speeds_path):
    remember(key(), {"fp32": 7.0, "bf16": 14.0}, now=NOW)
    document = json.loads(speeds_path.read_text())
    document["entries"][0]["speeds"] = {"fp32": 7.0, "int8": 99.0}  # an engine this key does not have
    speeds_path.write_text(json.dumps(document))
    assert recall(key(), now=NOW) is None


def test_off_keeps_nothing(speeds_path, monkeypatch):
    monkeypatch.setenv("CXR_ENGINE_SPEEDS", "off")
    remember(key(), {"fp32": 7.0, "bf16": 14.0}, now=NOW)
    assert recall(key(), now=NOW) is None and not speeds_path.parent.exists()


def test_an_unwritable_place_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CXR_ENGINE_SPEEDS", str(blocker / "engine-speeds.json"))
    remember(key(), {"fp32": 7.0, "bf16": 14.0}, now=NOW)
    assert "not kept" in caplog.text and recall(key(), now=NOW) is None


def test_the_file_keeps_the_newest_entries_only(speeds_path):
    for size in range(engine_speeds.MAX_ENTRIES + 5):
        remember(key(batch_size=size + 1), {"fp32": 7.0, "bf16": 14.0}, now=NOW + timedelta(seconds=size))
    assert len(json.loads(speeds_path.read_text())["entries"]) == engine_speeds.MAX_ENTRIES
    assert recall(key(batch_size=1), now=NOW + timedelta(minutes=5)) is None  # the oldest went
    assert recall(key(batch_size=engine_speeds.MAX_ENTRIES + 5), now=NOW + timedelta(minutes=5)) is not None


def test_auto_times_the_engines_once_and_then_uses_what_it_measured(predictors, timings, speeds_path):
    first, why = screen_chunks._fastest_here(predictors, SPEC.input_size, 4)
    assert timings == [["fp32", "bf16"]] and speeds_path.exists()
    assert "fp32" in why and "bf16" in why and "measured on this machine" in why
    again, why_again = screen_chunks._fastest_here(predictors, SPEC.input_size, 4)
    assert len(timings) == 1  # no second timing
    assert again.engine == first.engine and why_again == why
    screen_chunks._fastest_here(predictors, SPEC.input_size, 8)  # another batch size: timed again
    assert len(timings) == 2


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_auto_follows_the_kept_speeds(predictors, timings, faster):
    """Whatever the kept figures say within the validated engines decides, with no timing."""
    slower = "bf16" if faster == "fp32" else "fp32"
    remember(key(batch_size=4), {faster: 20.0, slower: 10.0})
    chosen, why = screen_chunks._fastest_here(predictors, SPEC.input_size, 4)
    assert chosen.engine == faster and timings == []
    assert f"{faster} 20 img/s" in why


def test_a_damaged_file_means_timing_again(predictors, timings, speeds_path):
    speeds_path.parent.mkdir(parents=True)
    speeds_path.write_text("{")
    screen_chunks._fastest_here(predictors, SPEC.input_size, 4)
    assert len(timings) == 1 and recall(key(batch_size=4)) is not None  # and the file is whole again


def test_a_single_validated_engine_is_never_timed(predictors, timings):
    chosen, why = screen_chunks._fastest_here(predictors[:1], SPEC.input_size, 4)
    assert chosen.engine == "fp32" and why == "auto: the only validated engine" and timings == []

