"""Training curves, confusion matrix, ROC and reliability diagram as PNG bytes (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from model.calibration import expected_calibration_error, reliability_curve  # noqa: E402

__all__ = ["audit_png", "confusion_png", "curves_png", "figure_png", "mean_cam_png", "reliability_png", "roc_png",
           "samples_png"]


def figure_png(figure, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes, trimmed to its contents; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def curves_png(history: dict[str, dict[str, list]]) -> bytes:
    """Loss and accuracy per epoch, training vs validation, both stages in sequence; where stage 1
    was chosen by cross-validation (no epochs), its out-of-fold score against C for each candidate
    weighting and feature set instead."""
    searched = [values["cross_validation"] for values in history.values() if "cross_validation" in values]
    epochs_run = [stage for stage, values in history.items() if values.get("loss")]
    panels = (2 if epochs_run else 0) + (1 if searched else 0)
    figure, axes = plt.subplots(1, max(panels, 1), figsize=(5.5 * max(panels, 1), 4), squeeze=False)
    axes = list(axes[0])
    if searched:
        axis = axes.pop(0)
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for row in searched[0]:
            lines.setdefault((row["weighting"], row["features"]), []).append((row["c"], row["cv_score"]))
        for (weighting, features), points in sorted(lines.items()):
            points.sort()
            axis.plot([c for c, _ in points], [score for _, score in points], marker="o",
                      label=f"{weighting}, {features}")
        axis.set_xscale("log")
        axis.set_title("Stage 1: cross-validated choice of the head")
        axis.set_xlabel("C (inverse L2 strength)")
        axis.set_ylabel("out-of-fold score")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    if epochs_run:
        loss_axis, accuracy_axis = axes
        offset = 0
        for stage in epochs_run:
            values = history[stage]
            epochs = np.arange(1, len(values["loss"]) + 1) + offset
            for key, axis in (("loss", loss_axis), ("accuracy", accuracy_axis)):
                if key in values:
                    axis.plot(epochs, values[key], label=f"train ({stage})")
                if f"val_{key}" in values:
                    axis.plot(epochs, values[f"val_{key}"], linestyle="--", label=f"validation ({stage})")
            if offset:
                for axis in (loss_axis, accuracy_axis):
                    axis.axvline(offset + 0.5, color="grey", linewidth=0.8)
            offset += len(epochs)
        for axis, title in ((loss_axis, "Loss"), (accuracy_axis, "Accuracy")):
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.legend(fontsize=8)
            axis.grid(alpha=0.3)
    elif not searched:
        axes[0].set_title("No training history")
    return figure_png(figure)


def confusion_png(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    matrix = np.asarray(matrix)
    figure, axis = plt.subplots(figsize=(1.3 * len(classes) + 2.5, 1.1 * len(classes) + 2))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for (row, column), value in np.ndenumerate(matrix):
        colour = "white" if value > matrix.max() / 2 else "black"
        axis.text(column, row, str(value), ha="center", va="center", color=colour)
    axis.set_title("Confusion matrix (test split)")
    return figure_png(figure)


def roc_png(fpr: Sequence[float], tpr: Sequence[float], auc: float | None, positive: str,
            operating_point: tuple[float, float] | None = None) -> bytes:
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    if len(fpr):
        axis.plot(fpr, tpr, label=f"AUC {auc:.3f}" if auc is not None else "ROC")
    if operating_point is not None:
        sensitivity, specificity = operating_point
        axis.plot([1 - specificity], [sensitivity], "o", label="threshold")
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    axis.set_title(f"ROC: {positive} vs rest (test split)")
    axis.legend(loc="lower right")
    return figure_png(figure)


def reliability_png(is_positive: Sequence[bool], before: Sequence[float], after: Sequence[float] | None = None,
                    bins: int = 10, names: tuple[str, str] = ("before", "after")) -> bytes:
    """Reliability diagram of the positive-class probability: observed positive rate against mean
    probability per bin, before and (optionally) after calibration, with the diagonal of perfect
    calibration and each curve's expected calibration error. ``names``: the two curves' labels."""
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, probability, style in ((names[0], before, "o-"), (names[1], after, "s-")):
        if probability is None:
            continue
        predicted, observed, counts = reliability_curve(is_positive, probability, bins)
        filled = counts > 0
        ece = expected_calibration_error(is_positive, probability, bins)
        axis.plot(predicted[filled], observed[filled], style, label=f"{name} (ECE {ece:.3f})")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("mean predicted probability (positive class)")
    axis.set_ylabel("observed positive rate")
    axis.set_title("Reliability")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    return figure_png(figure)


def mean_cam_png(cams: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> bytes:
    """Per class: the mean image and the mean Grad-CAM over it (where the model looks on average)."""
    names = [name for name in cams if len(cams[name])]
    figure, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 3.4), squeeze=False)
    for axis, name in zip(axes[0], names):
        axis.imshow(images[name].mean(axis=0).mean(axis=-1), cmap="gray")
        axis.imshow(cams[name].mean(axis=0), cmap="jet", alpha=0.4, vmin=0, vmax=1)
        axis.set_title(f"{name} (n={len(cams[name])})", fontsize=9)
        axis.axis("off")
    if not names:
        axes[0][0].axis("off")
    figure.suptitle("Mean Grad-CAM on the test split", fontsize=10)
    return figure_png(figure)


def audit_png(folds: Sequence[dict], variable: str) -> bytes:
    """Leave-one-level-out audit: per left-out level, its AUC (or, with one class, the share flagged)
    beside the AUC on the usual test split of the other levels."""
    figure, axis = plt.subplots(figsize=(max(5.0, 1.4 * len(folds) + 2), 3.8))
    positions = np.arange(len(folds))
    left_out = [fold["auc"] if fold.get("auc") is not None else np.nan for fold in folds]
    flagged = [fold["flagged_share"] if fold.get("auc") is None and fold.get("flagged_share") is not None else np.nan
               for fold in folds]
    test = [fold["test_auc"] if fold.get("test_auc") is not None else np.nan for fold in folds]
    axis.bar(positions - 0.27, left_out, 0.27, label="AUC on the left-out level", color="#4c72b0")
    axis.bar(positions, flagged, 0.27, label="share flagged (left-out level has one class)", color="#dd8452")
    axis.bar(positions + 0.27, test, 0.27, label="AUC on the test split of the rest", color="#8c8c8c")
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_xticks(positions, [f"{fold['level']}\n(n={fold['images']})" for fold in folds], fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_title(f"Leave one {variable} out")
    axis.legend(fontsize=7, loc="lower right")
    return figure_png(figure)


def samples_png(synthetic: dict[str, np.ndarray], real: dict[str, np.ndarray], columns: int = 8) -> bytes:
    """The generator's sheet (``samples.png``, #14): per class a row of real images and beneath it a
    row of synthetic ones, up to ``columns`` each, grayscale uint8 ``(n, s, s)``, on one gray scale
    (0-255) so brightness compares. ``synthetic`` and ``real`` are keyed by class name, same keys."""
    if set(synthetic) != set(real):
        raise ValueError(f"synthetic and real images must name the same classes, got {sorted(synthetic)} "
                         f"and {sorted(real)}")
    if columns < 1:
        raise ValueError(f"columns must be positive, got {columns}")
    names = sorted(synthetic)
    rows = [row for name in names for row in ((f"{name}\nreal", real[name]), (f"{name}\nsynthetic", synthetic[name]))]
    figure, axes = plt.subplots(max(len(rows), 1), columns, figsize=(1.2 * columns + 0.8, 1.25 * max(len(rows), 1)),
                                squeeze=False)
    for axis_row, (title, images) in zip(axes, rows):
        for column, axis in enumerate(axis_row):
            if column < len(images):
                axis.imshow(images[column], cmap="gray", vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
        axis_row[0].set_ylabel(title, fontsize=8)
    if not rows:
        axes[0][0].axis("off")
    figure.suptitle("Real (upper row) and synthetic (lower row) images per class", fontsize=10)
    return figure_png(figure)
