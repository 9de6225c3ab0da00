"""What a broadcast counts as it works: plain numbers, read by the metrics collector.

The hot paths (a delivered event, a committed batch) add to integers here instead of
calling into a metrics library: an attribute increment costs tens of nanoseconds,
where a locked Prometheus counter costs a microsecond. The collector turns these
numbers into Prometheus metrics only when it is scraped (see ``_metrics``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from ._errors import InvalidArgument, LogUnavailable, MessageTooLarge, NotConnected


class Histogram:
    """Counts of observations per bucket (upper bounds), their sum and number."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.count += other.count
        self.sum += other.sum


#: Reasons a publish failed (``publish_failures_total{reason}``).
FAILURE_REASONS = ("invalid", "too_large", "log_unavailable", "not_connected", "other")
#: Why a subscriber went back to reading the log (``subscriber_fallbacks_total{reason}``).
FALLBACK_REASONS = ("overflow", "gap", "idle", "notice")
BATCH_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
COMMIT_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Stats:
    """The counters of one broadcast (summed over broadcasts by the collector)."""

    __slots__ = (
        "batch_size",
        "commit_seconds",
        "delivered_live",
        "delivered_log",
        "failures",
        "fallbacks",
        "live_send_failures",
        "publishes",
        "replaced_reconnects",
    )

    def __init__(self) -> None:
        self.publishes = 0
        self.failures = dict.fromkeys(FAILURE_REASONS, 0)
        self.batch_size = Histogram(BATCH_BOUNDS)
        self.commit_seconds = Histogram(COMMIT_BOUNDS)
        self.live_send_failures = 0
        self.fallbacks = dict.fromkeys(FALLBACK_REASONS, 0)
        self.delivered_live = 0
        self.delivered_log = 0
        # Reconnects counted by transports the broadcast has since made anew.
        self.replaced_reconnects = 0

    def add(self, other: Stats) -> None:
        """Add ``other``'s counts to these (a broadcast that is gone, for its totals)."""
        self.publishes += other.publishes
        for reason, count in other.failures.items():
            self.failures[reason] += count
        self.batch_size.add(other.batch_size)
        self.commit_seconds.add(other.commit_seconds)
        self.live_send_failures += other.live_send_failures
        for reason, count in other.fallbacks.items():
            self.fallbacks[reason] += count
        self.delivered_live += other.delivered_live
        self.delivered_log += other.delivered_log
        self.replaced_reconnects += other.replaced_reconnects


def failure_reason(error: BaseException) -> str:
    """The ``reason`` label of a failed publish."""
    if isinstance(error, MessageTooLarge):
        return "too_large"
    if isinstance(error, InvalidArgument):
        return "invalid"
    if isinstance(error, LogUnavailable):
        return "log_unavailable"
    if isinstance(error, NotConnected):
        return "not_connected"
    return "other"
