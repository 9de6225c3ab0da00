"""In-process transport: one asyncio queue, for tests and single-process apps."""

from __future__ import annotations

import asyncio
from typing import Any

from .._errors import NotConnected
from .._event import Event
from .base import BroadcastBackend


class MemoryBackend(BroadcastBackend):
    """Delivers within this process only (URL ``memory://``).

    An instance belongs to the broadcast that connects it: only that broadcast reads
    its queue, so the broadcast sends nothing on it (``private``) and its subscribers
    get each event at commit. A subclass (which may carry messages elsewhere) is not
    private unless it says so (``private = True`` in its body), and neither is an
    instance a second broadcast connects.
    """

    carries_objects = True
    private = True
    concurrent_subscribes = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "private" not in cls.__dict__:
            cls.private = False  # it may send elsewhere: private only if it says so

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self._channels: set[str] = set()
        self._queue: asyncio.Queue[Event] | None = None
        self._owners = 0  # broadcasts that connected it and have not disconnected

    async def connect(self) -> None:
        self._owners += 1
        if self._owners > 1:
            # Connected by a second broadcast: both send, and read the one queue.
            self.private = False
        if self._queue is None:
            self._queue = asyncio.Queue()

    async def disconnect(self) -> None:
        self._owners = max(0, self._owners - 1)
        self._queue = None
        self._channels.clear()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, message: Any) -> None:
        if self._queue is not None and channel in self._channels:
            self._queue.put_nowait(Event(channel, message))

    async def next_published(self) -> Event:
        if self._queue is None:
            raise NotConnected("the memory transport is not connected")
        return await self._queue.get()
