"""Synthetic minority-class chest X-rays from a class-conditional GAN (#14), published only if private.

Reads top to bottom as the steps: find the data, check the request, load it, split it exactly as
``train`` does with the same seed, train the GAN on the training split only, generate the images,
measure them (Fréchet distance per class against the real-halves floor; nearest-neighbour
distances against the real-to-real ones), refuse a generator that copies patients' images, then
write the images, the generator bundle that vouches for them and the dataset's manifest, and report.
"""

from __future__ import annotations

from prefect import flow

from flows.parameters import SynthesizeParameters
from model.gan import GanConfig, generate
from model.preprocessing import Preprocessing
from store import registry
from store.clock import utc_timestamp
from tasks.synthesis import (
    Synthesis,
    check_request,
    describe_generator,
    gray_training_images,
    measure_quality,
    publish_synthesis,
    refuse_if_memorised,
    report_synthesis,
    train_generator,
)
from tasks.train_data import discover, load_labelled, resolve_weights, split_for_training


def gan_config(params: SynthesizeParameters) -> GanConfig:
    return GanConfig(image_size=params.image_size, width=params.width, epochs=params.epochs,
                     batch_size=params.batch_size, seed=params.seed)


@flow(name="synthesize", description="Train a GAN on the training split and publish synthetic images of one class.")
def synthesize(params: SynthesizeParameters) -> Synthesis:
    """Returns the generator version, its bundle and the synthetic dataset; raises GeneratorRefused
    (nothing published) when its images are copies of training images."""
    target = params.synthetic_class.strip().lower()
    config = gan_config(params)  # bad settings fail here, before any data is read
    version = registry.new_version()
    out_uri = params.out_uri.replace("{version}", version)
    weights, weights_info = resolve_weights(params.weights)

    dataset = discover(params.dataset_uri)
    check_request(dataset, target, out_uri, params.generator_store_uri)
    loaded = load_labelled(dataset.items, Preprocessing(input_size=params.image_size))
    # train's split: the same function, seed and test fraction, classes one by one (the split itself
    # depends on the labels, patients and content only); strata play no part in it.
    split = split_for_training(loaded, target, True, params.test_fraction, params.seed, strata=[],
                               balance_strata=None)
    images, labels, patients = gray_training_images(loaded, split)

    generator = train_generator(images, labels, split.classes, config)
    published = generate(generator, split.classes.index(target), params.count, seed=params.seed)
    quality = measure_quality(generator, images, labels, patients, split.classes, target, published, weights,
                              weights_info["origin"], params.input_size, params.seed)
    refuse_if_memorised(quality, params.dataset_uri)

    card = describe_generator(version, generator, quality, dataset, loaded, split, params.test_fraction, params.seed,
                              target, len(published), out_uri, utc_timestamp())
    synthesis = publish_synthesis(params.generator_store_uri, out_uri, card, generator, quality, published)
    report_synthesis(synthesis)
    return synthesis
