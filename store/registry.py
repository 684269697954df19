"""The model store: one folder per version, and ``production.json`` naming the current one.

    <store>/<version>/model.keras, history.json, curves.png, confusion.png, roc.png, ..., card.md
    <store>/<version>/card.json.sig     HMAC of card.json, when a signing key is set
    <store>/<version>/card.json         written last: the version's schema-checked card, with the
                                        sha256 of every other file (``files``)
    <store>/production.json             the production version, and who changed it when and why
                                        (``signature``: HMAC of the rest, when a signing key is set)

``card.json`` is written last, so a version folder without one is an unfinished upload and is
never loaded or listed. With ``CXR_MODEL_SIGNING_KEY`` set, publishing signs card.json, promotion
signs production.json, and loading refuses a card or pointer whose signature is missing or wrong
(one line naming the file and how to write it again with the key). Without a key nothing is
signed or checked, and ``unsigned_warning`` is the one line training, promotion, screening and the
models command say so with.

production.json carries its signature inside it (not beside it, as card.json.sig): it is replaced
with a compare-and-swap, and a second file could not change in the same step.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import itertools
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import keras

from model import stored_json
from model.bundle import BundleError, ModelCard, check_file, file_digests, is_safe_name, model_from_bytes, sign, signature_matches
from model.drift_tests import DRIFT_REFERENCE_FILE, Profile
from model.inference import INT8_FILES
from model.scope import SCOPE_FILE, ScopeModel
from store import storage
from store.clock import utc_now, utc_timestamp

__all__ = ["CARD", "PRODUCTION", "SIGNATURE", "SIGNING_KEY_VARIABLE", "Production", "PromotionConflict",
           "list_versions", "load_card", "load_model", "new_version", "operator", "production_version",
           "publish", "read_file", "read_production", "rollback", "set_production",
           "signing_key", "unsigned_warning", "verify_bundle"]

PRODUCTION = "production.json"
CARD = "card.json"
SIGNATURE = "card.json.sig"
SIGNING_KEY_VARIABLE = "CXR_MODEL_SIGNING_KEY"
# Written beside a bundle by store/engines.py: engine checks, their signature, engine files.
ENGINES = "engines.json"
ENGINES_SIGNATURE = "engines.json.sig"
ENGINE_FILES = (ENGINES, ENGINES_SIGNATURE, *INT8_FILES)
EVALUATIONS = "evaluations"  # <version>/evaluations/<id>/: site evaluations, by store/evaluations.py
POINTER_SIGNATURE = "signature"  # the field of production.json that holds its HMAC
# How to write again, with the key, what a key refuses (check_signature's ``fix``).
REPUBLISH_MODEL = "publish it again with the key set (cxr-screen train)"
REPROMOTE = "sign it by promoting a signed version again: cxr-screen models promote VERSION --reason ..."

logger = logging.getLogger(__name__)


def signing_key() -> bytes | None:
    """The HMAC key bundles are signed and checked with, or None: then nothing is signed or checked."""
    key = os.environ.get(SIGNING_KEY_VARIABLE, "")
    return key.encode() if key else None


def unsigned_warning(store_uri: str) -> str | None:
    """The one warning, one line, that ``store_uri`` is used unsigned: None when a signing key is
    set (then everything in it is signed when written and checked when read). Training, promotion,
    screening and ``cxr-screen models`` log it, print it and put it on their artifacts and reports."""
    if signing_key() is not None:
        return None
    return (f"UNSIGNED MODEL STORE {store_uri}: {SIGNING_KEY_VARIABLE} is not set, so nothing in it is signed or "
            "checked: whoever can write there can change a model's threshold, which engines serve it or which "
            "version is production, and nothing will notice. Set the same secret in "
            f"{SIGNING_KEY_VARIABLE} for training, promotion and screening (versions published without it must "
            "be published again).")


def new_version() -> str:
    """Sortable by time, unique across concurrent trainings."""
    return utc_now().strftime("v%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def publish(store_uri: str, version: str, files: dict[str, bytes], card: ModelCard) -> str:
    """Write a bundle; returns its folder URI. The card goes last and marks it complete.

    The card written lists the sha256 of every file (``files``); one that lists other digests is
    refused. With a signing key, the signature goes just before the card.
    """
    folder = storage.join(store_uri, version)
    write_bundle(folder, files, _card_to_publish(card, version, files, folder), f"version {version}")
    return folder


def write_bundle(folder: str, files: dict[str, bytes], card_json: bytes, what: str,
                 retried: Callable[[bytes], bool] | None = None) -> None:
    """The files, the signature (with a signing key), then card.json last: it marks the folder
    complete. A published card is never overwritten: refused as "``what`` already exists", unless
    ``retried(its bytes)`` says it is this very publication, written by an earlier try."""
    card_uri = storage.join(folder, CARD)

    def published_before() -> None:
        if retried is None or not retried(storage.read_bytes(card_uri)):
            raise BundleError(f"{folder}: {what} already exists")

    if storage.exists(card_uri):  # before overwriting a published version's files
        published_before()
        return
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
    key = signing_key()
    if key is not None:
        storage.write_bytes(storage.join(folder, SIGNATURE), sign(card_json, key))
    if not storage.create_if_absent(card_uri, card_json):
        published_before()


def read_signed_card(folder: str, missing: Callable[[], str], fix: str = REPUBLISH_MODEL) -> bytes:
    """card.json's bytes, its signature checked (with a signing key set: ``fix`` says how to write
    it again with the key); a folder without one (an unfinished upload is never read) raises
    BundleError with ``missing()``, after the card's URI."""
    uri = storage.join(folder, CARD)
    try:
        card_json = storage.read_bytes(uri)
    except storage.NotFound:
        raise BundleError(f"{uri}: {missing()}") from None
    check_signature(storage.join(folder, SIGNATURE), card_json, CARD, fix)
    return card_json


def read_listed(folder: str, digests: dict[str, str], name: str) -> bytes:
    """A bundle file, refused unless its sha256 is the one its card lists."""
    if not is_safe_name(name):
        raise BundleError(f"{storage.join(folder, CARD)}: {name!r} is not a bundle file name")
    uri = storage.join(folder, name)
    data = storage.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != digests.get(name):
        raise BundleError(f"{uri}: sha256 differs from the card's: the file is damaged or was replaced")
    return data


def _card_to_publish(card: ModelCard, version: str, files: dict[str, bytes], folder: str) -> bytes:
    """card.json's bytes, checked as loading will check them, so a bundle that could never load is
    never written."""
    if {CARD, SIGNATURE} & files.keys():
        raise BundleError(f"{folder}: {CARD} and {SIGNATURE} are written by the registry, not passed as files")
    digests = file_digests(files)
    if card.files and card.files != digests:
        raise BundleError(f"{folder}: the card's file manifest does not match the files being published")
    card_json = dataclasses.replace(card, files=digests).to_json()
    checked = ModelCard.from_json(card_json, f"{folder}/{CARD}")
    if checked.version != version:
        raise BundleError(f"{folder}: the card is for version {checked.version}, not {version}")
    return card_json


def list_versions(store_uri: str) -> list[str]:
    cards = storage.list_files(store_uri, {"/" + CARD}, missing_ok=True)
    names = {storage.relative_to(uri, store_uri).split("/")[0] for uri in cards}
    return sorted(name for name in names if is_safe_name(name))


class PromotionConflict(BundleError):
    """production.json changed between reading it and writing it: this change did not happen."""


@dataclass(frozen=True)
class Production:
    """production.json as read: the current version, every change of production (oldest first:
    action, version, previous, reason, by, at), and the token the next change is written against.
    ``problem``: why a damaged pointer was taken for none."""

    version: str | None = None
    history: tuple[dict, ...] = ()
    token: str | None = None
    problem: str | None = None

    def lineage(self) -> list[str]:
        """The versions production has been, as promotions push and rollbacks pop: the last is the
        current one, the one before it what a rollback restores."""
        stack: list[str] = []
        for entry in self.history:
            if entry.get("action") == "rollback":
                stack = stack[:-1] if stack else []
            elif not stack and entry.get("previous"):
                stack.append(entry["previous"])
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
        if self.version is not None and (not stack or stack[-1] != self.version):
            stack.append(self.version)
        return stack


def read_production(store_uri: str) -> Production:
    """The pointer with its history and compare-and-swap token. A damaged one reads as no version,
    with ``problem`` saying why (promotion replaces it); one written before histories (version,
    previous, reason, promoted_at) reads as a history of that one change. With a signing key set,
    an unsigned pointer, one whose signature does not match, or one whose history does not lead to
    its version is damaged too: nobody but a holder of the key chose that version."""
    uri = storage.join(store_uri, PRODUCTION)
    data, token = storage.read_versioned(uri)
    if data is None:
        return Production()
    try:
        record = stored_json.loads(data, uri)
        version = record["version"]
    except stored_json.StoredStateError as error:
        return Production(token=token, problem=str(error))
    except (TypeError, KeyError) as error:
        return Production(token=token, problem=f"{uri}: not a production pointer ({error!r})")
    problem = _pointer_problem(uri, record)
    if problem:
        return Production(token=token, problem=problem)
    if not is_safe_name(version):
        return Production(token=token, problem=f"{uri}: version {version!r} is not a safe name")
    history = record.get("history")
    if not isinstance(history, list):
        history = [{"action": "promote", "version": version, "previous": record.get("previous"),
                    "reason": record.get("reason"), "by": None, "at": record.get("promoted_at")}]
    kept = tuple({**entry, "previous": entry.get("previous") if is_safe_name(entry.get("previous")) else None}
                 for entry in history if isinstance(entry, dict) and is_safe_name(entry.get("version")))
    if len(kept) < len(history):
        logger.warning("%s: %d history entries without a valid version ignored", uri, len(history) - len(kept))
    return Production(version, kept, token)


def _pointer_bytes(record: dict) -> bytes:
    """What production.json's signature covers: every field but the signature, as canonical JSON
    (the pointer holds strings and nulls, which read back and dump again to the same bytes)."""
    return json.dumps({name: value for name, value in record.items() if name != POINTER_SIGNATURE},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _pointer_problem(uri: str, record: dict) -> str | None:
    """With a signing key: why the pointer is not to be followed (unsigned, signature wrong, a
    history that does not lead to its version), or None. Without one: None."""
    key = signing_key()
    if key is None:
        return None
    signature = record.get(POINTER_SIGNATURE)
    if not isinstance(signature, str) or not signature:
        return (f"{uri}: not signed, and {SIGNING_KEY_VARIABLE} is set: an unsigned production pointer is not "
                f"followed (whoever can write the store could have named any version); {REPROMOTE}")
    if not signature_matches(_pointer_bytes(record), signature.encode(), key):
        return (f"{uri}: signature does not match under the key in {SIGNING_KEY_VARIABLE}: changed since it was "
                f"signed, or signed with another key; {REPROMOTE}")
    history = record.get("history")
    if not isinstance(history, list) or not history or not all(
            isinstance(entry, dict) and is_safe_name(entry.get("version")) for entry in history):
        return f"{uri}: signed, but its history is not a list of changes: {REPROMOTE}"
    for before, entry in itertools.pairwise(history):
        if entry.get("previous") != before["version"]:
            return (f"{uri}: signed, but its history does not chain: {entry['version']} replaced "
                    f"{entry.get('previous')!r}, not {before['version']}; {REPROMOTE}")
    if history[-1]["version"] != record["version"] or history[-1].get("previous") != record.get("previous"):
        return f"{uri}: signed, but its history ends at {history[-1]['version']}, not at {record['version']!r}; {REPROMOTE}"
    return None


def production_version(store_uri: str) -> str | None:
    production = read_production(store_uri)
    if production.problem:
        raise BundleError(production.problem)
    return production.version


def operator() -> str:
    """Who is changing production: the OS user."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a bare container)
        return f"uid {os.getuid()}"


def set_production(store_uri: str, version: str, reason: str, *, by: str | None = None,
                   expected: Production | None = None, action: str = "promote") -> dict | None:
    """Make ``version`` production and record who and why; returns the history entry, or None when
    it already is production.

    The bundle is checked first (its signature when a key is set, every file's sha256, preprocessing
    this code reproduces): a damaged or unsigned one is refused. production.json is written with a
    compare-and-swap against ``expected`` (default: as read here): if it changed since, nothing is
    written and PromotionConflict says to what, so two promotions never both win blindly.
    """
    if not reason.strip():
        raise ValueError("a reason is required to change production")
    if version == "production" or not is_safe_name(version):
        raise BundleError(f"{store_uri}: {version!r} is not a model version")
    seen = expected if expected is not None else read_production(store_uri)
    if seen.problem:  # a damaged pointer is what promotion replaces, not a reason to stop
        logger.warning("%s; replacing it", seen.problem)
    if seen.version == version:
        return None
    verify_bundle(store_uri, version).spec()
    entry = {"action": action, "version": version, "previous": seen.version, "reason": reason,
             "by": by or operator(), "at": utc_timestamp()}
    if seen.problem:  # the history could not be read: what was replaced is recorded instead
        entry["replaced"] = seen.problem
    record = {"version": version, "previous": seen.version, "reason": reason, "promoted_at": entry["at"],
              "promoted_by": entry["by"], "history": [*seen.history, entry]}
    key = signing_key()
    if key is not None:
        record[POINTER_SIGNATURE] = sign(_pointer_bytes(record), key).decode().strip()
    uri = storage.join(store_uri, PRODUCTION)
    if storage.replace_if_unchanged(uri, json.dumps(record, indent=2).encode(), seen.token):
        return entry
    now = read_production(store_uri)
    last = now.history[-1] if now.history and now.version == now.history[-1]["version"] else {}
    if now.version == version and all(last.get(k) == entry[k] for k in ("action", "previous", "reason", "by")):
        return last  # this very change, written by an earlier try whose answer was lost
    changed_by = f" by {last['by']} at {last.get('at')} ({last.get('reason')})" if last.get("by") else ""
    raise PromotionConflict(f"{uri}: production changed while this was deciding: it was {seen.version or 'none'}, "
                            f"it is now {now.version or 'none'}{changed_by}; {version} was not made production "
                            "(look again: cxr-screen models list)")


def rollback(store_uri: str, reason: str, *, by: str | None = None, expected: Production | None = None) -> dict:
    """Make the previous production version production again (the one before the current one in
    the lineage: rolling back twice goes two steps back); returns the history entry."""
    seen = expected if expected is not None else read_production(store_uri)
    if seen.problem:  # its history cannot be trusted to say what came before
        raise BundleError(seen.problem)
    lineage = seen.lineage()
    if len(lineage) < 2:
        raise BundleError(f"{storage.join(store_uri, PRODUCTION)}: nothing to roll back to: production "
                          f"{'is ' + seen.version if seen.version else 'is not set'} and has no earlier version")
    return set_production(store_uri, lineage[-2], reason, by=by, expected=seen, action="rollback") or {}


def resolve(store_uri: str, version: str = "production") -> str:
    if version != "production":
        return version
    current = production_version(store_uri)
    if current is None:
        raise BundleError(f"{store_uri}: no production model yet: train one first (cxr-screen train)")
    return current


def load_card(store_uri: str, version: str = "production") -> ModelCard:
    """The version's card: signed (when a key is set), valid against the schema, and for the
    folder it lies in. A card without a file manifest (an old bundle) loads with a warning."""
    version = resolve(store_uri, version)
    if not is_safe_name(version):
        raise BundleError(f"{store_uri}: {version!r} is not a model version")
    uri = storage.join(store_uri, version, CARD)
    card_json = read_signed_card(storage.join(store_uri, version), lambda: "no such model version (known: "
                                 f"{', '.join(list_versions(store_uri)) or 'none'})")
    card = ModelCard.from_json(card_json, uri)
    if card.version != version:
        raise BundleError(f"{uri}: the card says version {card.version!r}, but it lies in folder {version!r}")
    if not card.files:
        logger.warning("%s has no file manifest (written before manifests): only model.keras can be checked", uri)
    return card


def check_signature(signature_uri: str, data: bytes, signed: str, fix: str = REPUBLISH_MODEL) -> None:
    """With a signing key set, ``data`` (the file named ``signed``, beside ``signature_uri``) must
    carry a valid signature there: BundleError otherwise, one line naming the file and ``fix`` (how
    to write it again with the key). Without a key, nothing is checked."""
    key = signing_key()
    if key is None:
        return
    folder, _, _ = signature_uri.rpartition("/")
    uri = f"{folder}/{signed}" if folder else signed
    try:
        signature = storage.read_bytes(signature_uri)
    except storage.NotFound:
        raise BundleError(f"{uri}: not signed ({signature_uri} missing), and {SIGNING_KEY_VARIABLE} is set: only "
                          f"what was written with the key is read; {fix}") from None
    if not signature_matches(data, signature, key):
        raise BundleError(f"{uri}: signature does not match ({signature_uri}, under the key in "
                          f"{SIGNING_KEY_VARIABLE}): {signed} was changed since it was signed, or signed with another "
                          f"key; {fix}")


def read_file(store_uri: str, card: ModelCard, name: str) -> bytes:
    """A file of the card's bundle, checked against its manifest."""
    if not is_safe_name(name):
        raise BundleError(f"model {card.version}: {name!r} is not a bundle file name")
    data = storage.read_bytes(storage.join(store_uri, card.version, name))
    check_file(card, name, data)
    return data


def load_model(store_uri: str, version: str = "production") -> tuple[keras.Model, ModelCard]:
    """The model and its card; checks signature, schema, sha256 and preprocessing, loads in Keras safe mode."""
    card = load_card(store_uri, version)
    return model_from_bytes(read_file(store_uri, card, "model.keras"), card), card


def load_scope(store_uri: str, card: ModelCard) -> ScopeModel | None:
    """The version's scope gate (model/scope.py), checked against the manifest; None for a version
    trained before it."""
    if SCOPE_FILE not in card.files:
        return None
    data = read_file(store_uri, card, SCOPE_FILE)
    try:
        return ScopeModel.from_bytes(data, f"{card.version}/{SCOPE_FILE}")
    except ValueError as error:  # listed and hashed, yet not a scope model: written by a broken trainer
        raise BundleError(f"model {card.version}: {error}") from error


def load_drift_reference(store_uri: str, card: ModelCard) -> Profile | None:
    """What the version's test split looked like (model/drift_tests.py), checked against the
    manifest; None for a version trained before it."""
    if DRIFT_REFERENCE_FILE not in card.files:
        return None
    data = read_file(store_uri, card, DRIFT_REFERENCE_FILE)
    try:
        return Profile.from_dict(stored_json.loads(data, f"{card.version}/{DRIFT_REFERENCE_FILE}"))
    except ValueError as error:  # listed and hashed, yet not a profile: written by a broken trainer
        raise BundleError(f"model {card.version}: {DRIFT_REFERENCE_FILE}: {error}") from error


def verify_bundle(store_uri: str, version: str = "production", *, include_model: bool = True) -> ModelCard:
    """Checks every file the card lists against its manifest, and that none is missing; returns the
    card. ``include_model=False`` leaves model.keras (the largest) to ``load_model``, which checks
    it anyway. Files the card does not list are no part of the bundle: nothing reads them, so they
    are named in a warning, not refused (a stray note in a version folder must not stop a night)."""
    card = load_card(store_uri, version)
    folder = storage.join(store_uri, card.version)
    # Engine files (store/engines.py) and site evaluations (store/evaluations.py) lie beside the
    # bundle, vouched for by their own signed records.
    present = {name for name in (storage.relative_to(uri, folder) for uri in storage.list_files(folder))
               if not name.startswith(EVALUATIONS + "/")} - {CARD, SIGNATURE, *ENGINE_FILES}
    listed = set(card.files) if card.files else {"model.keras"}
    if card.files and present - listed:
        logger.warning("%s: %s not in the card's file manifest: not part of the bundle, ignored", folder,
                       ", ".join(sorted(present - listed)))
    if listed - present:
        raise BundleError(f"{folder}: {', '.join(sorted(listed - present))} missing")
    for name in sorted(listed - (set() if include_model else {"model.keras"})):
        read_file(store_uri, card, name)
    return card
