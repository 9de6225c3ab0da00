"""A subscriber's doorbell: wait until something arrives, or until a time passes."""

from __future__ import annotations

import asyncio


class Bell:
    """Wakes one waiter, with ``True`` when rung or ``False`` when its time is up.

    One timer lives across waits: a busy subscriber is woken by events many times per
    idle period, and arming and cancelling a timer each time costs more than the wait
    itself. The timer re-arms itself when the deadline moved on meanwhile.
    """

    def __init__(self) -> None:
        self._waiter: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    def ring(self, value: bool = True) -> None:
        """Wake the waiter, if one waits."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def wait(self, timeout: float) -> asyncio.Future[bool]:
        """Await this: ``True`` when rung, ``False`` once ``timeout`` seconds passed.

        A future rather than a coroutine: a subscriber of a channel that gets one
        event per commit waits once per event, and a frame per wait is measurable.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        deadline = self._deadline = loop.time() + timeout
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)
        return waiter

    def close(self) -> None:
        """Stop the timer and wake the waiter (``True``: look at the state again)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ring(True)

    def _expire(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # not waiting: the next wait arms a timer of its own
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self.ring(False)
        else:
            self._timer = loop.call_at(self._deadline, self._expire)
