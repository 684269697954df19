"""Dataset discovery, patient-grouped splits, fingerprints and duplicate reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from store import storage
from store.datasets import (
    DatasetError,
    LabelledImage,
    discover_dataset,
    find_duplicates,
    fingerprint,
    hash_images,
    split_dataset,
)
from tests.conftest import CXR, require_shared_data


def write(root: str, name: str, data: bytes = b"x") -> str:
    uri = storage.join(root, name)
    storage.write_bytes(uri, data)
    return uri


def test_class_folders_are_case_insensitive_and_stray_files_ignored(location):
    write(location, "COVID/a.png", b"1")
    write(location, "covid/b.jpg", b"2")
    write(location, "Normal/c.jpeg", b"3")
    write(location, "readme.txt")
    write(location, "loose.png")
    write(location, "normal/notes.txt")
    dataset = discover_dataset(location)
    assert dataset.source == "folders"
    assert dataset.class_counts == {"covid": 2, "normal": 1}
    assert sorted(storage.relative_to(u, location) for u in dataset.ignored) == [
        "loose.png",
        "normal/notes.txt",
        "readme.txt",
    ]


def test_manifest_with_patients(location):
    write(location, "img/1.png", b"1")
    write(location, "img/2.png", b"2")
    write(location, "img/3.png", b"3")
    write(location, "manifest.csv", b"file,class,patient_id,age\nimg/1.png,COVID,p1,50\nimg/2.png,normal,p1,50\nimg/3.png,normal,,9\n")
    dataset = discover_dataset(location)
    assert dataset.source == "manifest"
    assert [(storage.relative_to(i.uri, location), i.label, i.patient_id) for i in dataset.items] == [
        ("img/1.png", "covid", "p1"),
        ("img/2.png", "normal", "p1"),
        ("img/3.png", "normal", None),
    ]


def test_manifest_naming_missing_files_is_an_error_that_names_them(location):
    write(location, "a.png")
    write(location, "manifest.csv", b"file,class\na.png,covid\ngone.png,normal\n")
    with pytest.raises(DatasetError, match=r"1 listed file\(s\) not found.*gone\.png"):
        discover_dataset(location)


def test_manifest_without_required_columns(location):
    write(location, "manifest.csv", b"path,label\na.png,covid\n")
    with pytest.raises(DatasetError, match="missing column.*class, file"):
        discover_dataset(location)


def test_empty_dataset_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no labelled images found.*class sub-folders"):
        discover_dataset(str(tmp_path))


def test_fingerprint_depends_on_content_and_labels_not_names_or_order():
    a = [LabelledImage("x/1.png", "covid", sha256="aa"), LabelledImage("x/2.png", "normal", sha256="bb")]
    renamed = [LabelledImage("y/b.png", "normal", sha256="bb"), LabelledImage("y/a.png", "covid", sha256="aa")]
    relabelled = [LabelledImage("x/1.png", "normal", sha256="aa"), LabelledImage("x/2.png", "normal", sha256="bb")]
    assert fingerprint(a) == fingerprint(renamed)
    assert fingerprint(a) != fingerprint(relabelled)
    assert fingerprint(a) != fingerprint(a[:1])
    with pytest.raises(ValueError, match="no sha256"):
        fingerprint([LabelledImage("x", "covid")])


def test_hash_images_reads_content(location):
    import hashlib

    uri = write(location, "covid/a.png", b"pixels")
    (item,) = hash_images([LabelledImage(uri, "covid")])
    assert item.sha256 == hashlib.sha256(b"pixels").hexdigest()


def test_duplicates_under_two_labels_are_reported():
    items = [
        LabelledImage("covid/a.png", "covid", sha256="same"),
        LabelledImage("normal/a-copy.png", "normal", sha256="same"),
        LabelledImage("normal/b.png", "normal", sha256="other"),
        LabelledImage("normal/b-copy.png", "normal", sha256="other"),  # same label: not a conflict
    ]
    report = find_duplicates(items)
    assert list(report.conflicting_labels) == ["same"]
    assert "covid/a.png (covid)" in report.lines()[0] and "normal/a-copy.png (normal)" in report.lines()[0]


def test_exact_copies_never_straddle_the_split_and_leaks_are_reported():
    items = [LabelledImage(f"img/{i:03d}.png", "covid" if i % 3 else "normal", sha256=f"{i:03d}") for i in range(60)]
    items += [LabelledImage(f"copy/{i:03d}.png", "covid" if i % 3 else "normal", sha256=f"{i:03d}") for i in range(20)]
    split = split_dataset(items, seed=3)
    assert not find_duplicates(items, split).across_split
    train_digests = {i.sha256 for i in split.train}
    assert not train_digests & {i.sha256 for i in split.test}
    # A split made elsewhere, with a copy on each side, is reported.
    copy = replace(split.test[0], uri="leak.png")
    leaky = replace(split, train=split.train + (copy,))
    assert list(find_duplicates(items, leaky).across_split) == [copy.sha256]


def test_split_refuses_bad_fraction_and_too_few_patients():
    items = [LabelledImage(f"{i}.png", "covid", patient_id="same") for i in range(10)]
    with pytest.raises(ValueError):
        split_dataset(items, test_fraction=1.5)
    with pytest.raises(DatasetError, match="from 1 patients"):
        split_dataset(items)


@pytest.mark.needs_data
def test_split_of_the_real_dataset_is_grouped_stratified_and_reproducible():
    require_shared_data()
    dataset = discover_dataset(str(CXR))
    assert dataset.source == "manifest"
    assert dataset.class_counts == {"bacterial": 75, "covid": 360, "normal": 101, "viral": 100}
    assert len({i.patient_id for i in dataset.items}) == 422

    split = split_dataset(dataset.items, test_fraction=0.2, seed=42)
    assert len(split.train) + len(split.test) == 636
    assert not {i.patient_id for i in split.train} & {i.patient_id for i in split.test}
    assert 0.15 <= len(split.test) / 636 <= 0.25

    whole = Counter(i.label for i in dataset.items)
    test = Counter(i.label for i in split.test)
    for label, count in whole.items():
        assert abs(test[label] / len(split.test) - count / 636) <= 0.05, label

    again = split_dataset(list(reversed(dataset.items)), test_fraction=0.2, seed=42)
    assert again.test == split.test
    other = split_dataset(dataset.items, test_fraction=0.2, seed=7)
    assert other.test != split.test
