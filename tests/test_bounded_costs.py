"""Bounded costs (issue #22 item 6): a file without an image's name is peeked into once per content,
not once a night for ever; stratum variables are capped; a chunk reads and decodes a few batches
ahead of the model, not the whole chunk, and its size is capped."""

from __future__ import annotations

import logging
import os
import threading
import time

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from flows.parameters import MAX_CHUNK_SIZE, ScreenParameters, TrainParameters
from model.bundle import ModelCard
from model.inference import Predictor
from screening.results import ResultsLayout
from store import storage
from store.datasets import DatasetError, LabelledImage
from store.loading import load_image
from store.phantoms import chest_phantom
from tasks import screen_chunks
from tasks.screen_chunks import PEEKS_IN_FLIGHT, LoadedModel, find_inputs, read_ahead, screen_images
from tasks.train_data import LabelledArrays, build_split

DICOM = bytes(128) + b"DICM" + bytes(64)


@pytest.fixture
def peeks(monkeypatch) -> list[str]:
    """Every peek (a read of the first 132 bytes) through the storage verbs, by URI."""
    seen: list[str] = []
    real = storage.read_bytes

    def counting(uri, length=None, **options):
        if length == 132:
            seen.append(uri)
        return real(uri, length, **options)

    monkeypatch.setattr(storage, "read_bytes", counting)
    return seen


def _find(incoming: str, results: str) -> list[str]:
    return find_inputs.fn(incoming, exclude=[results], results_uri=results)


def test_a_file_without_an_image_name_is_peeked_into_once_per_content(location, peeks):
    incoming, results = storage.join(location, "incoming"), storage.join(location, "results")
    readme, study, image = (storage.join(incoming, name) for name in ("notes/readme", "pacs/1.2.840.1", "a.png"))
    storage.write_bytes(readme, b"no preamble here")
    storage.write_bytes(study, DICOM)
    storage.write_bytes(image, b"x")
    storage.write_bytes(storage.join(incoming, "list.csv"), b"a,b")  # never worth a peek

    assert _find(incoming, results) == sorted([image, study])
    assert sorted(peeks) == sorted([readme, study])
    remembered = storage.read_bytes(ResultsLayout(results).peeked(incoming))
    assert b"notes/readme" in remembered and b"pacs/1.2.840.1" in remembered

    peeks.clear()  # the second night: nothing changed, nothing is read
    assert _find(incoming, results) == sorted([image, study])
    assert peeks == []

    # New content under the same names: each is read again, once, and what it is now counts.
    storage.write_bytes(readme, DICOM)
    storage.write_bytes(study, b"not a study any more")
    assert _find(incoming, results) == sorted([image, readme])
    assert sorted(peeks) == sorted([readme, study])
    peeks.clear()
    assert _find(incoming, results) == sorted([image, readme])
    assert peeks == []

    storage.delete(readme)  # gone: dropped from the memory too
    assert _find(incoming, results) == [image]
    assert b"readme" not in storage.read_bytes(ResultsLayout(results).peeked(incoming))


def test_a_local_file_rewritten_in_place_with_its_old_times_is_peeked_again(tmp_path, peeks):
    incoming, results = tmp_path / "incoming", str(tmp_path / "results")
    incoming.mkdir()
    note = incoming / "note"
    note.write_bytes(bytes(200))
    _find(str(incoming), results)
    before = os.stat(note)
    with open(note, "r+b") as handle:  # same inode, same size, modification time set back
        handle.write(DICOM)
    os.utime(note, ns=(before.st_atime_ns, before.st_mtime_ns))
    peeks.clear()
    assert _find(str(incoming), results) == [str(note)]
    assert peeks == [str(note)]


def test_what_cannot_be_read_is_never_remembered_and_odd_names_are(tmp_path, peeks):
    incoming, results = tmp_path / "incoming", str(tmp_path / "results")
    incoming.mkdir()
    os.mkfifo(incoming / "pipe")
    (incoming / "broken").symlink_to(tmp_path / "missing")
    odd = os.path.join(os.fsencode(incoming), b"caf\xe9-notes")  # not UTF-8: a file:// URI
    with open(odd, "wb") as handle:
        handle.write(b"plain")
    unreadable = sorted([str(incoming / "pipe"), str(incoming / "broken")])
    assert _find(str(incoming), results) == unreadable
    assert len(peeks) == 3
    peeks.clear()
    assert _find(str(incoming), results) == unreadable  # their rows say why, every night
    assert sorted(peeks) == unreadable


def test_damaged_or_unwritable_memory_costs_peeks_never_the_night(location, peeks, monkeypatch, caplog):
    incoming, results = storage.join(location, "incoming"), storage.join(location, "results")
    study, other = storage.join(incoming, "1.2.3"), storage.join(incoming, "other")
    storage.write_bytes(study, DICOM)
    storage.write_bytes(other, b"plain")
    memory = ResultsLayout(results).peeked(incoming)
    for damage in (b"{not json", b'{"format": 1, "dicom": {}, "not_image": {"other": 1' + b"0" * 30 + b"}}",
                   b'{"format": 1, "dicom": []}', b"[" * 100 + b"]" * 100):
        storage.write_bytes(memory, damage)
        peeks.clear()
        with caplog.at_level(logging.WARNING, logger="tasks.screen_chunks"):
            assert _find(incoming, results) == [study]
        assert sorted(peeks) == sorted([study, other])
        assert memory in caplog.text and "damaged" in caplog.text
        caplog.clear()
    peeks.clear()
    assert _find(incoming, results) == [study] and peeks == []  # rewritten whole by the last run

    def refused(uri, data):
        raise storage.AccessDenied(uri, "access denied (AccessDenied)")

    storage.write_bytes(other, b"changed")
    monkeypatch.setattr(storage, "write_bytes", refused)
    with caplog.at_level(logging.WARNING, logger="tasks.screen_chunks"):
        assert _find(incoming, results) == [study]
    assert "not kept" in caplog.text


def test_peeks_run_in_parallel_and_bounded(tmp_path, monkeypatch):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for number in range(3 * PEEKS_IN_FLIGHT):
        (incoming / f"file-{number}").write_bytes(b"plain")
    active, most, lock = [0], [0], threading.Lock()
    real = storage.read_bytes

    def slow(uri, length=None, **options):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.02)
        try:
            return real(uri, length, **options)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(storage, "read_bytes", slow)
    assert find_inputs.fn(str(incoming)) == []
    assert 1 < most[0] <= PEEKS_IN_FLIGHT


def test_the_listing_stamps_each_file_from_the_listing_alone(location):
    storage.write_bytes(storage.join(location, "a"), b"one")
    storage.write_bytes(storage.join(location, "b/c"), b"two")
    first = dict(storage.list_files_stamped(location))
    assert list(first) == list(storage.list_files(location))
    assert all(first.values()) and first == dict(storage.list_files_stamped(location))
    storage.write_bytes(storage.join(location, "a"), b"uno")
    second = dict(storage.list_files_stamped(location))
    assert second[storage.join(location, "a")] != first[storage.join(location, "a")]
    assert second[storage.join(location, "b/c")] == first[storage.join(location, "b/c")]
    assert list(storage.list_files_stamped(storage.join(location, "nothing"), missing_ok=True)) == []


def test_a_link_is_stamped_by_its_target_too_and_a_broken_one_not_at_all(tmp_path):
    target, link, broken = tmp_path / "target", tmp_path / "link", tmp_path / "broken"
    target.write_bytes(b"one")
    link.symlink_to(target)
    broken.symlink_to(tmp_path / "missing")
    first = dict(storage.list_files_stamped(str(tmp_path)))
    assert first[str(broken)] is None and first[str(link)]
    target.write_bytes(b"two, longer")
    assert dict(storage.list_files_stamped(str(tmp_path)))[str(link)] != first[str(link)]


# --- strata -----------------------------------------------------------------------------------------


def _manifest_images(columns: int) -> LabelledArrays:
    """48 images of 24 patients, two classes, each with ``columns`` two-level manifest columns."""
    items = tuple(LabelledImage(f"/data/{i}.png", "covid" if i % 2 else "normal", f"p{i // 2}", f"{i:064x}",
                                {f"col{c:05d}": str((i + c) % 2) for c in range(columns)}) for i in range(48))
    return LabelledArrays(items, np.zeros((48, 8, 8, 3), np.uint8), ())


def test_thousands_of_stratum_columns_are_capped_and_the_dropped_ones_named(caplog):
    loaded = _manifest_images(5000)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        split = build_split(loaded, "covid", False, 0.25, 0, balance_strata="auto",
                            logger=logging.getLogger("test.strata"))
    assert list(split.strata) == [f"col{c:05d}" for c in range(20)]
    assert split.strata_dropped == tuple(f"col{c:05d}" for c in range(20, 5000))
    assert "4980 dropped: col00020, col00021" in caplog.text and "and 4930 more" in caplog.text
    assert time.monotonic() - started < 60
    assert list(build_split(loaded, "covid", False, 0.25, 0, balance_strata="none", max_strata=30).strata)[-1] \
        == "col00029"


def test_more_strata_named_than_allowed_are_refused():
    with pytest.raises(DatasetError, match="30 strata named, more than the 20 allowed"):
        build_split(_manifest_images(40), "covid", False, 0.25, 0, strata=[f"col{c:05d}" for c in range(30)])
    assert TrainParameters(dataset_uri="d").max_strata == 20
    with pytest.raises(ValidationError):
        TrainParameters(dataset_uri="d", max_strata=0)


# --- a chunk's reads and decodes ---------------------------------------------------------------------


def test_decoded_images_waiting_for_a_slow_model_stay_a_few_batches(tmp_path, monkeypatch):
    folder, count, batch_size = tmp_path / "incoming", 60, 4
    folder.mkdir()
    rng = np.random.default_rng(0)
    uris = []
    for number in range(count):
        path = folder / f"{number:03d}.png"
        cv2.imwrite(str(path), chest_phantom(rng, 96))
        uris.append(str(path))
    card = ModelCard(version="v-bounded", classes=["non-covid", "covid"], positive_class="covid", threshold=0.5,
                     preprocessing={"version": 1, "input_size": 32, "scale_mode": "unit", "interpolation": "area"},
                     weights={"origin": "none"}, dataset={}, metrics={})

    started, taken, lock = [0], [0], threading.Lock()

    def counting_load(uri, spec, limits):  # the real read and decode, counted as they start
        with lock:
            started[0] += 1
        return load_image(uri, spec, limits)

    def slow_model(pixels: np.ndarray) -> np.ndarray:  # slower than the reads
        time.sleep(0.15)
        return np.tile([0.9, 0.1], (len(pixels), 1))

    monkeypatch.setattr(screen_chunks, "load_image", counting_load)
    model = LoadedModel(card, Predictor("fp32", card.spec(), slow_model, 2), None, "test")
    threads = 4
    bound = read_ahead(batch_size, threads) + batch_size  # ahead of the model, and the batch it fills
    most = 0
    for row in screen_images(uris, model, batch_size, workers=threads, explain="none"):
        assert row.status == "ok", row.reason
        taken[0] += 1
        with lock:
            most = max(most, started[0] - taken[0])
    assert taken[0] == count
    assert most <= bound < count, f"{most} inputs read or decoded and not yet screened; at most {bound} allowed"


def test_an_oversize_chunk_is_refused_clearly():
    assert ScreenParameters(incoming_uri="in", chunk_size=MAX_CHUNK_SIZE).chunk_size == MAX_CHUNK_SIZE
    with pytest.raises(ValidationError, match=f"at most {MAX_CHUNK_SIZE} images per chunk, not 100000"):
        ScreenParameters(incoming_uri="in", chunk_size=100_000)
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["screen", "in", "--chunk-size", "5000"], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert f"--chunk-size: at most {MAX_CHUNK_SIZE} images per chunk, not 5000" in " ".join(result.output.split())
