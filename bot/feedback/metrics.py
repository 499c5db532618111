"""Prometheus gauges of the votes on the current adapter, the numbers ``/status`` shows.

Gauges, not counters: a changed vote moves one count down and another up, and
the store, not the process, is the source of truth, so each update republishes
its summary.
"""

from __future__ import annotations

from prometheus_client import Gauge

from bot.feedback.records import FeedbackSummary

VOTES = Gauge(
    "freeski_feedback_votes",
    "Votes on the current adapter's answers, by kind (up, down, base, finetuned, tie, both_bad)",
    ["kind"],
)
WIN_RATE = Gauge(
    "freeski_feedback_win_rate",
    "Share of base-vs-finetuned votes won by the finetuned answer, a tie half (NaN before the first)",
)
DECIDED = Gauge(
    "freeski_feedback_decided_votes", "Base-vs-finetuned votes that picked a side or a tie"
)


def publish(summary: FeedbackSummary) -> None:
    for kind in ("up", "down", "base", "finetuned", "tie", "both_bad"):
        VOTES.labels(kind=kind).set(getattr(summary, kind))
    WIN_RATE.set(summary.win_rate if summary.win_rate is not None else float("nan"))
    DECIDED.set(summary.decided)
