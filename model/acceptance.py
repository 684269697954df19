"""Is a model fit to screen? A site's acceptance criteria, judged on held-out figures.

A screening model is judged on what a site needs from it: how well it ranks (AUC) and how many
healthy patients it sends for review while it finds the sick ones (specificity at the threshold
chosen for the target sensitivity). Both are judged on the lower end of the 95 % patient-level
bootstrap interval by default: a small test split that happens to look good must not pass. The
same judge serves training (on the test split) and site evaluation (on the site's own X-rays).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = ["BASELINE_MARGIN", "Acceptance", "Verdict", "compare_with_baseline", "judge"]

Bound = Literal["lower", "point"]


@dataclass(frozen=True)
class Acceptance:
    """The criteria a model must meet before it may serve.

    ``min_auc``: the AUC of the positive class. ``min_specificity``: the specificity at the model's
    threshold, which was chosen for ``target_sensitivity``; that threshold must also keep its
    promise, within ``sensitivity_tolerance`` (point estimate: a handful of positives cannot bound
    it tightly). ``bound``: 'lower' judges AUC and specificity on the lower 95 % bound, 'point' on
    the estimate itself.
    """

    min_auc: float = 0.75
    min_specificity: float = 0.30
    target_sensitivity: float = 0.95
    sensitivity_tolerance: float = 0.10
    bound: Bound = "lower"

    def __post_init__(self) -> None:
        for name in ("min_auc", "min_specificity", "target_sensitivity", "sensitivity_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if self.bound not in ("lower", "point"):
            raise ValueError(f"bound must be 'lower' or 'point', got {self.bound!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Acceptance:
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)


@dataclass(frozen=True)
class Verdict:
    """Whether the figures meet the criteria, each criterion's measured value, and why not."""

    fit: bool
    criteria: Acceptance
    checks: list[dict] = field(default_factory=list)  # name, measured, required, passed
    reasons: list[str] = field(default_factory=list)

    @property
    def line(self) -> str:
        """One line for a terminal, a log or the head of a card."""
        if self.fit:
            return "fit for screening: " + "; ".join(_describe(check) for check in self.checks)
        return "NOT FIT FOR SCREENING: " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {"fit": self.fit, "line": self.line, "criteria": self.criteria.to_dict(), "checks": self.checks,
                "reasons": self.reasons}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _bounded(overall: dict, name: str, bound: Bound) -> float | None:
    if bound == "point":
        return _number(overall.get(name))
    interval = overall.get(f"{name}_ci") or [None, None]
    return _number(interval[0]) if isinstance(interval, (list, tuple)) and interval else None


def _describe(check: dict) -> str:
    measured = "n/a" if check["measured"] is None else f"{check['measured']:.3f}"
    return f"{check['name']} {measured} (needs >= {check['required']:.3f})"


def judge(overall: dict, criteria: Acceptance | None = None) -> Verdict:
    """Judge ``overall`` (model.validity.audit's ``overall``: auc, auc_ci, sensitivity,
    specificity, specificity_ci at the model's threshold) against ``criteria``. A figure that
    cannot be measured (one class only) fails its criterion: fitness must be shown, not assumed."""
    criteria = criteria or Acceptance()
    which = "lower 95 % bound of " if criteria.bound == "lower" else ""
    checks = [
        {"name": f"{which}AUC", "measured": _bounded(overall, "auc", criteria.bound), "required": criteria.min_auc},
        {"name": f"{which}specificity at the threshold", "measured": _bounded(overall, "specificity", criteria.bound),
         "required": criteria.min_specificity},
        {"name": "sensitivity at the threshold", "measured": _number(overall.get("sensitivity")),
         "required": max(0.0, criteria.target_sensitivity - criteria.sensitivity_tolerance)},
    ]
    reasons = []
    for check in checks:
        check["passed"] = check["measured"] is not None and check["measured"] >= check["required"] - 1e-12
        if not check["passed"]:
            reasons.append(_describe(check))
    return Verdict(not reasons, criteria, checks, reasons)


# How far below its built-in baseline a model may score before it is held back: about a third of the
# width of a typical 95 % interval on a test split of ~130 images, so that only a clear shortfall
# counts, while a model that merely ties its baseline passes.
BASELINE_MARGIN = 0.02


def compare_with_baseline(model: dict, baseline: dict, margin: float = BASELINE_MARGIN) -> dict:
    """The model's figures against its baseline's on the same test images: overall AUC and mean
    within-stratum AUC (``auc``, ``mean_within_auc`` in each dict). ``worse`` when either falls
    below the baseline's by more than ``margin``."""
    rows, reasons = [], []
    for name, label in (("auc", "AUC"), ("mean_within_auc", "mean within-stratum AUC")):
        mine, theirs = _number(model.get(name)), _number(baseline.get(name))
        difference = None if mine is None or theirs is None else mine - theirs
        rows.append({"name": name, "model": mine, "baseline": theirs, "difference": difference})
        if difference is not None and difference < -margin:
            reasons.append(f"{label} {mine:.3f} is {-difference:.3f} below the plain baseline's {theirs:.3f} "
                           f"(margin {margin:.2f})")
    return {"worse": bool(reasons), "margin": margin, "figures": rows, "reasons": reasons}
