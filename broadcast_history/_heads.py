"""What the subscribers of one broadcast share when they go to the log: lookups of a
channel's head (idle checks) and turns at reading pages (catch-up)."""

from __future__ import annotations

import asyncio

from ._event import Event
from .log import ChannelInfo, EventLog


class HeadProbe:
    """Shares log lookups of a channel's head among the subscribers of a broadcast.

    Every idle subscriber checks the head about once per ``idle_check``; without
    sharing, 10,000 idle subscribers would cost 10,000 queries a second. A lookup
    still running is always shared; an idle check may also reuse one that started
    at most ``max_age`` seconds ago, which only delays the check by that much.
    """

    #: Replay pages read (and turned into events) at once, per broadcast.
    READS_AT_ONCE = 4

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._lookups: dict[str, tuple[float, asyncio.Future[ChannelInfo | None]]] = {}
        self._reads: asyncio.Semaphore | None = None

    async def read_page(self, channel: str, start: int, limit: int, max_bytes: int) -> list[Event]:
        """A replay page, when this broadcast's turn comes.

        A hundred subscribers catching up at once would otherwise fill every loop
        iteration with page conversions, and a publish, which needs several
        iterations, would crawl: a few reads at a time, first come first served,
        leave the loop free for everything else.
        """
        if self._reads is None:
            self._reads = asyncio.Semaphore(self.READS_AT_ONCE)
        reads = self._reads
        await reads.acquire()
        read = asyncio.ensure_future(self._log.read_from(channel, start, limit, max_bytes))

        def done(read: asyncio.Future[list[Event]]) -> None:
            # The turn ends when the read does: a cancelled caller's read still runs
            # to its end (see finish_on_cancel) and still counts against the limit.
            reads.release()
            if not read.cancelled():
                read.exception()

        read.add_done_callback(done)
        return await asyncio.shield(read)

    async def channel(self, name: str, max_age: float = 0.0) -> ChannelInfo | None:
        """The state of channel ``name``, at most ``max_age`` seconds old."""
        now = asyncio.get_running_loop().time()
        entry = self._lookups.get(name)
        if entry is None or (entry[1].done() and now - entry[0] > max_age):
            future = asyncio.ensure_future(self._log.channel(name))
            self._lookups[name] = entry = (now, future)
            if len(self._lookups) > 4096:
                # Forget finished lookups of channels nobody checks any more.
                for key in [k for k, (_, f) in self._lookups.items() if f.done()]:
                    del self._lookups[key]
        # Shielded: one caller being cancelled must not cancel the others' answer.
        return await asyncio.shield(entry[1])
