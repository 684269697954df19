"""Prefect tasks and the I/O they need: storage, decoding, datasets, inference, ledger, reports."""

# First, before any task module imports TensorFlow: model/ sets TensorFlow's runtime options,
# and some of them are read when TensorFlow is imported.
import model  # noqa: F401
