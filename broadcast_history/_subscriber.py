"""One subscription: replay from the log, then live, exactly once and in order.

State machine (docs/concepts.md, "The replay → live handoff"):

* ``REPLAY``: read the log page by page from ``next`` on. An empty page means the
  subscriber has caught up: it switches to ``LIVE``.
* ``LIVE``: take envelopes the listener buffered. ``offset == next`` is delivered,
  ``offset < next`` is a duplicate and dropped, ``offset > next`` is held; if the
  hole is still there after the reorder window, go back to ``REPLAY`` to fill it.
  After ``idle_check`` seconds without traffic the log head is checked, so an event
  that was committed but never arrived live is still delivered.

The live buffer is bounded in events and in bytes: when it overflows it is dropped
and the subscriber goes back to ``REPLAY``, reading at its own pace in pages that are
bounded the same two ways. Memory stays bounded, nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ._bell import Bell
from ._budget import SubscriberOptions, weigh, weight
from ._consumer import Committable, Holding
from ._errors import HistoryTruncated, LogUnavailable, NotConnected, StreamReset, Unsubscribed
from ._event import NOTICE, Event
from ._heads import HeadProbe
from ._sparse import Sparse
from ._start import resolve_start
from ._stats import Stats
from .log import ChannelInfo, EventLog

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger("broadcast_history")
# Every idle subscriber checks the head: during an outage each would log a failure
# every idle_check (thousands of lines a second with thousands of clients).
_idle_check_failures = Sparse(logger, 10.0)
_REPLAY, _LIVE, _CLOSED = "replay", "live", "closed"
_NEVER = 10.0**9  # a bell's wait for a ring only
_T = TypeVar("_T")


class Subscriber(Committable):
    """Iterate it (``async for event in subscriber``) or call :meth:`get`.

    Made by ``Broadcast.subscribe``; not constructed directly. A durable consumer's
    subscription also has :meth:`commit`.
    """

    def __init__(
        self,
        channel: str,
        log: EventLog,
        options: SubscriberOptions,
        heads: HeadProbe,
        stats: Stats,
    ) -> None:
        self.channel = channel
        self._log = log
        # Shared by the subscribers of one broadcast.
        self._heads, self._stats, self._options = heads, stats, options
        # Where it is: the mode, the next offset to deliver, the epoch it reads.
        self._mode = _LIVE
        self._next = 1
        self._epoch: int | None = None
        self._buffer: deque[Event] = deque()
        self._held: dict[int, Event] = {}
        # Memory of the buffered and held live events (see weight()).
        self._live_bytes = 0
        self._page: deque[Event] = deque()
        self._overflowed = False
        self._gap_deadline: float | None = None
        # Loop time since which nothing arrived live (None: something just did). Kept
        # across get() calls: a caller polling with a timeout shorter than idle_check
        # must not put the idle check off for ever.
        self._quiet_since: float | None = None
        # The idle check's read of the log head while it runs (see _idle), with the
        # next offset and epoch it was asked for.
        self._checking: tuple[asyncio.Future[ChannelInfo | None], int, int | None] | None = None
        self._bell = Bell()
        self._error: BaseException | None = None
        # A page being read ahead during replay: (its start offset, the read).
        self._reading: tuple[int, asyncio.Future[tuple[list[Event], bool]]] | None = None
        # The lease held for a durable consumer (subscribe(consumer=...)).
        self._consumer: Holding | None = None
        # since=<a time after the head's>: events stamped before it are skipped until
        # one is not (timestamps never decrease within a channel).
        self._not_before: datetime | None = None
        # Done when the subscription closes: wakes a get() waiting on the log.
        self._ended: asyncio.Future[None] | None = None

    # -- public --------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """Whether the subscriber has caught up with the log and is reading live, as
        of its last ``get()``: ``False`` again as soon as its buffer overflows."""
        return self._mode == _LIVE and not self._page and not self._held and not self._overflowed

    @property
    def position(self) -> int:
        """Offset of the last event delivered (or the start position)."""
        return self._next - 1

    @property
    def not_before(self) -> datetime | None:
        """The ``since`` time events are still skipped until: set when it was later
        than the newest event at the start, ``None`` once an event reached it."""
        return self._not_before

    @property
    def epoch(self) -> int | None:
        """Epoch of the channel being read (``None`` until the channel exists)."""
        return self._epoch

    async def get(self) -> Event:
        """The next event.

        Raises:
            Unsubscribed: The broadcast disconnected.
        """
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise Unsubscribed("the subscription has ended") from None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._not_before is not None:
            return await self._skip_early(self._not_before)
        if self._consumer is not None:
            # What was delivered counts as handled; a holder without its lease stops.
            self._consumer.next_asked(self._epoch, self._next - 1)
        while True:
            page = self._page
            if page:
                event = page.popleft()
                self._next = event.offset + 1
                self._stats.delivered_log += 1
                if self._consumer is not None:
                    # A durable consumer that lost its lease while it waited for this
                    # event (a pause, a silent log) hands out nothing: another holder
                    # may be handling it. The next holder starts after the last commit.
                    self._consumer.check()
                return event
            if self._error is not None:
                raise self._error
            mode = self._mode
            if mode == _REPLAY:
                await self._read_page()
            elif mode == _LIVE:
                # The common case, without a coroutine of its own: the next event is
                # first in the buffer (what _live_step would deliver first).
                buffer = self._buffer
                if not self._held and not self._overflowed:
                    if not buffer:
                        # Nothing buffered: wait for the bell here, not in a coroutine
                        # of _live_step's (over many channels, one wait per event).
                        quiet = self._quiet_left()
                        if quiet <= 0 or not await self._bell.wait(quiet):
                            await self._idle()
                        continue
                    event = buffer[0]
                    if (
                        event.offset == self._next
                        and event.epoch == self._epoch
                        and event.message is not NOTICE
                    ):
                        event = self._delivered(buffer.popleft())
                        if self._consumer is not None:
                            self._consumer.check()  # see _page's
                        return event
                event_or_none = await self._live_step()
                if event_or_none is not None:
                    if self._consumer is not None:
                        self._consumer.check()
                    return event_or_none
            else:
                raise StopAsyncIteration

    def take_read(self, limit: int, max_bytes: int | None = None) -> list[Event]:
        """Up to ``limit`` of the next events, those already read from the log and in
        hand: what ``limit`` calls of :meth:`get` would return without waiting, taken
        at once (a stream writes them in one chunk). Empty when there are none, or
        when each must go through :meth:`get` (a consumer, a time to skip to). With
        ``max_bytes``, events are taken while their messages come to less."""
        page = self._page
        if not page or self._consumer is not None or self._not_before is not None:
            return []
        if max_bytes is None:
            taken = [page.popleft() for _ in range(min(limit, len(page)))]
        else:
            taken, size = [], 0
            while page and len(taken) < limit:
                size += weight(page[0])
                if size > max_bytes:
                    break
                taken.append(page.popleft())
            if not taken:
                return taken
        self._next = taken[-1].offset + 1
        self._stats.delivered_log += len(taken)
        return taken

    async def _skip_early(self, not_before: datetime) -> Event:
        self._not_before = None
        try:
            while True:
                event = await self.__anext__()
                if event.timestamp is None or event.timestamp >= not_before:
                    return event
        except BaseException:
            self._not_before = not_before  # not reached yet: the next call goes on
            raise

    # -- start ---------------------------------------------------------------------

    async def _start(
        self, since: int | datetime | None, history: int | None, epoch: int | None
    ) -> None:
        """Resolve the start position; called after live registration."""
        try:
            info = await self._heads.channel(self.channel)
            start = await resolve_start(self._log, self.channel, info, since, history, epoch)
        except (LogUnavailable, NotConnected):
            if self._mode == _CLOSED:
                return  # the broadcast disconnected meanwhile (its log too): it stays closed
            raise
        if self._mode == _CLOSED:
            return  # the broadcast disconnected meanwhile: it stays closed
        self._epoch = start.epoch
        self._next = start.offset
        if isinstance(since, datetime) and start.offset > start.head:
            self._not_before = since
        self._mode = _REPLAY if start.offset <= start.head else _LIVE

    # -- fed by the broadcast ------------------------------------------------------

    def _feed(self, events: Sequence[Event], size: int | None = None) -> None:
        """Buffer live ``events``; ``size`` is their :func:`weigh`, if known."""
        buffer = self._buffer
        buffer.extend(events)
        self._quiet_since = None
        self._live_bytes += weigh(events) if size is None else size
        options = self._options
        if len(buffer) > options.buffer_size or self._live_bytes > options.buffer_bytes:
            # Too slow to keep up: drop the buffer and catch up from the log later.
            buffer.clear()
            self._held.clear()
            self._live_bytes = 0
            self._overflowed = True
        self._bell.ring()

    def _drop_held(self) -> None:
        self._live_bytes -= weigh(list(self._held.values()))
        self._held.clear()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._bell.ring()

    def _abandon(self) -> None:
        """Closed, as :meth:`_close`, but for an event loop that has ended: nothing of
        that loop (futures, tasks, the bell) is touched."""
        self._mode = _CLOSED
        self._reading = self._checking = None
        self._page.clear()
        self._buffer.clear()
        self._held.clear()
        self._live_bytes = 0

    def _close(self) -> None:
        self._mode = _CLOSED
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        if self._reading is not None:
            _discard(self._reading[1])
            self._reading = None
        if self._checking is not None:
            _discard(self._checking[0])
            self._checking = None
        self._page.clear()
        self._buffer.clear()
        self._held.clear()
        self._live_bytes = 0
        self._bell.close()

    # -- replay --------------------------------------------------------------------

    async def _read_page(self) -> None:
        start = self._next
        reading, self._reading = self._reading, None
        if reading is not None and reading[0] == start:
            read = reading[1]
        else:
            if reading is not None:
                _discard(reading[1])
            # Whatever overflowed before this read is committed, so the read covers it.
            self._overflowed = False
            read = self._read(start)
        answered = await self._unless_closed(read, keep=False)
        if answered is None or self._mode == _CLOSED:
            return  # unsubscribed while the page was read: nothing more to deliver
        page, ended = answered
        if page and page[0].offset == start and page[-1].offset - start == len(page) - 1:
            epoch = page[0].epoch
            if self._epoch is None:
                self._epoch = epoch
            if epoch == self._epoch and page[-1].epoch == epoch:
                self._page.extend(page)
                if ended:
                    # The log had nothing more when read, and live delivery was set up
                    # before the read: whatever commits next arrives live (or shows up
                    # as a gap), so stop polling the log.
                    self._mode = _LIVE
                    self._gap_deadline = None
                else:
                    self._read_ahead(page[-1].offset + 1)
                return
        if self._held:
            # Drop what the pages delivered meanwhile; keep what is still ahead.
            for offset in [o for o in self._held if o < start]:
                self._live_bytes -= weight(self._held.pop(offset))
        if page or self._held:
            # A hole the log cannot fill, or events held live that the log lacks.
            await self._unless_closed(asyncio.ensure_future(self._check_head(start)), keep=False)
            if self._mode == _CLOSED:
                return
        if not page:
            if self._held:
                # Live events this log never stored: another log shares the transport.
                logger.warning("channel %r: live events not in the log, ignored", self.channel)
                self._drop_held()
            self._mode = _LIVE
            self._gap_deadline = None
            return
        raise HistoryTruncated(f"events from {start} of {self.channel!r} are missing")

    def _read(self, start: int) -> asyncio.Future[tuple[list[Event], bool]]:
        options = self._options
        return asyncio.ensure_future(
            self._heads.read_page(
                self.channel, start, options.page_size, options.page_bytes, self._epoch, self
            )
        )

    def _read_ahead(self, start: int) -> None:
        """Fetch the next page while the caller consumes this one."""
        self._overflowed = False
        self._reading = (start, self._read(start))

    async def _check_head(self, start: int, max_age: float = 0.0) -> ChannelInfo | None:
        """Raise if the log says the channel was reset or trimmed past ``start``."""
        info = await self._heads.channel(self.channel, max_age)
        if info is None:
            if self._epoch is not None:
                raise StreamReset(f"channel {self.channel!r} was deleted")
            return None
        if self._epoch is None:
            self._epoch = info.epoch
        elif info.epoch != self._epoch:
            raise StreamReset(f"channel {self.channel!r} was reset (epoch {info.epoch})")
        if info.first_offset > start and info.last_offset >= start:
            raise HistoryTruncated(
                f"events {start}..{info.first_offset - 1} of {self.channel!r} were trimmed "
                "before this subscriber read them"
            )
        return info

    # -- live ----------------------------------------------------------------------

    async def _live_step(self) -> Event | None:
        """Deliver the next live event, or switch mode; ``None`` means loop again."""
        if self._overflowed:
            self._fall_back("overflow")
            return None
        held = self._held
        expected = self._next
        if held:
            event = held.pop(expected, None)
            if event is not None:
                if not held:
                    self._gap_deadline = None
                return self._delivered(event)
            if min(held) < expected:
                # Delivered from the log meanwhile.
                for offset in [o for o in held if o < expected]:
                    self._live_bytes -= weight(held.pop(offset))
                if not held:
                    self._gap_deadline = None
        buffer = self._buffer
        while buffer:
            event = buffer.popleft()
            offset = event.offset
            # The epoch first: a reset channel's new events have low offsets, and
            # taken for duplicates they kept the idle check away while they came.
            if offset < expected and event.epoch == self._epoch:
                self._live_bytes -= weight(event)
                continue
            if event.epoch != self._epoch:
                if self._epoch is not None:
                    # Possibly a late envelope of an old epoch: let the log decide.
                    self._live_bytes -= weight(event)
                    checked = asyncio.ensure_future(self._check_head(expected))
                    await self._unless_closed(checked, keep=False)
                    continue
                self._epoch = event.epoch
            if event.message is NOTICE:
                # The payload did not fit the transport: read it from the log.
                self._live_bytes -= weight(event)
                self._fall_back("notice")
                return None
            if offset == expected and not held:
                return self._delivered(event)
            held[offset] = event
            if len(held) > self._options.buffer_size:
                self._drop_held()
                self._fall_back("overflow")
                return None
            if expected in held:
                return None
        loop = asyncio.get_running_loop()
        if held:
            now = loop.time()
            if self._gap_deadline is None:
                self._gap_deadline = now + self._options.reorder_window
            if now >= self._gap_deadline:
                self._fall_back("gap")
                return None
            await self._bell.wait(self._gap_deadline - now)
            return None
        quiet = self._quiet_left()
        if quiet <= 0 or not await self._bell.wait(quiet):
            await self._idle()
        return None

    def _quiet_left(self) -> float:
        """Seconds until the idle check is due: ``idle_check`` after the last arrival
        (or the last check), however many waits were cut short meanwhile."""
        now = asyncio.get_running_loop().time()
        since = self._quiet_since
        if since is None:
            since = self._quiet_since = now
        return since + self._options.idle_check - now

    async def _idle(self) -> None:
        """Nothing arrived for ``idle_check`` seconds: make sure the log has nothing
        newer either (an event whose live copy was lost)."""
        if self._mode != _LIVE:
            self._quiet_since = None
            return
        if self._buffer or self._overflowed:
            return  # it arrived as the quiet period ended: delivered first, no check
        asked = self._checking
        if asked is not None and asked[1:] != (self._next, self._epoch):
            # Events were delivered since it was asked: its answer (a reset, a trim
            # seen against an older offset) is about a state that has gone.
            _discard(asked[0])
            asked = None
        if asked is None:
            # A future of its own: a get() cancelled while the log answers (a caller
            # polling with a short timeout) leaves it running, and the next get()
            # takes its answer instead of asking again, and being cut short again.
            idle = self._options.idle_check
            future = asyncio.ensure_future(self._check_head(self._next, max_age=idle / 2))
            asked = self._checking = (future, self._next, self._epoch)
        checking = asked[0]
        try:
            # Live events that arrive meanwhile are delivered first: a log gone silent
            # to this host (a partition, a paused server) must not hold them up. The
            # check goes on; its answer is taken by the next idle check if it is
            # still about the same offset.
            woken = None if checking.done() else self._bell.wait(_NEVER)
            info = await self._unless_closed(checking, keep=True, woken=woken)
        except LogUnavailable as exc:
            # Only a safety net failed: live delivery goes on, the next idle check
            # tries again.
            _idle_check_failures.warning("channel %r: idle check failed: %s", self.channel, exc)
            return
        finally:
            if checking.done():  # answered: the next quiet period starts now
                self._checking = self._quiet_since = None
        if info is not None and info.last_offset >= self._next:
            self._fall_back("idle")

    async def _unless_closed(
        self, read: asyncio.Future[_T], *, keep: bool, woken: asyncio.Future[bool] | None = None
    ) -> _T | None:
        """``read``'s result, or ``None`` as soon as the subscription closes: a log gone
        silent must not hold ``get()`` past ``disconnect()``.

        Args:
            keep: A cancelled caller leaves ``read`` running (for the next call)
                instead of cancelling it; so does ``woken``.
            woken: Also return ``None`` once this is done (the bell rang).
        """
        if not read.done():
            ended = self._ended
            if ended is None:
                ended = self._ended = asyncio.get_running_loop().create_future()
            if self._mode == _CLOSED and not ended.done():
                ended.set_result(None)
            waits = (read, ended) if woken is None else (read, ended, woken)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if not keep:
                    read.cancel()
                _discard(read)
                raise
            if not read.done():
                _discard(read)  # its answer, when it comes, may be for nobody
                return None
        return read.result()

    def _delivered(self, event: Event) -> Event:
        """Account for live ``event``, the next one, as delivered; returns it."""
        self._live_bytes -= weight(event)
        self._next = event.offset + 1
        self._stats.delivered_live += 1
        return event

    def _fall_back(self, reason: str) -> None:
        """Go back to reading the log (``reason`` is counted for the metrics)."""
        if self._mode == _CLOSED:
            return  # closed during the await that led here: stay closed
        self._stats.fallbacks[reason] += 1
        self._mode = _REPLAY
        self._quiet_since = None


def _discard(read: asyncio.Future[Any]) -> None:
    """Drop a read (ahead, or of the head) no longer wanted, without cancelling it midway."""

    def consume(done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()

    read.add_done_callback(consume)
