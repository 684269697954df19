"""The machine a benchmark ran on, printed beside its figures."""

from __future__ import annotations

import os

from screening.engine_speeds import cpu_description

__all__ = ["cpu_line"]


def cpu_line() -> str:
    name, flags = cpu_description()
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if flag in flags]
    return f"CPU: {name}; {os.cpu_count()} cores; {' '.join(shown) or 'no avx2/avx512/amx'}"
