"""Prometheus metrics of broadcasts (extra ``metrics``: prometheus-client).

One collector per registry reads the plain counters (``_stats``) of every broadcast
registered with it when it is scraped, so metrics cost nothing on the hot paths but
an integer increment. Names start with ``broadcast_history_``; no label carries a
channel name on a hot counter (the number of channels is unbounded): only
``consumer_lag`` has one, a series for each of the LAG_SERIES largest lags.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._cancel import wait_for
from ._spaced import SpacedRead
from ._stats import Histogram, Stats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ._broadcast import Broadcast

logger = logging.getLogger("broadcast_history")
_PREFIX = "broadcast_history_"
_collectors: weakref.WeakKeyDictionary[Any, BroadcastCollector] = weakref.WeakKeyDictionary()


def register(broadcast: Broadcast, registry: CollectorRegistry | None) -> CollectorRegistry:
    """Count ``broadcast`` in the metrics of ``registry`` (default: the global one),
    which is returned.

    Raises:
        ImportError: prometheus-client is not installed (the ``metrics`` extra).
    """
    try:
        from prometheus_client import REGISTRY
    except ImportError as exc:
        raise ImportError(
            f"metrics need prometheus-client: pip install 'broadcast-history[metrics]' ({exc})"
        ) from exc
    target = REGISTRY if registry is None else registry
    collector = _collectors.get(target)
    if collector is None:
        collector = _collectors[target] = BroadcastCollector()
        target.register(collector)
    collector.add(broadcast)
    return target


def collector_of(registry: CollectorRegistry) -> BroadcastCollector | None:
    """The collector of broadcasts registered in ``registry``, if any."""
    return _collectors.get(registry)


class BroadcastCollector:
    """Collects the metrics of every broadcast of one registry (sums over them)."""

    def __init__(self) -> None:
        self._broadcasts: weakref.WeakSet[Broadcast] = weakref.WeakSet()
        # Counts of broadcasts already garbage-collected: counters never go back.
        self._retired = Stats()
        self._retired_foreign = {"not_envelope": 0, "other_log": 0}
        self._retired_reconnects = 0
        #: The largest lags of durable consumers, refreshed by :meth:`refresh_lags`.
        self.lags: dict[tuple[str, str], int] = {}
        #: How many durable consumers have committed, as of the same refresh.
        self.committed = 0
        # The loops the registered broadcasts keep their lags fresh on (see
        # keep_lags_fresh), with how many broadcasts each.
        self.loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = (
            weakref.WeakKeyDictionary()
        )
        self._lag_read = SpacedRead(self._read_lags, worth_keeping=_many_consumers)

    def add(self, broadcast: Broadcast) -> None:
        self._broadcasts.add(broadcast)
        weakref.finalize(
            broadcast,
            self._retire,
            broadcast.stats,
            broadcast.foreign_messages,
            broadcast._transport,
        )

    def _retire(self, stats: Stats, foreign: dict[str, int], transport: list[Any]) -> None:
        self._retired.add(stats)
        for kind, count in foreign.items():
            self._retired_foreign[kind] = self._retired_foreign.get(kind, 0) + count
        self._retired_reconnects += int(getattr(transport[0], "reconnects", 0))

    async def refresh_lags(self) -> None:
        """Read the LAG_SERIES largest lags of durable consumers of the registered
        broadcasts' logs, and how many consumers have committed.

        The read orders every committed consumer (250,000: 0.25-0.4 s of the
        database's time), for each scrape and every LAGS_EVERY seconds: one that took
        read of LAGS_MANY or more answers the scrapes within 20 times as long as it
        took; the lags of fewer are read for each.
        """
        self.lags, self.committed = await self._lag_read()

    async def _read_lags(self) -> tuple[dict[tuple[str, str], int], int]:
        found: list[tuple[str, str, int]] = []
        committed = 0
        seen: set[str] = set()
        limit = LAG_SERIES
        for broadcast in list(self._broadcasts):
            if not broadcast.connected or broadcast.log.log_id in seen:
                continue  # several broadcasts of one process may share a log
            seen.add(broadcast.log.log_id)
            lags = await broadcast.log.consumer_lags(limit)
            committed += lags.committed
            found.extend(lags.largest)
        # Consumers are rows that outlive their workers (a name per session makes
        # one each): the series are the largest lags, which alerts are about. A
        # name in two logs has one series: the larger lag.
        largest: dict[tuple[str, str], int] = {}
        for channel, name, lag in found:
            largest[(channel, name)] = max(lag, largest.get((channel, name), 0))
        ordered = sorted(largest.items(), key=lambda item: (-item[1], item[0]))
        return dict(ordered[:limit]), committed

    def refresh_for_scrape(self) -> None:
        """Read ``consumer_lag`` as of this scrape, when it runs in a thread of its own.

        prometheus-client's own HTTP server (and a WSGI app) scrapes in another thread
        than the broadcasts' event loop: that loop reads the lags while this thread
        waits, at most SCRAPE_WAIT seconds. A scrape on the loop's own thread cannot
        wait for it, nor one with broadcasts on several loops: those get the lags of
        the last refresh (every LAGS_EVERY seconds, or the admin app's at each scrape).
        """
        try:
            loops = [loop for loop, count in list(self.loops.items()) if count > 0]
        except RuntimeError:  # a broadcast connected on its loop's thread meanwhile
            return
        if len(loops) != 1 or not loops[0].is_running():
            return
        loop = loops[0]
        try:
            asyncio.get_running_loop()
            return  # on a loop's thread (this one or another): waiting would block it
        except RuntimeError:
            pass
        future = asyncio.run_coroutine_threadsafe(self.refresh_lags(), loop)
        try:
            future.result(timeout=SCRAPE_WAIT)
        except Exception as exc:  # the log is down or slow: scrape the rest anyway
            future.cancel()
            logger.warning("consumer lag refresh for a scrape failed: %r", exc)

    def describe(self) -> Iterable[Metric]:
        return []  # the names are fixed, but no need to check them up front

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        self.refresh_for_scrape()
        broadcasts = list(self._broadcasts)
        total = Stats()
        total.add(self._retired)
        foreign = dict(self._retired_foreign)
        reconnects = self._retired_reconnects + self._retired.replaced_reconnects
        modes = {"replay": 0, "live": 0}
        up = 1
        for broadcast in broadcasts:
            total.add(broadcast.stats)
            for kind, count in broadcast.foreign_messages.items():
                foreign[kind] = foreign.get(kind, 0) + count
            reconnects += broadcast.stats.replaced_reconnects
            reconnects += int(getattr(broadcast.backend, "reconnects", 0))
            if broadcast.connected and not broadcast.transport_connected:
                up = 0
            for mode, count in broadcast.subscriber_modes().items():
                modes[mode] += count

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(_PREFIX + name, doc, value=value)

        def labelled(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
            family = CounterMetricFamily(_PREFIX + name, doc, labels=[label])
            for key, value in values.items():
                family.add_metric([key], value)
            return family

        def histogram(name: str, doc: str, values: Histogram) -> HistogramMetricFamily:
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip([*values.bounds, float("inf")], values.counts, strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            return HistogramMetricFamily(_PREFIX + name, doc, buckets=buckets, sum_value=values.sum)

        yield counter("publishes", "Events committed by publish", total.publishes)
        yield labelled(
            "publish_failures", "Publishes that raised, by reason", "reason", total.failures
        )
        yield histogram("batch_size", "Publishes per committed batch", total.batch_size)
        yield histogram("commit_seconds", "Time to commit one batch", total.commit_seconds)
        yield counter(
            "live_send_failures",
            "Batches committed but not sent live (subscribers read them from the log)",
            total.live_send_failures,
        )
        yield GaugeMetricFamily(
            _PREFIX + "transport_up", "1 when every connected broadcast's transport is up", up
        )
        yield counter(
            "transport_reconnects", "Lost transport connections re-established", reconnects
        )
        modes_family = GaugeMetricFamily(
            _PREFIX + "subscribers", "Open subscriptions by mode", labels=["mode"]
        )
        for mode, count in modes.items():
            modes_family.add_metric([mode], count)
        yield modes_family
        yield labelled(
            "subscriber_fallbacks",
            "Times a subscriber went back to reading the log, by reason",
            "reason",
            total.fallbacks,
        )
        yield labelled(
            "delivered",
            "Events delivered to subscribers, by where they came from",
            "source",
            {"live": total.delivered_live, "log": total.delivered_log},
        )
        yield labelled("foreign_messages", "Transport messages ignored, by kind", "kind", foreign)
        lag = GaugeMetricFamily(
            _PREFIX + "consumer_lag",
            "Events a durable consumer has not committed yet",
            labels=["channel", "consumer"],
        )
        for (channel, consumer), value in sorted(self.lags.items()):
            lag.add_metric([channel, consumer], value)
        yield lag
        yield GaugeMetricFamily(
            _PREFIX + "consumers",
            f"Durable consumers with a position (consumer_lag: the {LAG_SERIES} largest lags)",
            self.committed,
        )


#: Most ``consumer_lag`` series exported: those of the largest lags.
LAG_SERIES = 1000
#: Seconds between refreshes of ``consumer_lag`` for scrapes that cannot wait for one.
LAGS_EVERY = 15.0
#: Committed consumers from which a read of their lags serves the scrapes that come
#: within 20 times as long as it took (see BroadcastCollector.refresh_lags).
LAGS_MANY = 10_000


def _many_consumers(read: tuple[object, int]) -> bool:
    return read[1] >= LAGS_MANY


#: Longest wait, in seconds, of a scrape from another thread for the lags it reads.
SCRAPE_WAIT = 5.0


async def keep_lags_fresh(registry: CollectorRegistry, interval: float = LAGS_EVERY) -> None:
    """Refresh ``consumer_lag`` every ``interval`` seconds (runs until cancelled), for
    scrapes that can read them neither at once (see
    :meth:`BroadcastCollector.refresh_for_scrape`) nor through the admin app."""
    collector = collector_of(registry)
    if collector is None:
        return
    loop = asyncio.get_running_loop()
    collector.loops[loop] = collector.loops.get(loop, 0) + 1
    try:
        while True:
            try:
                # Bounded: a log gone silent must not stop the refreshes after it.
                await wait_for(collector.refresh_lags(), interval)
            except Exception:
                logger.debug("consumer lag refresh failed", exc_info=True)
            await asyncio.sleep(interval)
    finally:
        collector.loops[loop] -= 1
