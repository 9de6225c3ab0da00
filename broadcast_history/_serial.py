"""One lifecycle call at a time: ``connect()`` called twice at once runs once."""

from __future__ import annotations

import asyncio

#: Seconds to close, from a new event loop, what one that ended without
#: ``disconnect()`` left open.
FORGET_WAIT = 5.0


class Serial:
    """An :class:`asyncio.Lock` made anew for each event loop.

    A broadcast may be connected under one ``asyncio.run()`` and again under
    another; a lock that once had a waiter stays bound to the loop it waited in.
    """

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock
