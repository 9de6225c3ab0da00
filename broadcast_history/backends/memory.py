"""In-process transport: one asyncio queue, for tests and single-process apps."""

from __future__ import annotations

import asyncio
from typing import Any

from .._errors import NotConnected
from .._event import Event
from .base import BroadcastBackend


class MemoryBackend(BroadcastBackend):
    """Delivers within this process only (URL ``memory://``), to the one broadcast
    that owns the instance: it sends nothing here (see ``private``), and the queue
    only carries what is put on it otherwise."""

    carries_objects = True
    private = True

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self._channels: set[str] = set()
        self._queue: asyncio.Queue[Event] | None = None

    async def connect(self) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()

    async def disconnect(self) -> None:
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
