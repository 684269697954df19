"""The generator store: one folder per generator version, as the model store keeps models (#14).

    <store>/<version>/generator.keras, gan.json    the network and its config (model.gan)
    <store>/<version>/samples.png                  real beside synthetic images, per class
    <store>/<version>/quality.json                 Fréchet distances and the memorisation report
    <store>/<version>/card.md                      the same for people
    <store>/<version>/card.json.sig                HMAC of card.json, when CXR_MODEL_SIGNING_KEY is set
    <store>/<version>/card.json                    written last: the card, with the sha256 of every other file

The same rules as model bundles (tasks/registry.py): card.json goes last, so a folder without one is
an unfinished upload; loading refuses files whose sha256 differs from the card's and, with a signing
key set, a card without a valid signature. Only generators that passed the memorisation check are
ever written here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from model.bundle import BundleError, file_digests, is_safe_name, sign
from model.gan import Generator, generator_from_files
from tasks import registry, storage

__all__ = ["GeneratorCard", "load_generator", "publish_generator"]

KIND = "cxr-generator"


@dataclass
class GeneratorCard:
    """What a generator version is: its classes and config, the data it learned from (the training
    split only: ``dataset``), what was measured of it (``quality``), what it was asked to make
    (``synthesized``), and the sha256 of every other file (``files``)."""

    version: str
    classes: list[str]
    config: dict  # GanConfig.to_dict()
    dataset: dict  # uri, split_seed, test_fraction, train_fingerprint, train_images per class
    quality: dict  # feature space, Fréchet distance per class against its floor, memorisation report
    synthesized: dict = field(default_factory=dict)  # class, count, seed, dataset uri
    software: dict = field(default_factory=dict)
    created_at: str = ""
    files: dict = field(default_factory=dict)
    kind: str = KIND

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> GeneratorCard:
        """A card checked for what loading relies on; errors start with ``source`` (its URI)."""
        try:
            values = json.loads(data)
        except ValueError as error:
            raise BundleError(f"{source}: not a generator card: {error}") from error
        if not isinstance(values, dict) or values.get("kind") != KIND:
            raise BundleError(f"{source}: not a generator card (kind {values.get('kind') if isinstance(values, dict) else None!r})")
        if not is_safe_name(values.get("version")):
            raise BundleError(f"{source}: version {values.get('version')!r} is not a safe name")
        if not isinstance(values.get("files"), dict) or not values["files"]:
            raise BundleError(f"{source}: no file manifest")
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def publish_generator(store_uri: str, card: GeneratorCard, files: dict[str, bytes]) -> str:
    """Write a generator version; returns its folder. The card, listing every file's sha256, goes
    last; with a signing key its signature just before it. An existing version is never overwritten."""
    folder = storage.join(store_uri, card.version)
    if {registry.CARD, registry.SIGNATURE} & files.keys():
        raise BundleError(f"{folder}: {registry.CARD} and its signature are written here, not passed as files")
    if not is_safe_name(card.version):
        raise BundleError(f"{store_uri}: {card.version!r} is not a safe version name")
    card.files = file_digests(files)
    card_json = card.to_json()
    if storage.exists(storage.join(folder, registry.CARD)):
        raise BundleError(f"{folder}: generator version {card.version} already exists")
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
    key = registry.signing_key()
    if key is not None:
        storage.write_bytes(storage.join(folder, registry.SIGNATURE), sign(card_json, key))
    if not storage.create_if_absent(storage.join(folder, registry.CARD), card_json):
        raise BundleError(f"{folder}: generator version {card.version} already exists")
    return folder


def load_generator(store_uri: str, version: str) -> tuple[Generator, GeneratorCard]:
    """A published generator and its card: signature (when a key is set), card, and every file's
    sha256 checked before the network is loaded (Keras safe mode)."""
    if not is_safe_name(version):
        raise BundleError(f"{store_uri}: {version!r} is not a generator version")
    folder = storage.join(store_uri, version)
    card_uri = storage.join(folder, registry.CARD)
    try:
        card_json = storage.read_bytes(card_uri)
    except storage.NotFound:
        raise BundleError(f"{card_uri}: no such generator version") from None
    registry.check_signature(storage.join(folder, registry.SIGNATURE), card_json, registry.CARD)
    card = GeneratorCard.from_json(card_json, card_uri)
    if card.version != version:
        raise BundleError(f"{card_uri}: the card says version {card.version!r}, but it lies in folder {version!r}")
    files = {}
    for name, expected in card.files.items():
        if not is_safe_name(name):
            raise BundleError(f"{card_uri}: {name!r} is not a bundle file name")
        data = storage.read_bytes(storage.join(folder, name))
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(f"{storage.join(folder, name)}: sha256 differs from the card's: the file is damaged "
                              "or was replaced")
        files[name] = data
    try:
        return generator_from_files(files), card
    except (ValueError, KeyError) as error:
        raise BundleError(f"{folder}: not a usable generator: {error}") from error
