"""The out-of-scope set: every kind, varied, made from what is installed."""

from __future__ import annotations

import cv2
import numpy as np

from store import storage
from store.out_of_scope import KINDS, out_of_scope_images, write_out_of_scope_set
from store.phantoms import chest_phantom


def test_every_kind_is_made_and_the_images_vary(tmp_path):
    xrays = [chest_phantom(np.random.default_rng(seed), 200) for seed in range(4)]
    made = out_of_scope_images(4, xrays, size=96, seed=1)
    assert [kind for kind, _ in made].count("photograph") == 4 and {kind for kind, _ in made} == set(KINDS)
    for kind in KINDS:
        images = [image for named, image in made if named == kind]
        assert all(image.shape[:2] == (96, 96) and image.dtype == np.uint8 for image in images)
        assert len({image.tobytes() for image in images}) == len(images), kind  # no two alike
    photos = [image for kind, image in made if kind == "photograph"]
    assert all(image.ndim == 3 for image in photos)  # in colour, as photographs come
    inverted = [image for kind, image in made if kind == "inverted"]
    originals = [cv2.resize(xray, (96, 96), interpolation=cv2.INTER_AREA) for xray in xrays]
    assert all(any(np.array_equal(image, 255 - original) for original in originals) for image in inverted)
    counts = write_out_of_scope_set(str(tmp_path / "oos"), 2, xrays, size=64, seed=2)
    assert counts == dict.fromkeys(KINDS, 2)
    assert len(list(storage.list_files(str(tmp_path / "oos")))) == 2 * len(KINDS)


def test_without_xrays_only_the_other_kinds():
    assert {kind for kind, _ in out_of_scope_images(1, size=64)} == {"photograph", "document", "other modality",
                                                                     "blank or noise"}
