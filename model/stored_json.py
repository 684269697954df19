"""The one parser for JSON the product wrote and reads back (summaries, leases, ledger entries, part
rows, cards, engines records, the production pointer, generator cards, manifests, stack state).

Stored state is input too: whoever can write the results folder or the model store can write any
valid JSON there. ``json.loads`` alone lets through what breaks the code after it: integers of
hundreds of digits (``OverflowError`` on the first float conversion), ``NaN`` and ``Infinity``,
nesting deep enough for a ``RecursionError``, and files of any size. ``loads`` bounds all of them
and raises one error, ``StoredStateError`` (a ``ValueError``), that starts with the file's name.

Lives in ``model/`` because the card (``model.bundle``) is parsed here too and that package imports
nothing above it; it touches no storage.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_DOCUMENT_BYTES", "MAX_SAFE_INTEGER", "StoredStateError", "loads", "reason"]

MAX_DOCUMENT_BYTES = 16 * 2**20  # the largest document we write is a card or summary of some kB
MAX_DEPTH = 32  # a card, our deepest document, nests 5 levels
MAX_SAFE_INTEGER = 2**53  # beyond it a JSON integer no longer survives a float, as every reader but Python's knows


class StoredStateError(ValueError):
    """A stored document this code did not write as it reads: damaged, forged, or of another kind.
    The message starts with the document's location."""


def loads(data: bytes | str, source: str, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """The JSON value in ``data``, bounded in size, depth and number magnitude; StoredStateError
    naming ``source`` otherwise (never OverflowError, RecursionError or UnicodeDecodeError)."""
    if len(data) > max_bytes:
        raise StoredStateError(f"{source}: {len(data)} bytes, more than the {max_bytes} a stored document may have")
    try:
        value = json.loads(data, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise StoredStateError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    except StoredStateError as error:
        raise StoredStateError(f"{source}: {error}") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
        raise StoredStateError(f"{source}: not valid JSON ({error})") from None
    problem = _depth_problem(value)
    if problem:
        raise StoredStateError(f"{source}: {problem}")
    return value


def reason(error: Exception, source: str) -> str:
    """An error's message without the ``source: `` it starts with, for a caller that names the file
    once itself (storage errors and StoredStateError start with the location)."""
    message = str(error)
    return message[len(source) + 2:] if message.startswith(f"{source}: ") else message


def _integer(text: str) -> int:
    # Checked on the digits: converting a 5,000-digit string is itself a ValueError in Python 3.11+.
    if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_SAFE_INTEGER:
        raise StoredStateError(f"the integer {_cut(text)} is beyond +-2**53")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StoredStateError(f"the number {_cut(text)} is not finite")
    return value


def _constant(text: str) -> float:
    raise StoredStateError(f"{text} is not a number JSON allows")


def _cut(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def _depth_problem(value: Any) -> str | None:
    """Walks without recursion: the parser's own limit is the interpreter's, far above ours."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return None
