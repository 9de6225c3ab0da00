"""A read whose answer is reused for a while in proportion to what it costs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

_T = TypeVar("_T")


class SpacedRead(Generic[_T]):
    """Calls ``read``, and answers the calls that come within ``spacing`` times as long
    as it took with the same result: a read over every channel row (a million take
    0.25-0.35 s) polled by each open console every 2 s would keep the database busy,
    while a quick read is repeated almost every time. Kept ``longest`` seconds at most,
    and only if ``worth_keeping`` says so of it."""

    def __init__(
        self,
        read: Callable[[], Awaitable[_T]],
        spacing: float = 20.0,
        longest: float = 60.0,
        worth_keeping: Callable[[_T], bool] = lambda _: True,
    ) -> None:
        self._read = read
        self._spacing = spacing
        # A read stalled by something else (a busy loop, a pool) is not kept for long.
        self._longest = longest
        self._worth_keeping = worth_keeping
        self._kept: tuple[_T, float] | None = None  # the result, and until when

    async def __call__(self) -> _T:
        if self._kept is not None and time.monotonic() < self._kept[1]:
            return self._kept[0]
        started = time.monotonic()
        result = await self._read()
        done = time.monotonic()
        if self._worth_keeping(result):
            self._kept = (result, done + min((done - started) * self._spacing, self._longest))
        return result
