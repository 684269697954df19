"""Which failures are worth a retry: transient ones only.

A missing folder, an unknown scheme, a model this code cannot load or a dataset it cannot use will
fail the same way every time; retrying them only delays the one clear line the user needs (and
holds the night's concurrency slot). Connection resets, throttling and S3 5xx may pass.
"""

from __future__ import annotations

from model.bundle import BundleError
from model.network import WeightsUnavailable
from tasks.storage import AccessDenied, NoSpace, NotAFolder, NotFound, Unreadable

__all__ = ["DETERMINISTIC", "transient_only"]

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
