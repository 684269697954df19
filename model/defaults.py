"""The training and inference defaults, each written once: ``flows.parameters`` offers them to
users (the command line and the deployments take them from there) and ``model`` falls back to them
where no parameter reaches it. Plain values, importing nothing, so that the parameters models (and
the command line's start) do not import TensorFlow."""

from __future__ import annotations

__all__ = ["BATCH_SIZE", "EPOCHS", "HEAD", "MAX_STRATA"]

# Images per forward pass (screening, evaluation, feature extraction) and per training step.
BATCH_SIZE = 16
# Most stage 1 epochs; early stopping usually ends training sooner.
EPOCHS = 60
# The classifier's head, one of model.network.HEADS.
HEAD = "linear"
# Most metadata columns training evaluates within by default: each is bootstrapped on the test split
# (5,000 two-level columns took about an hour); the rest are dropped, by name (model/strata.py).
MAX_STRATA = 20
