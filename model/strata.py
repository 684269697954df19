"""Which metadata strata training balances: the variables that predict the label on their own.

A stratum variable is a manifest column such as ``age_group`` or ``source_dataset``
(model/validity.py). When one of them says the label by itself (every child has pneumonia, every
COVID-19 image comes from one source), a model can learn the variable instead of the disease;
weighting classes equally inside its levels (``model.validity.stratum_sample_weights``) takes that
signal away from training.
"""

from __future__ import annotations

import numpy as np

from model.validity import metadata_baseline_auc

__all__ = ["capped", "confounders", "joint_levels"]


def capped(chosen: list[str], limit: int, named: bool = False) -> tuple[list[str], list[str]]:
    """The stratum variables kept and those dropped, at most ``limit`` kept: every one evaluated
    within is bootstrapped on the test split, so a manifest of thousands of two-level columns would
    cost hours. The first ``limit`` in the order given (training's: the columns sorted by name) are
    kept, predictably: a person reading the card can tell which, and name others. Variables a person
    ``named`` are never dropped in silence: more than ``limit`` of them is refused (ValueError)."""
    if limit < 1:
        raise ValueError(f"at most {limit} strata: at least one must be allowed")
    if len(chosen) <= limit:
        return list(chosen), []
    if named:
        raise ValueError(f"{len(chosen)} strata named, more than the {limit} allowed (max_strata): each is "
                         "bootstrapped on the test split; name fewer, or raise max_strata")
    return list(chosen[:limit]), list(chosen[limit:])


def joint_levels(columns: dict[str, list[str]], variables: str) -> list[str]:
    """Levels of one column, or of several joined by '+' (each image's levels, joined by ' | ').
    Raises ValueError naming a column that is not there."""
    names = [name.strip() for name in variables.split("+")]
    for name in names:
        if name not in columns:
            raise ValueError(f"no manifest column {name!r} to balance by "
                             f"(columns: {', '.join(columns) or 'none: the dataset has no manifest'})")
    return [" | ".join(values) for values in zip(*(columns[name] for name in names))]


def _has_mixed_level(is_positive: np.ndarray, levels: list[str]) -> bool:
    levels = np.array(levels)
    return any(0 < is_positive[levels == level].sum() < (levels == level).sum() for level in set(levels))


def confounders(is_positive: np.ndarray, strata: dict[str, list[str]], limit: float = 0.6) -> str | None:
    """What 'auto' balances: every stratum variable that predicts the label on its own (metadata-only
    AUC on these training images of at least ``limit``), jointly ('age_group+source_dataset'), so
    that no combination of them says anything about the label. Falls back to the single strongest
    when no joint level holds both classes; None when no variable qualifies."""
    found = []
    for name, levels in strata.items():
        auc = metadata_baseline_auc(levels, is_positive, levels, is_positive)
        if auc is not None and auc >= limit and _has_mixed_level(is_positive, levels):
            found.append((auc, name))
    names = [name for _, name in sorted(found, reverse=True)]
    if len(names) > 1 and _has_mixed_level(is_positive, joint_levels(strata, "+".join(names))):
        return "+".join(names)
    return names[0] if names else None
