"""Replay pages asked for one ahead, on stores that read on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ._calls import timed_out

_R = TypeVar("_R")

#: A page read for someone: who, channel, first offset, most rows, most payload bytes.
_Key = tuple[object, str, int, int, int | None]


class ReadAhead(Generic[_R]):
    """The rows of the page after a full one, asked for before that one is converted.

    On Postgres and MySQL a page's rows become events on the event loop, and a
    subscriber asks for its next page only once its consumer has taken every event of
    this one: the server worked while the loop waited, and the loop converted while
    the server idled. Here the next page's statement goes out as soon as a full
    page's rows arrive, so the two overlap.

    A page read ahead goes only to the reader it was read for (``ahead``), whose
    earlier read set it off, so it was read after that reader subscribed, as its own
    read-ahead is. Nobody else gets it: a subscriber that came later could be handed
    a page from before a delete and re-import. And it goes only if full: a short
    page would end the replay, and it may lack what was committed after it was read
    and that the reader has since missed live (its buffer overflowed, or a gap is
    being filled); a full page ends nothing and holds only history. A page not taken
    within :attr:`FRESH` seconds is let go (the reader went away, or is slow: it
    reads that page again), a reader has one page ahead at most, and at most
    :attr:`SLOTS` are ahead, or still being read, at once; past that, pages are read
    when asked for.
    """

    SLOTS = 8
    FRESH = 1.0

    def __init__(self, fetch: Callable[[str, int, int, int | None], Awaitable[list[_R]]]) -> None:
        self._fetch = fetch
        # Per page: when it was asked for, the read, and the timer that lets it go.
        self._ahead: dict[_Key, tuple[float, asyncio.Future[list[_R]], asyncio.TimerHandle]] = {}
        # Every read ahead still running, taken or not: close() lets them end.
        self._running: set[asyncio.Future[list[_R]]] = set()
        self._closed = False

    async def rows(
        self, channel: str, start: int, limit: int, max_bytes: int | None, ahead: object = None
    ) -> list[_R]:
        """The rows of a page, read ahead if they were; then, for ``ahead`` (if given)
        and after a full page, the next page is asked for."""
        rows = (
            None if ahead is None else await self._taken((ahead, channel, start, limit, max_bytes))
        )
        if rows is None:
            rows = await self._fetch(channel, start, limit, max_bytes)
        # After a full page, the next one is asked for, and one loop turn sends its
        # statement before this page's rows are converted.
        following: _Key = (ahead, channel, start + limit, limit, max_bytes)
        if ahead is not None and len(rows) == limit and self._ask(following):
            await asyncio.sleep(0)
        return rows

    @property
    def pending(self) -> int:
        """Reads ahead not taken yet."""
        return len(self._ahead)

    async def close(self) -> None:
        """Read nothing ahead from now on; let the reads still running end (a second
        at most, then cancel them, and wait a second more), so no connection is in use
        when the store closes. A read that a silent server holds even then is left to
        the store, which ends its connection."""
        self._closed = True
        for key in list(self._ahead):
            self._let_go(key)
        running = list(self._running)
        if running:
            _, late = await asyncio.wait(running, timeout=self.FRESH)
            for read in late:
                read.cancel()
            if late:
                await asyncio.wait(late, timeout=self.FRESH)

    async def _taken(self, key: _Key) -> list[_R] | None:
        if key not in self._ahead:
            return None
        began = self._ahead[key][0]
        read = self._let_go(key)
        if time.monotonic() - began > self.FRESH:
            return None
        try:
            # Shielded: a caller cancelled here leaves the read to end by itself.
            rows = await asyncio.shield(read)
        except Exception as exc:
            if timed_out(exc):
                raise  # read again, it would wait as long once more
            return None  # read it again, and fail (or not) as that read does
        return rows if len(rows) == key[3] else None

    def _ask(self, key: _Key) -> bool:
        if self._closed:
            return False
        # The reader's earlier page, if still here, will not be asked for now.
        for other in [k for k in self._ahead if k[0] == key[0]]:
            self._let_go(other)
        # Reads let go still run until they end: they count against SLOTS too.
        if len(self._ahead) >= self.SLOTS or len(self._running) >= self.SLOTS:
            return False
        read = asyncio.ensure_future(self._fetch(*key[1:]))
        read.add_done_callback(_retrieve)
        self._running.add(read)
        read.add_done_callback(self._running.discard)
        # Not taken in time (the reader went away, or is slow): let it go, rows and
        # reader, even if nothing else is read here for a long while.
        timer = asyncio.get_running_loop().call_later(self.FRESH, self._let_go, key)
        self._ahead[key] = (time.monotonic(), read, timer)
        return True

    def _let_go(self, key: _Key) -> asyncio.Future[list[_R]]:
        # The timer is cancelled too: a pending one would keep the rows alive until it
        # fires, and a second's worth of replayed rows made every pass of the garbage
        # collector long (a replay ran at 410k instead of 720k events/s).
        _, read, timer = self._ahead.pop(key)
        timer.cancel()
        return read


def _retrieve(read: asyncio.Future[Any]) -> None:
    # A read nobody took: its failure must not be logged as never retrieved.
    if not read.cancelled():
        read.exception()
