"""Promotion: whether training makes its new version production, decided in one task and written in another.

The rule is ``promotion_decision`` (fitness, the baseline guard, experiments, approval, then the
comparison with production on the same test split); ``decide_promotion`` gathers what it weighs. ``promote`` only writes the decision, against
the ``production.json`` read before the comparison, so that a version never replaces one it was
not compared with. A ``production.json`` that cannot be trusted (damaged; with a signing key,
unsigned or not matching its signature) is neither compared with nor replaced by training: the new
version stays a candidate, and the reason says how to promote it. Promotion in an unsigned store
says so in its log (``registry.unsigned_warning``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.preprocessing import Preprocessing
from store import registry
from tasks.clinical import Audit
from tasks.retrying import io_step
from tasks.train_data import LabelledArrays, TrainingSplit
from tasks.train_scoring import Evaluation, score_production

__all__ = ["Promotion", "decide_promotion", "promote", "promotion_decision"]


@dataclass(frozen=True)
class Promotion:
    """The decision and its reason; ``seen``: production.json as read before comparing."""

    promoted: bool
    reason: str
    compared_with: str | None = None
    require_approval: bool = False
    seen: registry.Production | None = None

    def card_record(self) -> dict:
        return {"promoted": self.promoted, "reason": self.reason, "compared_with": self.compared_with,
                "require_approval": self.require_approval}


# Its own task, retried on a transient failure: a passing storage error must not cost a trained model.
read_production = task(name="read_production", cache_policy=NO_CACHE, **io_step())(registry.read_production)


@task(cache_policy=NO_CACHE)
def decide_promotion(store_uri: str, loaded: LabelledArrays, split: TrainingSplit, spec: Preprocessing,
                     evaluation: Evaluation, audit: Audit, *, force: bool = False, require_approval: bool = False,
                     leave_out: str | None = None) -> Promotion:
    """Production is read first (the promotion is written only if it is still production), then
    scored on this test split, then the rule decides."""
    seen = read_production(store_uri)
    if seen.problem:  # never followed, never silently replaced by a training run
        get_run_logger().warning("%s", seen.problem)
        return Promotion(False, f"production.json cannot be used, so the new model was not compared with it: "
                                f"{seen.problem}; a candidate only: promote it with cxr-screen models promote "
                                "VERSION --reason ...", None, require_approval, seen)
    production = score_production(store_uri, loaded, split, spec)
    validity = audit.validity
    promoted, reason = promotion_decision(
        {**evaluation.metrics["positive"], "within_auc": validity["mean_within_auc"],
         "warnings": validity["model_warnings"]},
        production, force, fitness=validity.get("fitness"), against_baseline=validity.get("against_baseline"),
        experiment=f"trained with {leave_out} left out" if leave_out else None, require_approval=require_approval)
    return Promotion(promoted, reason, production and production["version"], require_approval, seen)


@task(cache_policy=NO_CACHE, **io_step(retries=3, retry_delay_seconds=5))
def promote(store_uri: str, version: str, promotion: Promotion, by: str | None = None) -> Promotion:
    """Make the new version production, unless production changed since ``promotion.seen`` was read
    (another training or an operator won): then it stays a candidate, and the reason says why."""
    unsigned = registry.unsigned_warning(store_uri)
    if unsigned:
        get_run_logger().warning("Promoting %s: %s", version, unsigned)
    try:
        registry.set_production(store_uri, version, promotion.reason, by=by, expected=promotion.seen)
    except registry.PromotionConflict as error:
        get_run_logger().warning("Model %s left as a candidate: %s", version, error)
        return replace(promotion, promoted=False, reason=f"left as a candidate: {error}")
    return promotion


def promotion_decision(new: dict, current: dict | None, force: bool = False, *, fitness: dict | None = None,
                       against_baseline: dict | None = None, experiment: str | None = None,
                       require_approval: bool = False) -> tuple[bool, str]:
    """Whether training promotes the new model, and why: the one place that decides.

    In order: a model not fit for screening (``fitness``, model.acceptance's verdict) is never
    promoted by training, forced or not: only a person can (``models promote --reason``). An
    experiment (trained with a level left out) and a model worse than its plain baseline
    (``against_baseline``) are promoted only when forced. With ``require_approval`` nothing is
    promoted by training, and the reason says what training thought. Otherwise the new model is
    compared with production on the same test split.

    ``new`` and ``current`` are ``evaluate(...)['positive']`` dicts, optionally with
    ``within_auc`` (mean within-stratum AUC over the metadata variables) and ``warnings`` (the
    model's own shortcut warnings on this split: within-stratum AUC far below the overall AUC);
    ``current`` is None when there is no production model or it could not be scored on this split.
    A model with such a warning never replaces one without.
    Within-stratum AUC, which shortcut learning cannot inflate, is compared first when both have it.
    """
    if fitness is not None and not fitness.get("fit", False):
        return False, (f"{fitness.get('line', 'not fit for screening')}; a candidate only: a person may promote it "
                       "with cxr-screen models promote VERSION --reason ...")
    promoted, reason = _compared(new, current, force)
    if not force and against_baseline and against_baseline.get("worse"):
        promoted, reason = False, ("worse than its plain baseline: " + "; ".join(against_baseline["reasons"]) +
                                   " (--force-promote overrides)")
    if experiment and promoted and not force:
        promoted, reason = False, f"{experiment}: an experiment, not a candidate"
    if require_approval:
        verdict = "recommends it" if promoted else "does not recommend it"
        promoted, reason = False, (f"candidate awaiting approval (require_approval is set; training {verdict}: "
                                   f"{reason}); promote it with: cxr-screen models promote VERSION --reason ...")
    return promoted, reason


def _compared(new: dict, current: dict | None, force: bool) -> tuple[bool, str]:
    if force:
        return True, "promotion forced"
    if current is None:
        return True, "no comparable production model"
    if new.get("warnings") and not current.get("warnings"):
        return False, ("it carries a shortcut warning and production does not (see its card); "
                       "--force-promote overrides")
    key = ["auc", "sensitivity_at_threshold"]
    if new.get("within_auc") is not None and current.get("within_auc") is not None:
        key.insert(0, "within_auc")
    names = {"within_auc": "within-stratum AUC", "auc": "AUC", "sensitivity_at_threshold": "sensitivity at threshold"}
    new_scores = tuple((new.get(k) or 0.0) for k in key)
    old_scores = tuple((current.get(k) or 0.0) for k in key)
    summary = ", ".join(f"{names[k]} {a:.4f} vs {b:.4f}" for k, a, b in zip(key, new_scores, old_scores))
    summary += " (new vs production, same test split)"
    if new_scores > old_scores:
        return True, f"beats production: {summary}"
    return False, f"does not beat production: {summary}"
