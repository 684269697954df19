"""Accelerators: what TensorFlow may take of them."""

from __future__ import annotations

__all__ = ["share_gpus"]


def share_gpus() -> None:
    """Let TensorFlow take GPU memory as it needs it rather than all of it at start, so that several
    processes can share one GPU: screening with ``--workers N`` runs N processes, each with its own
    decoders, since one process' decoding tops out below what a GPU predicts (bench/gpu_bench.py)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can only be set before first use
            pass
