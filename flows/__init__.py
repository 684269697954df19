"""Prefect flows (train, screen, demo) and the command line."""

# First, before any flow module imports TensorFlow: model/ sets TensorFlow's runtime options,
# and some of them are read when TensorFlow is imported.
import model  # noqa: F401

from flows.failure_logs import quiet_expected_failures  # noqa: E402

quiet_expected_failures()  # here, so that deployments' flow runs get it as the command line does
