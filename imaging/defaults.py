"""The decoding defaults, each written once: ``flows.parameters`` offers them to users and the layers
below fall back to them. Plain values, importing nothing, so that the parameters models (and the
command line's start) do not import OpenCV."""

from __future__ import annotations

__all__ = ["DECODE_TIMEOUT_SECONDS"]

# How long one input's decode may take in the sandbox before it is stopped (a rejected row when screening).
DECODE_TIMEOUT_SECONDS = 60.0
