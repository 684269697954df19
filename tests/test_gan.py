"""The class-conditional GAN (model/gan.py) and its fidelity and memorisation checks (model/gan_quality.py).

Features come from the project's VGG16 base with ``weights=None`` (untrained, He-initialised from a
seed), as in the rest of the tests: no download. In production the feature space is the frozen
ImageNet base; the checks here are about the arithmetic and the verdicts, which hold in either space.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from model.gan import (
    GanConfig,
    build_discriminator,
    build_generator,
    generate,
    generator_from_files,
    generator_to_files,
    init_generator,
    train_gan,
)
from model.gan_quality import (
    fd_floor,
    frechet_distance,
    frechet_distance_of,
    memorisation_check,
    nearest_neighbour_distances,
    vgg16_features,
)
from model.network import build_base
from model.plots import samples_png
from model.preprocessing import Preprocessing
from store.phantoms import chest_phantom

SIZE = 64
PER_CLASS = 48
# Small enough to train in under a minute on 2 CPU cores.
FAST = GanConfig(image_size=SIZE, width=16, epochs=30, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def phantoms():
    """Training images (normal, then covid with opacities), their labels, and held-out normals."""
    rng = np.random.default_rng(0)
    train = np.stack([chest_phantom(rng, SIZE, opacities=index >= PER_CLASS) for index in range(2 * PER_CLASS)])
    labels = np.repeat([0, 1], PER_CLASS)
    held_out = np.stack([chest_phantom(rng, SIZE) for _ in range(PER_CLASS)])
    return train, labels, held_out


@pytest.fixture(scope="module")
def features():
    return vgg16_features(build_base(SIZE, None), Preprocessing(SIZE))


def test_config_checks_its_arguments():
    with pytest.raises(ValueError, match="image_size"):
        GanConfig(image_size=100)
    with pytest.raises(ValueError, match="label_smoothing"):
        GanConfig(label_smoothing=0.7)
    assert GanConfig().to_dict()["version"] == 1


@pytest.mark.parametrize("size", [64, 128])
def test_networks_fit_the_configured_size(size):
    config = GanConfig(image_size=size, width=8)
    generator, discriminator = build_generator(config, 2), build_discriminator(config, 2)
    images = np.asarray(generator([np.zeros((3, config.noise_dim), np.float32), np.array([0, 1, 1], np.int32)]))
    assert tuple(images.shape) == (3, size, size, 1)
    assert float(np.abs(images).max()) <= 1.0
    assert tuple(discriminator([images, np.array([0, 1, 1], np.int32)]).shape) == (3, 1)
    assert any("spectral" in type(layer).__name__.lower() for layer in discriminator.layers)


def test_generate_repeats_with_its_seed_and_checks_the_label():
    generator = init_generator(2, GanConfig(width=8))
    first, again, other = (generate(generator, 1, 5, seed=seed) for seed in (3, 3, 4))
    assert first.dtype == np.uint8 and first.shape == (5, SIZE, SIZE)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    with pytest.raises(ValueError, match="label"):
        generate(generator, 2, 1)


def test_generator_round_trips_through_its_files():
    generator = init_generator(3, GanConfig(width=8, seed=2))
    generator.history = {"generator_loss": [0.7]}
    loaded = generator_from_files(generator_to_files(generator))
    assert (loaded.config, loaded.num_classes, loaded.history) == (generator.config, 3, generator.history)
    np.testing.assert_array_equal(generate(loaded, 2, 4, seed=1), generate(generator, 2, 4, seed=1))
    files = generator_to_files(generator)
    with pytest.raises(ValueError, match="missing"):
        generator_from_files({"gan.json": files["gan.json"]})


def test_train_gan_checks_labels(phantoms):
    train, labels, _ = phantoms
    with pytest.raises(ValueError, match="labels"):
        train_gan(train, labels[:-1], FAST)
    with pytest.raises(ValueError, match="uint8"):
        train_gan(train.astype(np.float32), labels, FAST)


def test_frechet_distance_of_gaussians_matches_the_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (4000, 3))
    b = rng.normal([2.0, 0.0, 0.0], [1.0, 1.0, 3.0], (4000, 3))
    # |mu_a - mu_b|^2 + tr(I + diag(1, 1, 9) - 2 diag(1, 1, 3)) = 4 + 4
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_is_zero_to_itself_and_larger_to_another_distribution(phantoms, features):
    train, _, held_out = phantoms
    normal, covid = train[:PER_CLASS], train[PER_CLASS:]
    assert frechet_distance_of(held_out, held_out, features) == pytest.approx(0.0, abs=1e-6)
    floor = fd_floor(np.concatenate([normal, held_out]), features)
    to_covid = frechet_distance_of(held_out, covid, features)
    noise = np.random.default_rng(1).integers(0, 256, held_out.shape, dtype=np.uint8)
    to_noise = frechet_distance_of(held_out, noise, features)
    assert 0.0 < floor < to_covid < to_noise


def test_nearest_neighbour_distances_leave_one_out():
    points = np.array([[0.0], [1.0], [3.0]])
    np.testing.assert_allclose(nearest_neighbour_distances(points, points, leave_one_out=True), [1.0, 1.0, 2.0])
    np.testing.assert_allclose(nearest_neighbour_distances(np.array([[2.9]]), points), [0.1])
    # The first two are one patient's images: each looks past its own patient.
    np.testing.assert_allclose(nearest_neighbour_distances(points, points, leave_one_out=True, groups=np.array(["a", "a", "b"])),
                               [3.0, 2.0, 2.0])


def test_memorisation_check_rejects_training_images_and_noised_copies(phantoms, features):
    train, _, _ = phantoms
    normal = train[:PER_CLASS]
    copies = normal[np.random.default_rng(2).integers(0, PER_CLASS, 40)]
    report = memorisation_check(copies, normal, features)
    assert not report.passed
    assert any(reason.startswith("pixels") for reason in report.reasons)
    assert any(reason.startswith("features") for reason in report.reasons)
    noised = np.clip(copies + np.random.default_rng(3).normal(0, 4, copies.shape), 0, 255).astype(np.uint8)
    assert not memorisation_check(noised, normal, features).passed
    # A generator that slips a few copies (3 in 40, over the 5% quantile) among new images is refused too.
    mixed = np.concatenate([phantoms[2][:37], normal[:3]])
    assert not memorisation_check(mixed, normal, features, quantile=0.05).passed


def test_memorisation_check_looks_past_a_patients_own_images(phantoms, features):
    """A data set where every patient has two near-identical images: without patient ids the real
    images look like copies of each other and copies pass; with them, copies are refused."""
    train, _, _ = phantoms
    normal = train[:PER_CLASS // 2]
    twice = np.concatenate([normal, np.clip(normal.astype(int) + 1, 0, 255).astype(np.uint8)])
    patients = np.tile(np.arange(len(normal)), 2)
    noise = np.random.default_rng(4).normal(0, 4, normal[:20].shape)
    copies = np.clip(normal[:20] + noise, 0, 255).astype(np.uint8)  # noised copies
    assert memorisation_check(copies, twice, features).passed  # the trap the ids avoid
    report = memorisation_check(copies, twice, features, patients=patients)
    assert not report.passed, report.to_dict()


def test_memorisation_check_accepts_real_held_out_images(phantoms, features):
    train, _, held_out = phantoms
    report = memorisation_check(held_out, train[:PER_CLASS], features)
    assert report.passed, report.reasons
    summary = report.to_dict()
    assert set(summary["spaces"]) == {"pixels", "features"}
    assert summary["spaces"]["pixels"]["real_to_real"]["q05"] > 0


@pytest.mark.slow
def test_gan_trained_on_phantoms_beats_its_untrained_self(phantoms, features):
    """Its training time is bench/gan_bench.py's to report, beside the runs it is compared with."""
    train, labels, held_out = phantoms
    generator = train_gan(train, labels, FAST)
    assert len(generator.history["generator_loss"]) == FAST.epochs
    untrained = init_generator(2, FAST)
    for label, real in ((0, held_out), (1, train[PER_CLASS:])):
        trained_fd = frechet_distance_of(generate(generator, label, PER_CLASS, seed=1), real, features)
        untrained_fd = frechet_distance_of(generate(untrained, label, PER_CLASS, seed=1), real, features)
        assert trained_fd < 0.5 * untrained_fd, (label, trained_fd, untrained_fd)
    samples = generate(generator, 0, PER_CLASS, seed=1)
    report = memorisation_check(samples, train[:PER_CLASS], features)
    assert report.passed, report.reasons
    sheet = samples_png({"normal": samples, "covid": generate(generator, 1, 8, seed=1)},
                        {"normal": held_out, "covid": train[PER_CLASS:]})
    assert sheet.startswith(b"\x89PNG")


@pytest.mark.slow
def test_training_repeats_with_its_seed(phantoms):
    train, labels, _ = phantoms
    config = GanConfig(image_size=SIZE, width=8, epochs=2, batch_size=16, seed=5)
    first, again = (generate(train_gan(train, labels, config), 1, 4, seed=0) for _ in range(2))
    np.testing.assert_array_equal(first, again)


def _decoded(png: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_samples_sheet_shows_real_beside_synthetic_per_class(phantoms):
    train, _, held_out = phantoms
    synthetic = generate(init_generator(2, GanConfig(width=8)), 1, 5, seed=0)
    one_class = _decoded(samples_png({"covid": synthetic}, {"covid": train[PER_CLASS:]}, columns=6))
    two_classes = _decoded(samples_png({"covid": synthetic, "normal": synthetic[:2]},
                                       {"covid": train[PER_CLASS:], "normal": held_out}, columns=6))
    assert two_classes.shape[0] > 1.5 * one_class.shape[0]  # two rows more
    assert two_classes.shape[1] == pytest.approx(one_class.shape[1], rel=0.1)
    with pytest.raises(ValueError, match="same classes"):
        samples_png({"covid": synthetic}, {"normal": held_out})


def test_memorisation_check_refuses_a_few_exact_copies_the_quantile_would_miss():
    """3 copies among 203 images sit below the 5 % quantile's reach; the per-image floor catches them."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (1, 64, 64))
    real = np.clip(base + rng.normal(0, 25, (40, 64, 64)), 0, 255).astype(np.uint8)
    fresh = np.clip(base + rng.normal(0, 25, (200, 64, 64)), 0, 255).astype(np.uint8)
    assert memorisation_check(fresh, real, None, patients=np.arange(40)).passed
    report = memorisation_check(np.concatenate([fresh, real[:3]]), real, None, patients=np.arange(40))
    assert not report.passed and any("3 of 203 synthetic images" in reason for reason in report.reasons), report.reasons
