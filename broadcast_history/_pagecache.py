"""Replay pages kept for the next subscriber that reads the same stretch of a channel.

After a deploy or a network blip, many clients reconnect to the same channels and
replay overlapping stretches of them. Without sharing, each one reads its pages from
the log and builds its own events: a hundred subscribers catching up cost a hundred
times the reads and the conversions. A whole page read while its channel has more
than one subscriber in the broadcast serves every later subscriber of that stretch
instead (a lone subscriber's pages are not kept: see ``HeadProbe.read_page``).

Only whole pages are kept: ``size`` events starting at a multiple of ``size`` plus
one, all of one epoch, and served only to a reader of that epoch. Before serving a
kept page the broadcast checks that the log still holds its last event as kept
(``HeadProbe``): a channel deleted, trimmed or re-imported meanwhile is seen as it
would be without the cache, and the page is dropped.
"""

from __future__ import annotations

from collections import OrderedDict

from ._budget import weigh
from ._event import Event

#: Bytes of kept pages per broadcast (see :func:`weigh`); least recently used first out.
MAX_BYTES = 16 * 1024 * 1024


class PageCache:
    """Whole replay pages of a broadcast's channels, bounded in bytes."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._pages: OrderedDict[tuple[str, int, int], tuple[list[Event], int]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def page_start(start: int, size: int) -> int:
        """First offset of the whole page of ``size`` events holding offset ``start``."""
        return (start - 1) // size * size + 1

    def get(self, channel: str, start: int, size: int, epoch: int | None) -> list[Event] | None:
        """Events from ``start`` to the end of its page, if the page is kept for ``epoch``."""
        if epoch is None:
            return None  # a reader that does not know its epoch yet checks the log
        first = self.page_start(start, size)
        key = (channel, first, size)
        entry = self._pages.get(key)
        if entry is None:
            return None
        events = entry[0]
        if events[0].epoch != epoch:
            return None  # a reader of another incarnation: the log answers it
        self._pages.move_to_end(key)
        return events[start - first :]

    def put(self, channel: str, start: int, size: int, events: list[Event]) -> None:
        """Keep ``events``, read from ``start``, if they are a whole page."""
        if (
            len(events) != size
            or start != self.page_start(start, size)
            or events[0].offset != start
            or events[-1].offset != start + size - 1
            or events[0].epoch != events[-1].epoch
        ):
            return
        key = (channel, start, size)
        if key in self._pages:
            self._drop(key)  # the newer read wins (the channel may have been reset)
        cost = weigh(events)
        if cost > self._max_bytes:
            return
        self._pages[key] = (events, cost)
        self._bytes += cost
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._pages)))

    def drop(self, channel: str, start: int, size: int) -> None:
        """Forget the page of ``start`` (the log no longer holds it as kept)."""
        key = (channel, self.page_start(start, size), size)
        if key in self._pages:
            self._drop(key)

    def _drop(self, key: tuple[str, int, int]) -> None:
        _, cost = self._pages.pop(key)
        self._bytes -= cost
