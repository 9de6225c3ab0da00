"""Shared lookups of a channel's head, for the idle checks of many subscribers."""

from __future__ import annotations

import asyncio

from .log import ChannelInfo, EventLog


class HeadProbe:
    """Shares log lookups of a channel's head among the subscribers of a broadcast.

    Every idle subscriber checks the head about once per ``idle_check``; without
    sharing, 10,000 idle subscribers would cost 10,000 queries a second. A lookup
    still running is always shared; an idle check may also reuse one that started
    at most ``max_age`` seconds ago, which only delays the check by that much.
    """

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._lookups: dict[str, tuple[float, asyncio.Future[ChannelInfo | None]]] = {}

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
