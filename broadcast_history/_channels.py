"""A broadcast's subscribers by channel, and its subscriptions on the transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from .backends import BroadcastBackend

if TYPE_CHECKING:
    from ._subscriber import Subscriber

logger = logging.getLogger("broadcast_history")


class Channels:
    """The subscribers of one broadcast, by channel.

    A channel is subscribed on the live transport while it has a subscriber here, once
    however many it has; a lock orders the first subscriber's ``subscribe`` and the
    last one's ``unsubscribe`` of a channel: the channel's own when the transport takes
    several channels' calls at once (``concurrent_subscribes``), else one for all.
    """

    def __init__(self, backend: BroadcastBackend) -> None:
        #: Subscribers by channel (only channels that have some).
        self.subscribers: dict[str, set[Subscriber]] = {}
        #: The live transport (replaced when the event loop it ran in ended).
        self.backend = backend
        self._on_transport: set[str] = set()
        self._lock: asyncio.Lock | None = None
        # Per-channel locks, with how many hold or wait for each (see _turn).
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        # Unsubscribes of channels whose subscribe was cut short (see attach), and of
        # channels whose last subscriber left (see detach), in tasks of their own.
        self._undoing: set[asyncio.Task[None]] = set()
        self._leaving: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        """Ready for subscribers (in the running event loop)."""
        self._lock = asyncio.Lock()
        self._locks.clear()
        # A subscribe that finished after close() may have marked its channel.
        self._on_transport.clear()

    def close(self) -> None:
        """End every subscription and forget them (the transport is going away)."""
        for subscribers in self.subscribers.values():
            for subscriber in subscribers:
                subscriber._close()
        self.subscribers.clear()
        self._on_transport.clear()
        for task in self._undoing:  # the transport is going away with its subscriptions
            task.cancel()

    def forget(self) -> None:
        """End every subscription of an event loop that ended, waking none of them
        (that would schedule work on the closed loop)."""
        for subscribers in self.subscribers.values():
            for subscriber in subscribers:
                subscriber._abandon()
        self.subscribers.clear()
        self._on_transport.clear()
        self._undoing.clear()
        self._leaving.clear()
        self._lock = None
        self._locks.clear()

    async def attach(self, subscriber: Subscriber) -> None:
        """Add ``subscriber``, subscribing its channel on the transport if needed."""
        channel = subscriber.channel
        self.subscribers.setdefault(channel, set()).add(subscriber)
        if channel in self._on_transport:
            return
        assert self._lock is not None
        subscribing = False
        try:
            async with self._turn(channel, self._lock):
                if channel not in self._on_transport:
                    subscribing = True
                    await self.backend.subscribe(channel)
                    self._on_transport.add(channel)
        except BaseException:
            # Failed, or cancelled while waiting for the lock or the transport: not
            # left registered (it was fed for ever, and kept its channel subscribed).
            if self._forget(subscriber) and subscribing:
                # The transport may have subscribed it before the cut: undone in a
                # task of its own, as this one is being cancelled.
                self._undo(channel)
            raise

    async def detach(self, subscriber: Subscriber, *, connected: bool) -> None:
        """Close and remove ``subscriber``; the last one of a channel unsubscribes it."""
        subscriber._close()
        channel = subscriber.channel
        if not self._forget(subscriber) or self._lock is None:
            return
        lock = self._lock

        async def unsubscribe() -> None:
            async with self._turn(channel, lock):
                if channel not in self.subscribers and channel in self._on_transport:
                    self._on_transport.discard(channel)
                    if connected:
                        await self.backend.unsubscribe(channel)

        # In a task of its own: the lock may be held by another subscribe for a
        # round trip, and a caller cancelled again while it waits (anyio's
        # cancel scopes deliver one at each await) left the channel subscribed on
        # the transport for good, its messages read and dropped.
        # Not cancelled by close(): it finds the channel off the transport then.
        await asyncio.shield(self._in_background(unsubscribe(), self._leaving))

    def _undo(self, channel: str) -> None:
        async def unsubscribe() -> None:
            assert self._lock is not None
            async with self._turn(channel, self._lock):
                if channel not in self.subscribers and channel not in self._on_transport:
                    try:
                        await self.backend.unsubscribe(channel)
                    except Exception:  # a clean-up: the transport may be down
                        logger.debug("unsubscribe of %r failed", channel, exc_info=True)

        self._in_background(unsubscribe(), self._undoing)

    @asynccontextmanager
    async def _turn(self, channel: str, lock: asyncio.Lock) -> AsyncIterator[None]:
        """Hold ``channel``'s turn at the transport: ``lock`` (every channel's), or
        the channel's own lock if the transport takes several channels at once."""
        # getattr: broadcaster's backends, which lack it, pass too.
        if not getattr(self.backend, "concurrent_subscribes", False):
            async with lock:
                yield
            return
        entry = self._locks.get(channel)
        if entry is None:
            entry = self._locks[channel] = (asyncio.Lock(), [0])
        own, users = entry
        users[0] += 1
        try:
            async with own:
                yield
        finally:
            users[0] -= 1
            if not users[0] and self._locks.get(channel) is entry:
                del self._locks[channel]  # nobody holds or waits for it: kept no longer

    @staticmethod
    def _in_background(
        unsubscribe: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]
    ) -> asyncio.Task[None]:
        task = asyncio.ensure_future(unsubscribe)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        # Its error is the caller's, when one still waits for it; retrieved anyway,
        # and logged for the caller that was cancelled meanwhile.
        task.add_done_callback(_retrieved)
        return task

    def modes(self) -> dict[str, int]:
        """How many subscriptions are open, by mode: ``"live"`` or ``"replay"``."""
        modes = {"replay": 0, "live": 0}
        for group in self.subscribers.values():
            for subscriber in group:
                modes["live" if subscriber.live else "replay"] += 1
        return modes

    def _forget(self, subscriber: Subscriber) -> bool:
        """Remove ``subscriber``; whether its channel has no subscribers left."""
        subscribers = self.subscribers.get(subscriber.channel)
        if subscribers is None:
            return False
        subscribers.discard(subscriber)
        if subscribers:
            return False
        del self.subscribers[subscriber.channel]
        return True


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("unsubscribe in the background failed", exc_info=task.exception())
