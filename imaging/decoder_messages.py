"""What the decoders say while they decode: captured and read for damage, or kept quiet.

libjpeg, libpng and libtiff report damage only as lines on the process' stderr, which
``with_decoder_messages`` captures and ``damage_reason`` reads. pydicom and Pillow warn and log
through Python, and their lines can quote header values, so ``quiet_decoders`` silences them while
any decode runs.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import BinaryIO, TypeVar

__all__ = ["damage_reason", "quiet_decoders", "with_decoder_messages"]

# libjpeg, libpng and libtiff report damage as lines on stderr (warnings for JPEG, where libjpeg
# pads the missing part with grey and carries on; a CRC error in an ancillary PNG chunk is also only
# a warning): the first phrase found decides the reason. The lines hold chunk names and numbers at
# most, but a reason uses only our own words.
_DAMAGE_PHRASES = {
    "JPEG": (
        ("Premature end of JPEG file", "truncated JPEG: the file ends before the image does"),
        ("premature end of data segment", "truncated JPEG: the image data stops before the image is complete"),
        ("bad Huffman code", "corrupt JPEG data: a bad Huffman code in the image data"),
        ("bad arithmetic code", "corrupt JPEG data: a bad arithmetic code in the image data"),
        ("extraneous bytes before marker", "corrupt JPEG data: stray bytes between segments"),
        ("instead of RST", "corrupt JPEG data: a restart marker is missing"),
        ("Corrupt JPEG data", "corrupt JPEG data"),
        ("Inconsistent progression sequence", "corrupt JPEG data: the progressive scans are incomplete"),
        ("Invalid SOS parameters", "corrupt JPEG data: invalid scan parameters"),
    ),
    "PNG": (
        ("input buffer is incomplete", "truncated PNG: the file ends before the image does"),
        ("Not enough image data", "truncated PNG: the image data ends before the image does"),
        ("libpng error: IHDR", "damaged PNG header"),
        ("CRC error", "corrupt PNG: a chunk fails its checksum"),
        ("libpng error", "corrupt PNG: the compressed image data is damaged"),
    ),
    "TIFF": (
        ("Not enough data at scanline", "truncated TIFF: a strip ends before its rows do"),
        ("Read error on strip", "truncated or corrupt TIFF: a strip cannot be read in full"),
        ("Read error at scanline", "truncated or corrupt TIFF: a strip cannot be read in full"),
        ("TIFF_Error", "corrupt TIFF data"),
    ),
}
# Lines that are the decoders' own: libjpeg, libpng and libtiff directly, or through OpenCV's
# logger. Any other line written during a decode (another thread's) is passed on to stderr.
_DECODER_LINE_MARKS = (
    "JPEG", "JFIF", "Adobe", "progression", "SOS", "scanlines", "libpng", "TIFF", "] global ", "tempfile.tif",
    "Decode: ", "PredictorSetup: ",
)  # fmt: skip

_ALL_PHRASES = tuple(phrase for phrases in _DAMAGE_PHRASES.values() for phrase, _ in phrases)

_T = TypeVar("_T")
_stderr_lock = threading.Lock()


def damage_reason(image_format: str, messages: str) -> str | None:
    """Our reason for the first damage phrase in the decoders' ``messages``; None when they reported none."""
    phrases = _DAMAGE_PHRASES.get("JPEG" if image_format == "MPO" else image_format, ())
    return next((reason for phrase, reason in phrases if phrase in messages), None)


def _message_sink() -> BinaryIO:
    # In memory where the platform allows: a full disk must not turn every image into a rejection.
    if hasattr(os, "memfd_create"):
        return os.fdopen(os.memfd_create("decoder-messages"), "w+b")
    return tempfile.TemporaryFile()


def _is_decoder_line(line: str) -> bool:
    # OpenCV continues a multi-line error with "> "
    return line.startswith("> ") or any(mark in line for mark in _DECODER_LINE_MARKS + _ALL_PHRASES)


def with_decoder_messages(decode: Callable[[], _T]) -> tuple[_T, str]:
    """Run ``decode`` with the process' stderr (fd 2) captured: libjpeg and libpng write their
    warnings there and nowhere else, and OpenCV offers no hook. Decodes that capture are serialised
    (a lock) so that messages are never attributed to the wrong file; lines from anything else that
    wrote meanwhile are passed on to the real stderr."""
    with _stderr_lock, _message_sink() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            result = decode()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        text = sink.read(1 << 16).decode("utf-8", "replace")
    others = [line for line in text.splitlines(keepends=True) if line.strip() and not _is_decoder_line(line)]
    if others:
        sys.stderr.write("".join(others))
    return result, text


# --- quiet decoding ---------------------------------------------------------------------------


class _QuietDecoders:
    """While any decode runs, warnings are ignored and pydicom's and Pillow's loggers are muted.

    Their warnings and log lines can quote header values (a DICOM patient name, a TIFF
    description), so they must not reach logs. ``warnings.catch_warnings`` swaps process-wide
    state, which concurrent threads would restore under each other: the first decode to start
    enters it and the last to finish leaves it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._catcher: warnings.catch_warnings | None = None
        self._muted: list[logging.Logger] = []

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._catcher = warnings.catch_warnings()
                self._catcher.__enter__()
                warnings.simplefilter("ignore")
                self._muted = _decoder_loggers()
                for logger in self._muted:
                    logger.addFilter(_drop_record)
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._catcher is not None:
                for logger in self._muted:
                    logger.removeFilter(_drop_record)
                self._catcher.__exit__(None, None, None)
                self._catcher = None


def _decoder_loggers() -> list[logging.Logger]:
    """pydicom logs to one logger; Pillow to one per module, and a filter on a parent logger does
    not see its children's records, so each is muted (all plugins imported first, so they exist)."""
    from PIL import Image

    Image.init()
    names = {"pydicom", "PIL"} | {
        name for name in logging.root.manager.loggerDict if name.startswith(("pydicom.", "PIL."))
    }
    return [logging.getLogger(name) for name in sorted(names)]


def _drop_record(record: logging.LogRecord) -> bool:
    return False


quiet_decoders = _QuietDecoders()
