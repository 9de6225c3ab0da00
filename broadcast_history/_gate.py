"""The lease writes one broadcast runs at once (acquisitions, commits, releases).

SQLite runs one write at a time: a burst of 1,000 commits must not delay a renewal
(which does not queue here) past its lease, so at most a few lease writes are in
flight. A write given up on (no answer within its bound) keeps running, as every
call of the log does, and keeps its slot until it ends: writes without an answer
never pile up past the gate. Waiting for a slot fails only when no write has ended
for a while: a busy log that answers is waited for, however long its queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import _clock
from ._cancel import acquire, wait_for

T = TypeVar("T")


async def acquire_while_moving(
    slots: asyncio.Semaphore, quiet: float, last_end: Callable[[], float]
) -> None:
    """Acquire ``slots``, waiting as long as the holders make progress.

    Raises:
        asyncio.TimeoutError: ``last_end()`` (the loop time a holder last finished)
            did not move for ``quiet`` seconds of waiting.
    """
    if not slots.locked():
        await slots.acquire()
        return
    loop = asyncio.get_running_loop()
    asked = loop.time()
    while True:
        since = max(asked, last_end())
        if await acquire(slots, max(since + quiet - loop.time(), 0.001)):
            return
        if last_end() <= since:
            raise asyncio.TimeoutError  # nothing ended meanwhile: the log does not answer


class Gate:
    """At most ``size`` lease writes at once."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._ended = float("-inf")  # loop time the last write ended

    async def start(
        self, call: Callable[[], Awaitable[T]], *, quiet: float | None = None
    ) -> tuple[float, asyncio.Future[T]]:
        """Take a slot and start ``call()`` in it: (when it was made, on the lease
        clock, and its task).

        The slot is freed when the call ends, not when its caller stops waiting for
        it (a caller cancelled while its write still runs would let the next one in).

        Raises:
            asyncio.TimeoutError: No write ended for ``quiet`` seconds while this one
                waited for a slot (``None``: waits as long as it takes).
        """
        if quiet is None:
            await self._slots.acquire()
        else:
            await self._slot(quiet)
        made = _clock.lease_clock()  # what holders count their leases from
        try:
            task = asyncio.ensure_future(call())
        except BaseException:
            self._end(None)
            raise
        task.add_done_callback(self._end)
        return made, task

    async def run(
        self, call: Callable[[], Awaitable[T]], *, quiet: float, answer: float
    ) -> tuple[float, T]:
        """``call()`` in a slot: (when it was made, on the lease clock, and its result).

        Raises:
            asyncio.TimeoutError: No write ended for ``quiet`` seconds while this one
                waited for a slot, or ``call`` gave no answer within ``answer``.
        """
        made, task = await self.start(call, quiet=quiet)
        return made, await wait_for(asyncio.shield(task), answer)

    async def _slot(self, quiet: float) -> None:
        await acquire_while_moving(self._slots, quiet, lambda: self._ended)

    def _end(self, done: asyncio.Future[Any] | None) -> None:
        self._slots.release()
        self._ended = asyncio.get_running_loop().time()
        if done is not None and not done.cancelled():
            done.exception()  # retrieved: a write given up on may fail unheard
