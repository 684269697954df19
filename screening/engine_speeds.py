"""Engine speeds measured on this machine, remembered for a week.

``auto`` serves a model with the fastest of its validated engines here, and finds it by timing each
one (``model.inference.fastest``): a warm-up batch and two timed batches per engine, about 11 s of a
31 s night of 248 X-rays on 2 CPU cores. The speeds depend on the machine and the software, not on a
model's weights, so they are kept in a small file on the machine that measured them, under a key
naming what they depend on (CPU, cores and threads, GPUs, engines, input and batch size, versions,
oneDNN switch), and measured again after ``MAX_AGE`` or when anything in the key changes.

The file is ``CXR_ENGINE_SPEEDS`` (default ``$XDG_CACHE_HOME/cxr-screen/engine-speeds.json``, else
``~/.cache/...``; ``off`` times every run). It only orders engines that passed their gate for the
model being served: a wrong or tampered figure can make ``auto`` take a slower validated engine,
never one that is not validated. A damaged file is ignored (logged) and replaced on the next
measurement.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = ["MAX_AGE", "Measured", "cpu_description", "machine_key", "recall", "remember", "speeds_file"]

MAX_AGE = timedelta(days=7)  # a driver, microcode or a neighbour's load can change what is fastest
MAX_ENTRIES = 64  # machines x engine sets x sizes one file keeps; the oldest go first
FORMAT = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measured:
    speeds: dict[str, float]  # engine -> images per second, all timed side by side
    measured_at: datetime

    def describe(self) -> str:
        return (f"{', '.join(f'{name} {speed:g} img/s' for name, speed in sorted(self.speeds.items()))}; measured on this "
                f"machine {self.measured_at:%Y-%m-%d %H:%M} UTC, again after {MAX_AGE.days} days")


def speeds_file() -> Path | None:
    """Where this machine's speeds are kept; None when ``CXR_ENGINE_SPEEDS`` is ``off``."""
    configured = os.environ.get("CXR_ENGINE_SPEEDS", "").strip()
    if configured.lower() == "off":
        return None
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cxr-screen" / "engine-speeds.json"


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and its feature flags (empty where /proc/cpuinfo is not there)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return name, sorted(set(flags))


def machine_key(engines: list[str], input_size: int, batch_size: int) -> dict:
    """All that the speeds of ``engines`` on this machine depend on, as plain JSON values."""
    import tensorflow as tf

    name, flags = cpu_description()
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    try:
        openvino = importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        openvino = None
    return {
        "cpu": name,
        "cpu_flags": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                    tf.config.threading.get_inter_op_parallelism_threads()],
        # Unset and '1' are both TensorFlow's default (on, on x86): one key for both.
        "onednn": "off" if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false") else "on",
        "gpus": gpus,
        "engines": sorted(engines),
        "input_size": int(input_size),
        "batch_size": int(batch_size),
        "tensorflow": tf.__version__,
        "keras": importlib.metadata.version("keras"),
        "openvino": openvino,
    }


def recall(key: dict, now: datetime | None = None) -> Measured | None:
    """The speeds measured here under ``key`` within ``MAX_AGE``, or None."""
    now = now or datetime.now(UTC)
    for entry in _entries(speeds_file()):
        if entry["key"] == key and timedelta(0) <= now - entry["measured_at"] <= MAX_AGE \
                and set(entry["speeds"]) == set(key["engines"]):
            return Measured(entry["speeds"], entry["measured_at"])
    return None


def remember(key: dict, speeds: dict[str, float], now: datetime | None = None) -> Measured:
    """Keeps ``speeds`` (measured side by side just now) under ``key`` and returns them; never fails
    the run that measured them: a file that cannot be written only means timing again next time."""
    now = now or datetime.now(UTC)
    path = speeds_file()
    if path is None:
        return Measured(speeds, now)
    kept = [entry for entry in _entries(path) if entry["key"] != key and now - entry["measured_at"] <= MAX_AGE]
    kept.append({"key": key, "speeds": speeds, "measured_at": now})
    kept = sorted(kept, key=lambda entry: entry["measured_at"])[-MAX_ENTRIES:]
    document = {"format": FORMAT, "entries": [{**entry, "measured_at": entry["measured_at"].isoformat()}
                                              for entry in kept]}
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: processes on one machine (Dask workers) may measure at the same time.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            temporary = Path(handle.name)
            json.dump(document, handle, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        log.warning("Engine speeds not kept in %s (%s): auto will time the engines again next run", path, error)
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    return Measured(speeds, now)


def _entries(path: Path | None) -> list[dict]:
    """The valid entries of ``path``; none (and a warning) where the file is damaged."""
    if path is None or not path.exists():
        return []
    try:
        document = json.loads(path.read_bytes()[: 1 << 20])
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("not an engine speeds file of this version")
        entries = []
        for entry in document["entries"]:
            speeds = entry["speeds"]
            if not (isinstance(entry["key"], dict) and isinstance(speeds, dict) and speeds and all(
                    isinstance(value, int | float) and math.isfinite(value) and value > 0 for value in speeds.values())):
                raise ValueError("an entry without a key or positive speeds")
            measured_at = datetime.fromisoformat(entry["measured_at"])
            if measured_at.tzinfo is None:
                raise ValueError("a time without its zone")
            entries.append({"key": entry["key"], "speeds": {str(name): float(value) for name, value in speeds.items()},
                            "measured_at": measured_at})
        return entries
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("Engine speeds file %s is damaged (%s): ignored, and replaced once the engines are timed again",
                    path, error)
        return []
