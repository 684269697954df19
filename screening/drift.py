"""Drift at a glance: the flag rate and rejected share of the last runs, read from their summaries.

A model whose flag rate creeps up night after night, or a feed whose rejected share jumps, is seen
on one small chart in every report. Only the summaries are read (one small GET each, at most
``RECENT_RUNS``), found by listing the run folders one level deep, never the files inside them.
An old summary that cannot be read is logged and left out: it never fails tonight's report.
"""

from __future__ import annotations

import base64
import logging
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from model.bundle import is_safe_name
from model.stored_json import loads as load_json
from model.stored_json import reason
from screening.results import ResultsLayout, RunSummary
from store import storage

__all__ = ["RECENT_RUNS", "Drift", "RunRates", "recent_runs"]

RECENT_RUNS = 30  # runs on the chart, this one included
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

    @classmethod
    def of(cls, summary: RunSummary) -> RunRates:
        flag_rate = _rate(summary.flag_rate)
        if flag_rate is None and _count(summary.ok) and summary.ok and _count(summary.flagged):
            flag_rate = _rate(summary.flagged / summary.ok)
        rejected = None
        if _count(summary.screened) and summary.screened and _count(summary.rejected):
            rejected = _rate(summary.rejected / summary.screened)
        return cls(summary.run_id, flag_rate, rejected)


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

        from model.plots import figure_png  # matplotlib (with the Agg backend) only when there is a chart

        offsets = range(1 - len(self.runs), 1)  # 0 is this run, -1 the one before
        figure, axis = plt.subplots(figsize=(6, 2.4))
        for name, label, colour in (("flag_rate", "flagged (% of images screened ok)", "#c44e52"),
                                    ("rejected_share", "rejected (% of inputs)", "#8c8c8c")):
            values = [float("nan") if getattr(rates, name) is None else 100 * getattr(rates, name)
                      for rates in self.runs]
            axis.plot(offsets, values, "o-", markersize=3, color=colour, label=label)
        axis.axvline(0, color="#4c72b0", linestyle=":", linewidth=1)
        axis.set_xlabel("runs before this one (0 = this run)")
        axis.set_ylabel("%")
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
    read = [RunRates.of(summary) for summary in found if isinstance(summary, RunSummary)]
    return Drift((*read, RunRates.of(current)), damaged=tuple(problem for problem in found if isinstance(problem, str)))


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
