"""The time every record here is stamped with: now, in UTC."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["utc_now", "utc_timestamp"]


def utc_now() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def utc_timestamp() -> str:
    """Now, in UTC, as ISO 8601 to the second (``2026-11-27T01:02:03+00:00``): the form records store."""
    return utc_now().isoformat(timespec="seconds")
