"""Which failures are worth a retry (transient ones only), and how long a step may hang.

A missing folder, an unknown scheme, a model this code cannot load or a dataset it cannot use will
fail the same way every time; retrying them only delays the one clear line the user needs (and
holds the night's concurrency slot). Connection resets, throttling and S3 5xx may pass.
"""

from __future__ import annotations

from model.bundle import BundleError
from model.network import WeightsUnavailable
from store.storage import AccessDenied, NoSpace, NotAFolder, NotFound, Unreadable

__all__ = ["DETERMINISTIC", "STEP_TIMEOUT_SECONDS", "io_step", "transient_only"]

# ValueError covers BundleError, DatasetError, unsupported schemes and bad parameters.
DETERMINISTIC = (ValueError, TypeError, KeyError, NotFound, AccessDenied, NotAFolder, Unreadable, NoSpace, BundleError,
                 WeightsUnavailable)


def transient_only(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry unless the failure is deterministic."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - only inspected, never swallowed: Prefect re-raises
            error = raised
    return not isinstance(error, DETERMINISTIC)


# A step that reads or writes storage and has not ended after this long is stopped by Prefect and
# retried: a hung read must not hold the night's only concurrency slot until morning. Each S3
# request has its own, shorter limits (store/storage.py); this one bounds a whole step, and is far
# above what a million inputs need (listing them is about 1,000 requests).
STEP_TIMEOUT_SECONDS = 30 * 60


def io_step(retries: int = 2, retry_delay_seconds: float = 10, timeout_seconds: float = STEP_TIMEOUT_SECONDS) -> dict:
    """Options of a Prefect task that reads or writes storage: retried on transient failures
    only, and stopped when it hangs."""
    return dict(retries=retries, retry_delay_seconds=retry_delay_seconds, retry_condition_fn=transient_only,
                timeout_seconds=timeout_seconds)

