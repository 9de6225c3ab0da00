"""What the subscribers of one broadcast share when they go to the log: lookups of a
channel's head (idle checks), turns at reading pages and the pages read (catch-up)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping

from ._budget import page_was_cut
from ._errors import LogUnavailable
from ._event import Event
from ._gate import acquire_while_moving
from ._lookups import StartLookups, look_up
from ._pagecache import PageCache
from .log import ChannelInfo, EventLog


class HeadProbe:
    """Shares log lookups of a channel's head among the subscribers of a broadcast.

    Every idle subscriber checks the head about once per ``idle_check``; without
    sharing, 10,000 idle subscribers would cost 10,000 queries a second. An idle
    check shares a lookup still running, or one that started at most ``max_age``
    seconds ago, which only delays the check by that much. Lookups that must see
    everything stored before they were asked (``max_age`` 0) go to
    :class:`StartLookups` instead.
    """

    #: Replay pages read (and turned into events) at once, per broadcast. A Postgres
    #: or MySQL log may also have a few statements out for pages read ahead for lone
    #: subscribers (only their rows: they are converted in their reader's turn).
    READS_AT_ONCE = 4

    def __init__(self, log: EventLog, subscribers: Mapping[str, Collection[object]]) -> None:
        self._log = log
        # The broadcast's subscribers by channel: pages are kept only for a channel
        # that has more than one (see read_page).
        self._subscribers = subscribers
        self._lookups: dict[str, tuple[float, asyncio.Future[ChannelInfo | None]]] = {}
        self._fresh = StartLookups(log)
        # Loop time of each channel's last idle check (see channel).
        self._idle: dict[str, float] = {}
        # Idle lookups for the next round, and the task running the rounds.
        self._queued: dict[str, asyncio.Future[ChannelInfo | None]] = {}
        self._looking: asyncio.Future[None] | None = None
        self._reads: asyncio.Semaphore | None = None
        # Loop time the last page read succeeded (see _turn).
        self._finished = float("-inf")
        # Checks of kept pages asked for, by channel, and the task answering them.
        self._checks: dict[str, list[tuple[tuple[Event, ...], asyncio.Future[bool]]]] = {}
        self._checking: asyncio.Future[None] | None = None
        # Page reads waiting for their turn, by (channel, page start, page size):
        # (read's start, read). Only these are shared: the log is read after every
        # caller that joined asked, as by a read of its own (one already running
        # could miss a delete, a re-import, or events committed since it began).
        self._waiting: dict[tuple[str, int, int], tuple[int, asyncio.Future[list[Event]]]] = {}
        #: Whole replay pages, shared by the subscribers that replay the same stretch.
        self.pages = PageCache()

    async def read_page(
        self,
        channel: str,
        start: int,
        limit: int,
        max_bytes: int,
        epoch: int | None,
        reader: object = None,
    ) -> tuple[list[Event], bool]:
        """A replay page from ``start``, and whether it reached the end of the log.

        Pages are aligned to multiples of ``limit`` (the first one read from an
        offset inside a page stops at that page's end), so that the subscribers
        replaying the same stretch share whole pages: kept ones through the cache, and
        one read while it waits for its turn.

        Reads take turns: a hundred subscribers catching up at once would otherwise
        fill every loop iteration with page conversions, and a publish, which needs
        several iterations, would crawl: a few reads at a time, first come first
        served, leave the loop free for everything else.

        A whole page is kept for later readers only while its channel has another
        subscriber in this broadcast. A lone subscriber replaying a long history
        (a worker, a durable consumer) would only fill the cache with pages nobody
        reads again, and the garbage collector would walk every kept event on each
        pass: a quarter of a 1M-event replay's time went to that. In a wave of
        reconnects the first subscriber's pages are not kept; the second one's are.

        ``reader`` (the subscriber asking) lets a lone subscriber's next page be read
        ahead for it alone (see :class:`~broadcast_history.log._ahead.ReadAhead`).
        """
        kept = self.pages.get(channel, start, limit, epoch)
        if kept is not None:
            # Served once the log is seen to still hold the page as kept, from this
            # caller's first event to the page's last: a deleted, trimmed or
            # re-imported channel shows up here as soon as it would without the cache.
            if await self._still_stored(channel, kept[0], kept[-1]):
                return kept, False
            self.pages.drop(channel, start, limit)
        first = PageCache.page_start(start, limit)
        wanted = first + limit - start
        key = (channel, first, limit)
        waiting = self._waiting.get(key)
        if waiting is not None and waiting[0] <= start:
            page = await self._join(waiting, start)
            if page is not None:
                # Not taken for the end of the log even if short (the read began
                # after this call, so it could be; the next read, its own, says).
                return page, False

        def forget(_: object = None) -> None:
            # Once the read has its turn (or failed before), nobody else joins it.
            if key in self._waiting and self._waiting[key][1] is read:
                del self._waiting[key]

        # A reader's next page is read ahead from its aligned pages on (the one after
        # a partial first page would be asked for with another size).
        ahead = reader if start == first else None
        read = asyncio.ensure_future(self._read(channel, start, wanted, max_bytes, forget, ahead))
        if waiting is None:
            self._waiting[key] = (start, read)
            read.add_done_callback(forget)
        # Shielded: a caller cancelled must not cancel the read others joined.
        page = await asyncio.shield(read)
        if start == first and len(page) == limit and len(self._subscribers.get(channel, ())) > 1:
            self.pages.put(channel, start, limit, page)
        ended = len(page) < wanted and not page_was_cut(page, max_bytes)
        return page, ended

    @staticmethod
    async def _join(
        waiting: tuple[int, asyncio.Future[list[Event]]], start: int
    ) -> list[Event] | None:
        """The events from ``start`` on of a read of the same page that was still
        waiting for its turn when this caller asked, if it got any of them."""
        read_start, read = waiting
        page = await asyncio.shield(read)
        skip = start - read_start
        if len(page) <= skip or page[skip].offset != start:
            return None
        return page[skip:]

    def _gate(self) -> asyncio.Semaphore:
        if self._reads is None:
            self._reads = asyncio.Semaphore(self.READS_AT_ONCE)
        return self._reads

    async def _read(
        self,
        channel: str,
        start: int,
        limit: int,
        max_bytes: int,
        began: Callable[[], None] | None = None,
        reader: object = None,
    ) -> list[Event]:
        reads = self._gate()
        await self._turn(reads)
        if began is not None:
            began()
        # Nobody joins the read from here on. Pages are read ahead only for a lone
        # subscriber: the one asking now is the one that will take the next page, and
        # nobody who subscribed after that page was read gets it. Subscribers sharing
        # a channel share its pages instead (the cache, joined reads).
        subscribers = self._subscribers.get(channel, ())
        ahead = (
            reader
            if reader is not None and len(subscribers) == 1 and reader in subscribers
            else None
        )
        read = asyncio.ensure_future(
            self._log.read_from(channel, start, limit, max_bytes, ahead=ahead)
        )

        def done(read: asyncio.Future[list[Event]]) -> None:
            # The turn ends when the read does: a cancelled caller's read still runs
            # to its end (see finish_on_cancel) and still counts against the limit.
            reads.release()
            if not read.cancelled() and read.exception() is None:
                self._finished = asyncio.get_running_loop().time()
            if not read.cancelled():
                read.exception()

        read.add_done_callback(done)
        return await asyncio.shield(read)

    async def _turn(self, reads: asyncio.Semaphore) -> None:
        """Wait for a turn at reading; fail if the reads ahead made no progress for
        the log's read bound.

        When the log goes silent, the reads ahead each take the bound to fail: a
        read waiting behind them would fail a bound after them, and the subscribers
        past the first few turns in waves, one bound apart. A log that is busy but
        answers finishes reads meanwhile, and its queue is waited for however long.
        """
        timeout = self._log.read_timeout
        if timeout is None:
            await reads.acquire()
            return
        try:
            await acquire_while_moving(reads, timeout, lambda: self._finished)
        except asyncio.TimeoutError as exc:
            raise LogUnavailable(
                f"the event log did not answer the reads ahead of this one within {timeout:.3g} s"
            ) from exc

    async def _still_stored(self, channel: str, *events: Event) -> bool:
        """Whether the log holds ``events`` at their offsets: same epoch, same commit
        time.

        Within one incarnation of a channel stored events never change, and a history
        that diverged (the channel deleted and an older export imported, a backup
        restored) commits its later events at later times.

        The checks asked for while one runs go to the log together when it ends, one
        query per channel, and without a turn at reading pages: a hundred subscribers
        catching up ask for one per page, and waiting for a turn each made catch-up a
        third slower (measured).
        """
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._checks.setdefault(channel, []).append((events, answer))
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._check_all())
        return await answer

    async def _check_all(self) -> None:
        try:
            while self._checks:
                # What was asked before these queries begin: each is answered by a
                # read begun after it was asked.
                checks, self._checks = self._checks, {}
                await asyncio.gather(*(self._check(c, asked) for c, asked in checks.items()))
        finally:
            self._checking = None
            for asked in self._checks.values():  # cancelled: nobody will answer them
                for _, answer in asked:
                    answer.cancel()
            self._checks.clear()

    async def _check(
        self, channel: str, asked: list[tuple[tuple[Event, ...], asyncio.Future[bool]]]
    ) -> None:
        try:
            offsets = sorted({event.offset for events, _ in asked for event in events})
            try:
                found = await self._log.read_at(channel, offsets)
            except Exception as exc:
                for _, answer in asked:
                    if not answer.done():
                        answer.set_exception(exc)
                return
            stored = {event.offset: (event.epoch, event.timestamp) for event in found}
            for events, answer in asked:
                if not answer.done():
                    answer.set_result(
                        all(stored.get(e.offset) == (e.epoch, e.timestamp) for e in events)
                    )
                    # One answer per loop iteration: each subscriber answered goes
                    # through a page of events at once, and fifty of them in one
                    # iteration would hold a publisher up for as long.
                    await asyncio.sleep(0)
        finally:
            for _, answer in asked:
                answer.cancel()  # only those left unanswered (cancelled): nobody will

    async def channel(self, name: str, max_age: float = 0.0) -> ChannelInfo | None:
        """The state of channel ``name``, at most ``max_age`` seconds old; with
        ``max_age`` 0, read by a query begun after this call.

        An idle check (``max_age`` above 0) that has to go to the log also asks for
        every other channel of this broadcast's subscribers last looked up over
        ``max_age / 2`` ago, in the same query: their own checks, due within the next
        moments, then reuse it. The checks that fall due while a query runs go to the
        log together when it ends. Each channel asking alone cost a transaction per
        quiet channel per ``idle_check`` (234 a second, and new connections past the
        pool, for 200 quiet channels on Postgres).
        """
        if max_age <= 0:
            return await self._fresh.lookup(name)
        now = asyncio.get_running_loop().time()
        self._idle[name] = now
        entry = self._lookups.get(name)
        if entry is None or (entry[1].done() and now - entry[0] > max_age):
            # Channels whose idle checks go on: one that became busy stops asking,
            # and is left out once its last check is four ages old.
            names = [name] + [
                other
                for other, (asked, lookup) in self._lookups.items()
                if lookup.done()
                and now - asked > max_age / 2
                and other != name
                and now - self._idle.get(other, float("-inf")) < 4 * max_age
                and self._subscribers.get(other)
            ]
            futures = self._enqueue(names)
            for other, future in futures.items():
                self._lookups[other] = (now, future)
            entry = self._lookups[name]
            if len(self._lookups) > 4096:
                # Forget finished lookups of channels nobody checks any more.
                for key in [k for k, (_, f) in self._lookups.items() if f.done()]:
                    del self._lookups[key]
                    self._idle.pop(key, None)
        # Shielded: one caller being cancelled must not cancel the others' answer.
        return await asyncio.shield(entry[1])

    def _enqueue(self, names: list[str]) -> dict[str, asyncio.Future[ChannelInfo | None]]:
        """Lookups of ``names`` for the next round of :meth:`_look_all`."""
        loop = asyncio.get_running_loop()
        futures = {}
        for name in names:
            future = self._queued.get(name)
            if future is None:
                future = self._queued[name] = loop.create_future()
            futures[name] = future
        if self._looking is None:
            self._looking = asyncio.ensure_future(self._look_all())
            self._looking.add_done_callback(_quiet)
        return futures

    async def _look_all(self) -> None:
        """Rounds of queued lookups, one at a time, until none is left; each round
        goes to the log as :func:`look_up` sends it, after every one of them asked."""
        try:
            while self._queued:
                queued, self._queued = self._queued, {}
                await look_up(self._log, queued)
        finally:
            self._looking = None
            for future in self._queued.values():
                future.cancel()  # stopped (the broadcast closes): nobody will answer
            self._queued.clear()


def _quiet(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
