"""Drift: does tonight look like the nights before, and like what the model was tested on?

Two views, both from the last runs' summaries (one small GET each, at most ``RECENT_RUNS``, found
by listing the run folders one level deep, never the files inside them; an old summary that cannot
be read is logged and left out, it never fails tonight's report):

- at a glance, the flag rate, rejected share and drift score of the last runs on small charts;
- tested (``judge``): tonight's profile (model/drift_tests.py: probabilities, scope scores, image
  brightness and contrast, the share rejected and why, DICOM Modality, Manufacturer, ViewPosition,
  PhotometricInterpretation and pixel spacing) against a reference. The reference is the site's
  last ``drift_window`` accepted nights of this model version once there are ``MIN_NIGHTS`` of
  them, and until then the model's own test split (kept in its bundle at training). A night is
  accepted when it completed and did not alarm, or when a person accepted its alarm
  (``cxr-screen drift accept RUN_ID``: a new scanner that is here to stay). Each night keeps a
  bounded sample of its profile in its summary for the nights after it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import math
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from imaging.dicom_identity import NOT_FRONTAL_CHEST
from model.bundle import is_safe_name
from model.drift_tests import ALPHA, MAX_CATEGORY_NAME, Profile, compare
from model.scope import SCOPE_PREFIX
from model.stored_json import loads as load_json
from model.stored_json import reason
from screening.results import PredictionRow, ResultsLayout, RunSummary
from store import storage
from store.clock import utc_timestamp

__all__ = [
    "ALARM_SCORE",
    "DRIFT_WINDOW",
    "MIN_NIGHTS",
    "RECENT_RUNS",
    "Drift",
    "RunRates",
    "accept",
    "accepted_runs",
    "alarm_score",
    "judge",
    "night_profile",
    "reason_category",
    "recent_runs",
    "site_reference",
    "why_not_joining",
]

RECENT_RUNS = 30  # runs on the chart, this one included
DRIFT_WINDOW = 14  # accepted nights that make the site's reference (ScreenParameters.drift_window)
ALARM_SCORE = round(-math.log10(ALPHA), 6)  # the score above which a run alarms
MIN_NIGHTS = 3  # accepted nights of a model version before they, not its test split, are the reference
_DICOM_FIELDS = {"DICOM Modality": "modality", "DICOM Manufacturer": "manufacturer",
                 "DICOM ViewPosition": "view_position", "DICOM PhotometricInterpretation": "photometric_interpretation",
                 "DICOM pixel spacing": "pixel_spacing"}
MAX_SUMMARY_BYTES = 4 * 1024 * 1024  # a summary is a few kB; anything larger is not one

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRates:
    """One run's point on the chart: of its ok images the share flagged, of its inputs the share
    rejected (None where it screened none). Summaries written before ``flag_rate`` existed give it
    from their counts."""

    run_id: str
    flag_rate: float | None
    rejected_share: float | None
    drift_score: float | None = None  # None before drift was tested

    @classmethod
    def of(cls, summary: RunSummary) -> RunRates:
        flag_rate = _rate(summary.flag_rate)
        if flag_rate is None and _count(summary.ok) and summary.ok and _count(summary.flagged):
            flag_rate = _rate(summary.flagged / summary.ok)
        rejected = None
        if _count(summary.screened) and summary.screened and _count(summary.rejected):
            rejected = _rate(summary.rejected / summary.screened)  # duplicates are in neither
        score = summary.drift.get("score") if isinstance(summary.drift, dict) else None
        return cls(summary.run_id, flag_rate, rejected, float(score) if isinstance(score, (int, float)) else None)


def _count(value: object) -> bool:
    """A whole number >= 0 (a summary built past its checks may hold anything); 0 divides nothing."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rate(value: object) -> float | None:
    """A share in [0, 1], or None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    return None


@dataclass(frozen=True)
class Drift:
    """The runs on the chart, oldest first, this run last; and the earlier summaries left out
    because they could not be read, each "location: what is wrong" (or the run folders could not be
    listed: ``problem``)."""

    runs: tuple[RunRates, ...]
    damaged: tuple[str, ...] = ()
    problem: str | None = None
    summaries: tuple[RunSummary, ...] = ()  # the earlier runs' summaries, oldest first

    @property
    def skipped(self) -> int:
        return len(self.damaged)

    @property
    def current(self) -> RunRates:
        return self.runs[-1]

    @property
    def earlier(self) -> tuple[RunRates, ...]:
        return self.runs[:-1]

    def current_percent(self, name: str) -> float | None:
        """This run's ``name`` (flag_rate or rejected_share), in %."""
        value = getattr(self.current, name)
        return None if value is None else 100 * value

    def earlier_median(self, name: str) -> float | None:
        """The median of ``name`` (flag_rate or rejected_share) over the earlier runs that have one, in %."""
        values = [getattr(rates, name) for rates in self.earlier if getattr(rates, name) is not None]
        return 100 * statistics.median(values) if values else None

    def chart_png(self) -> str | None:
        """Both rates per run as a small PNG, base64; None until there is an earlier run to compare with."""
        if not self.earlier or all(rates.flag_rate is None and rates.rejected_share is None for rates in self.runs):
            return None
        import matplotlib.pyplot as plt


        offsets = range(1 - len(self.runs), 1)  # 0 is this run, -1 the one before
        figure, axis = plt.subplots(figsize=(6, 2.4))
        for name, label, colour in (("flag_rate", "flagged (% of images screened ok)", "#c44e52"),
                                    ("rejected_share", "rejected (% of inputs)", "#8c8c8c")):
            values = [float("nan") if getattr(rates, name) is None else 100 * getattr(rates, name)
                      for rates in self.runs]
            axis.plot(offsets, values, "o-", markersize=3, color=colour, label=label)
        axis.axvline(0, color="#4c72b0", linestyle=":", linewidth=1)
        return _finished(figure, axis, "%")

    def score_chart_png(self) -> str | None:
        """The drift score per run, with the alarm line, as a small PNG, base64; None until an
        earlier run has a score to compare with."""
        if not self.earlier or all(rates.drift_score is None for rates in self.earlier):
            return None
        import matplotlib.pyplot as plt

        offsets = range(1 - len(self.runs), 1)
        figure, axis = plt.subplots(figsize=(6, 2.2))
        scores = [float("nan") if rates.drift_score is None else rates.drift_score for rates in self.runs]
        axis.plot(offsets, scores, "o-", markersize=3, color="#4c72b0", label="drift score")
        axis.axhline(ALARM_SCORE, color="#c44e52", linestyle="--", linewidth=1, label="alarm")
        return _finished(figure, axis, "-log10 adjusted p")


def _finished(figure, axis, ylabel: str) -> str:
    """A chart of the last runs with its axes labelled, as a PNG, base64."""
    from model.plots import figure_png  # matplotlib (with the Agg backend) only when there is a chart

    axis.set_xlabel("runs before this one (0 = this run)")
    axis.set_ylabel(ylabel)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    return base64.b64encode(figure_png(figure, dpi=100)).decode()


def recent_runs(results_uri: str, current: RunSummary, limit: int = RECENT_RUNS) -> Drift:
    """This run and up to ``limit - 1`` runs before it (by run id, which sorts by start time), from
    their summary.json under ``<results>/runs/``. Runs still going (no summary yet) are passed over;
    a damaged summary, one of another run, or a failed read is logged and skipped."""
    runs_folder = storage.join(results_uri, "runs")  # where ResultsLayout.run puts every run's folder
    try:
        names = [storage.relative_to(folder, runs_folder)
                 for folder in storage.list_folders(runs_folder, missing_ok=True)]
    except (OSError, ValueError) as error:
        logger.warning("The runs under %s could not be listed, so the drift chart shows this run only: %s",
                       runs_folder, error)
        return Drift((RunRates.of(current),), problem="the earlier runs could not be listed")
    earlier = sorted(name for name in names if is_safe_name(name) and name < current.run_id)[-(limit - 1):] \
        if limit > 1 else []
    with ThreadPoolExecutor(max_workers=8) as pool:  # one small GET each: latency, not bandwidth, on S3
        found = list(pool.map(lambda name: _read_summary(results_uri, name), earlier))
    summaries = tuple(summary for summary in found if isinstance(summary, RunSummary))
    return Drift((*map(RunRates.of, summaries), RunRates.of(current)),
                 damaged=tuple(problem for problem in found if isinstance(problem, str)), summaries=summaries)


def _read_summary(results_uri: str, run_id: str) -> RunSummary | str | None:
    """The run's summary; None where it has none (still running, or died before writing it);
    "location: what is wrong" where it could not be read or is not a summary of this run."""
    uri = ResultsLayout(results_uri).run(run_id).outputs["summary.json"]
    try:
        summary = RunSummary.from_dict(load_json(storage.read_bytes(uri, max_bytes=MAX_SUMMARY_BYTES), uri))
        if summary.run_id != run_id:
            raise ValueError(f"it is the summary of run {summary.run_id}")
    except storage.NotFound:
        return None
    except (OSError, ValueError) as error:  # damaged, forged, a failed read
        problem = f"{uri}: left off the drift chart, not a summary of run {run_id} ({reason(error, uri)})"
        logger.warning("%s", problem)
        return problem
    return summary


def reason_category(reason: str) -> str:
    """A rejection reason as a category of the drift test: the scope gate's and the DICOM guard's
    reasons as they are (fixed words), without what names one file (a size, a ViewPosition in
    brackets); any other reason by its first clause."""
    head = reason.split(" (")[0].strip()
    if not head.startswith((SCOPE_PREFIX, NOT_FRONTAL_CHEST)):
        head = head.split(":")[0].strip()
    return head[:MAX_CATEGORY_NAME] or "no reason given"


def night_profile(rows: list[PredictionRow], positive_class: str) -> Profile:
    """What tonight's rows looked like (model/drift_tests.py): only what they hold. Duplicates
    (images screened under another location) are not tonight's."""
    rows = [row for row in rows if row.status != "duplicate"]
    ok = [row for row in rows if row.status == "ok"]
    values = {
        "probability": [row.probabilities[positive_class] for row in ok
                        if row.probabilities.get(positive_class) is not None],
        "scope score": [row.scope_score for row in rows if row.scope_score is not None],
        "image brightness": [row.image_brightness for row in rows if row.image_brightness is not None],
        "image contrast": [row.image_contrast for row in rows if row.image_contrast is not None],
    }
    categories = {
        "rejected share": {"ok": len(ok), "rejected": len(rows) - len(ok)} if rows else {},
        "rejection reasons": Counter(reason_category(row.reason) for row in rows if row.status == "rejected"),
        **{name: Counter(getattr(row, field) for row in rows if getattr(row, field))
           for name, field in _DICOM_FIELDS.items()},
    }
    return Profile({name: found for name, found in values.items() if found},
                   {name: dict(counts) for name, counts in categories.items() if counts})


def _acceptances(results_uri: str) -> str:
    return storage.join(results_uri, "drift-accepted")


def accepted_runs(results_uri: str) -> set[str]:
    """The runs whose drift alarm a person accepted (``accept``); a listing that fails accepts none."""
    folder = _acceptances(results_uri)
    try:
        names = [storage.relative_to(uri, folder) for uri in storage.list_files(folder, missing_ok=True)]
    except (OSError, ValueError) as error:
        logger.warning("The accepted drift alarms under %s could not be listed (%s): none are counted", folder, error)
        return set()
    return {name.removesuffix(".json") for name in names if name.endswith(".json") and is_safe_name(name[:-5])}


def accept(results_uri: str, run_id: str, by: str, note: str = "") -> tuple[str, str | None]:
    """Records that a person accepted run ``run_id``'s drift (its night joins the reference of the
    nights after it, among the last RECENT_RUNS - 1 runs of its model version); returns where, and
    why the night still cannot join (``why_not_joining``), if it cannot. ValueError when the run
    has no published summary."""
    summary = _read_summary(results_uri, run_id)
    if not isinstance(summary, RunSummary):
        raise ValueError(f"run {run_id} has no readable summary under {results_uri}"
                         + (f" ({summary})" if isinstance(summary, str) else ""))
    uri = storage.join(_acceptances(results_uri), f"{run_id}.json")  # run_id checked safe by _read_summary
    import json

    storage.write_bytes(uri, json.dumps({"run_id": run_id, "accepted_at": utc_timestamp(), "by": by,
                                         "note": note}, indent=2).encode())
    return uri, why_not_joining(summary)


def why_not_joining(summary: RunSummary) -> str | None:
    """Why an accepted run's night still cannot join the reference, or None."""
    if summary.status != "completed":
        return f"it is a {summary.status} run: only completed runs join the reference"
    if not summary.screened or not isinstance(summary.drift_profile, dict):
        return "it kept no drift profile (nothing screened, or written before drift was tested)"
    return None


def _is_accepted(summary: RunSummary, model_version: str, accepted: set[str]) -> bool:
    """A night that may join the reference: of this model version, completed, with a profile, and
    either accepted by a person or tested without an alarm (a night nothing was tested on, too small
    or against nothing, is not vouched for; except where the version has no reference at all)."""
    if summary.model_version != model_version or summary.status != "completed" or not summary.screened:
        return False
    if not isinstance(summary.drift_profile, dict) or not isinstance(summary.drift, dict):
        return False
    if summary.run_id in accepted:
        return True
    reference = summary.drift.get("reference")
    untested = not summary.drift.get("tests") and not (isinstance(reference, dict) and reference.get("kind") == "none")
    return summary.drift.get("alarm") is False and not untested


def reference_words(result: dict | None) -> str:
    """What the run ``result`` (a summary's ``drift``) was compared with, in words."""
    reference = (result or {}).get("reference") or {}
    kind = reference.get("kind") if isinstance(reference, dict) else None
    if kind == "site nights":
        return f"the site's last {len(reference.get('runs', []))} accepted nights"
    return "the model's test split" if kind == "test split" else "no reference"


def alarm_score(result: dict | None) -> float:
    """The score above which the run ``result`` (a summary's ``drift``) alarms."""
    reference = (result or {}).get("reference") or {}
    score = reference.get("alarm_score") if isinstance(reference, dict) else None
    return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else ALARM_SCORE


def site_reference(nights: list[Profile], setting_bar: list[bool] | None = None) -> tuple[Profile, float]:
    """The site's accepted nights as one reference, and the alpha a night is judged at against it.

    Nights differ by more than sampling: a clinic's day, the patients who return, the wards that
    happened to send. So the bar is set by the site's own nights as well as by the rule: each night
    is scored against the others (leave one out), and a night alarms only when its score exceeds
    ALARM_SCORE and every one of those. If tonight is like the accepted nights, the chance its score
    is the highest of them all is at most 1 / (nights + 1), whatever the tests assume; and at most
    ALPHA where their assumptions hold. Only the nights ``setting_bar`` marks (default: all) set
    the bar, each scored against the other marked ones: a night that alarmed and that a person
    accepted (a new scanner) is in the reference, but beside the others it would lift the bar over
    every later change."""
    marks = setting_bar if setting_bar is not None else [True] * len(nights)
    setting = [night for night, marked in zip(nights, marks) if marked]
    own = [compare(night, Profile.merged(setting[:index] + setting[index + 1:])).score
           for index, night in enumerate(setting)] if len(setting) > 1 else []
    return Profile.merged(nights), min(ALPHA, 10 ** -max(own, default=0.0))


def judge(summary: RunSummary, rows: list[PredictionRow], positive_class: str, history: Drift,
          test_split: Profile | None, window: int = DRIFT_WINDOW, accepted: set[str] | None = None) -> RunSummary:
    """``summary`` with its ``drift`` (the tests against the reference, the score, the alarm) and
    ``drift_profile`` (a bounded sample of tonight's profile, for the nights after it)."""
    seed = int.from_bytes(hashlib.sha256(summary.run_id.encode()).digest()[:4], "big")
    # Tested as it is kept: a stored night holds at most SAMPLE_VALUES values of each quantity, and
    # the site's bar is set on those; a larger night tested whole would alarm on differences that
    # the bar, set at that size, allows for.
    kept = night_profile(rows, positive_class).sample(seed=seed)
    accepted = accepted or set()
    nights = [earlier for earlier in reversed(history.summaries)
              if _is_accepted(earlier, summary.model_version, accepted)][:max(window, MIN_NIGHTS)]
    alpha, tonight = ALPHA, kept
    if len(nights) >= MIN_NIGHTS:
        reference, alpha = site_reference([Profile.from_dict(night.drift_profile) for night in nights],
                                          [night.drift.get("alarm") is not True for night in nights])
        described = {"kind": "site nights", "model_version": summary.model_version,
                     "runs": sorted(night.run_id for night in nights), "alarm_score": round(-math.log10(alpha), 4)}
    elif test_split is not None:
        # The test split's refusals are the scope gate's alone: tonight's are counted among the images
        # that reached it, not those the DICOM guard or the loader refused (a site's routine laterals).
        reference, tonight = test_split, night_profile([row for row in rows if row.image_brightness is not None],
                                                       positive_class).sample(seed=seed)
        described = {"kind": "test split", "model_version": summary.model_version,
                     "accepted_nights": len(nights), "nights_needed": MIN_NIGHTS}
    else:
        reference = None
        described = {"kind": "none", "model_version": summary.model_version, "accepted_nights": len(nights),
                     "nights_needed": MIN_NIGHTS,
                     "why": "the model was trained before drift references were kept, and the site has too few "
                            "accepted nights of it"}
    result = compare(tonight, reference, alpha) if reference is not None else compare(Profile(), Profile())
    return dataclasses.replace(summary, drift=result.to_dict(reference=described), drift_profile=kept.to_dict())
