"""Pauses between reconnection attempts of a live transport."""

from __future__ import annotations

import asyncio


class Backoff:
    """Sleeps ``first`` seconds (50 ms), then twice as long each time, up to ``longest``.

    The first retry is quick, because most losses are a single dropped connection;
    doubling keeps a transport from hammering a server that is down for longer.

    Args:
        longest: Longest pause, in seconds.
        first: First pause, in seconds (and the pause after :meth:`reset`).
    """

    def __init__(self, longest: float, first: float = 0.05) -> None:
        self._longest = longest
        self.first = first
        self._delay = first

    def reset(self) -> None:
        """Start again from the shortest pause (after a successful connection)."""
        self._delay = self.first

    async def sleep(self) -> None:
        """Wait the current pause, and lengthen the next one."""
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, self._longest)
