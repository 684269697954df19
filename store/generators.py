"""The generator store: one folder per generator version, as the model store keeps models (#14).

    <store>/<version>/generator.keras, gan.json    the network and its config (model.gan)
    <store>/<version>/samples.png                  real beside synthetic images, per class
    <store>/<version>/quality.json                 Fréchet distances and the memorisation report
    <store>/<version>/card.md                      the same for people
    <store>/<version>/card.json.sig                HMAC of card.json, when CXR_MODEL_SIGNING_KEY is set
    <store>/<version>/card.json                    written last: the card, with the sha256 of every other file

The same rules as model bundles (store/registry.py): card.json goes last, so a folder without one is
an unfinished upload; loading refuses files whose sha256 differs from the card's and, with a signing
key set, a card without a valid signature. Only generators that passed the memorisation check are
ever written here.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields

from model import stored_json
from model.bundle import BundleError, file_digests, is_safe_name
from model.gan import Generator, generator_from_files
from store import registry, storage

__all__ = ["REPUBLISH_GENERATOR", "GeneratorCard", "load_generator", "publish_generator"]

KIND = "cxr-generator"
REPUBLISH_GENERATOR = "publish the generator again with the key set (cxr-screen synthesize)"


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
    synthesized: dict = field(default_factory=dict)  # class, count, seed, dataset uri, images: file -> sha256
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
            values = stored_json.loads(data, source)
        except stored_json.StoredStateError as error:
            raise BundleError(f"{error} (not a generator card)") from None
        if not isinstance(values, dict) or values.get("kind") != KIND:
            raise BundleError(f"{source}: not a generator card (kind {values.get('kind') if isinstance(values, dict) else None!r})")
        if not is_safe_name(values.get("version")):
            raise BundleError(f"{source}: version {values.get('version')!r} is not a safe name")
        if not isinstance(values.get("files"), dict) or not values["files"]:
            raise BundleError(f"{source}: no file manifest")
        return cls(**_checked_fields(cls, values, source))


def _checked_fields(cls: type, values: dict, source: str) -> dict:
    """The card's fields with the types loading relies on: a card edited by hand (a key missing,
    a list where a mapping belongs) is refused with its URI, never a TypeError deep inside."""
    checked = {}
    for item in fields(cls):
        if item.name not in values:
            if item.default is MISSING and item.default_factory is MISSING:
                raise BundleError(f"{source}: key {item.name!r} missing")
            continue
        value, expected = values[item.name], _FIELD_TYPES[item.name]
        if not isinstance(value, expected):
            raise BundleError(f"{source}: {item.name!r} is {type(value).__name__}, expected {expected.__name__}")
        checked[item.name] = value
    if not all(isinstance(name, str) for name in checked["classes"]):
        raise BundleError(f"{source}: 'classes' must list names")
    if not all(isinstance(digest, str) for digest in checked["files"].values()):
        raise BundleError(f"{source}: 'files' must map names to sha256 digests")
    return checked


_FIELD_TYPES = {"version": str, "classes": list, "config": dict, "dataset": dict, "quality": dict, "synthesized": dict,
                "software": dict, "created_at": str, "files": dict, "kind": str}


def publish_generator(store_uri: str, card: GeneratorCard, files: dict[str, bytes]) -> str:
    """Write a generator version; returns its folder. The card, listing every file's sha256, goes
    last; with a signing key its signature just before it. An existing version is never overwritten;
    one whose card is this one (but for the files' digests) is returned as it is: a retry after a
    transient error."""
    folder = storage.join(store_uri, card.version)
    if {registry.CARD, registry.SIGNATURE} & files.keys():
        raise BundleError(f"{folder}: {registry.CARD} and its signature are written here, not passed as files")
    if not is_safe_name(card.version):
        raise BundleError(f"{store_uri}: {card.version!r} is not a safe version name")
    card.files = file_digests(files)
    card_json = card.to_json()
    registry.write_bundle(folder, files, card_json, f"generator version {card.version}",
                          retried=lambda published: _same_but_files(published, card_json))
    return folder


def _same_but_files(published: bytes, card_json: bytes) -> bool:
    """Whether a published card is this one but for its files' digests: the same publication
    retried. Keras' .keras archive carries a timestamp, so saving the same network again gives other
    bytes; the published card still vouches for the files published with it."""
    try:
        existing, new = stored_json.loads(published, registry.CARD), stored_json.loads(card_json, registry.CARD)
    except ValueError:
        return False
    return isinstance(existing, dict) and {**existing, "files": None} == {**new, "files": None}


def load_generator(store_uri: str, version: str) -> tuple[Generator, GeneratorCard]:
    """A published generator and its card: signature (when a key is set), card, and every file's
    sha256 checked before the network is loaded (Keras safe mode)."""
    if not is_safe_name(version):
        raise BundleError(f"{store_uri}: {version!r} is not a generator version")
    folder = storage.join(store_uri, version)
    card_uri = storage.join(folder, registry.CARD)
    card = GeneratorCard.from_json(registry.read_signed_card(folder, lambda: "no such generator version",
                                                             REPUBLISH_GENERATOR), card_uri)
    if card.version != version:
        raise BundleError(f"{card_uri}: the card says version {card.version!r}, but it lies in folder {version!r}")
    files = {name: registry.read_listed(folder, card.files, name) for name in card.files}
    try:
        return generator_from_files(files, folder), card
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"{folder}: not a usable generator: {error}") from error
