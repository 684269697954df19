"""Prefect flows (train, screen, demo) and the command line."""

# First, before any flow module imports TensorFlow: model/ sets TensorFlow's runtime options,
# and some of them are read when TensorFlow is imported.
import model  # noqa: F401
