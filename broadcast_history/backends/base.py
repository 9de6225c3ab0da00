"""The live-transport contract, compatible with encode/broadcaster 0.3."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .._event import Event
from ._inbox import Inbox

logger = logging.getLogger("broadcast_history")


class BroadcastBackend:
    """A live transport: moves messages between processes now, stores nothing.

    Subclass it to plug in a transport of your own, exactly as with
    encode/broadcaster: implement ``connect``, ``disconnect``, ``subscribe``,
    ``unsubscribe``, ``publish`` and ``next_published``. The broadcast sends each
    message as a text envelope and orders, de-duplicates and gap-fills on the
    receiving side, so a transport may drop, repeat or reorder messages.

    Optional hooks (defaults shown here) let a transport do better:
    ``publish_many`` for batched sends, ``max_message_size`` for transports with a
    payload limit, ``connected`` to report its health, ``crosses_processes``
    so that a broadcast refuses to run it without a shared log, and ``private`` for
    a transport nobody but its own broadcast reads.
    """

    #: Largest message, in UTF-8 bytes, the transport can carry (``None``: no limit).
    max_message_size: int | None = None
    #: Whether the transport reaches other processes. A broadcast on such a
    #: transport needs a log every process shares (``log=`` is then required).
    crosses_processes: bool = False
    #: Whether the transport stays inside this process, so the broadcast may hand it
    #: event objects instead of text envelopes (the memory transport does). Its
    #: messages are then ``Objects`` tuples (log id, sender, events), to be passed on
    #: as they are.
    carries_objects: bool = False
    #: Whether only the broadcast that publishes on the transport reads from it (the
    #: memory transport: a queue per instance, for the one broadcast that owns it). The
    #: broadcast then sends nothing on it: its own subscribers get every event at
    #: commit, and nobody else could receive it.
    private: bool = False
    #: How many times the transport re-established a lost connection (for metrics).
    reconnects: int = 0
    #: Whether ``subscribe`` and ``unsubscribe`` of different channels may run at once
    #: (one channel's calls still come one at a time, in order). Off, a broadcast's
    #: calls come one at a time over all channels: with a round trip each, clients
    #: reconnecting at once to channels of their own waited for each other in line.
    concurrent_subscribes: bool = False

    def __init__(self, url: str) -> None:
        self._url = url

    async def connect(self) -> None:
        """Open connections; called once by ``Broadcast.connect``."""
        raise NotImplementedError()

    async def disconnect(self) -> None:
        """Close connections; ``next_published`` may raise afterwards."""
        raise NotImplementedError()

    async def subscribe(self, channel: str) -> None:
        """Start receiving messages of ``channel``."""
        raise NotImplementedError()

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving messages of ``channel``."""
        raise NotImplementedError()

    async def publish(self, channel: str, message: Any) -> None:
        """Send ``message`` to every process subscribed to ``channel``."""
        raise NotImplementedError()

    async def next_published(self) -> Event:
        """Wait for the next message of any subscribed channel."""
        raise NotImplementedError()

    async def publish_many(self, messages: Sequence[tuple[str, str]]) -> None:
        """Send several ``(channel, message)`` pairs; override to pipeline them."""
        for channel, message in messages:
            await self.publish(channel, message)

    @property
    def connected(self) -> bool:
        """Whether the transport is currently connected (for health checks)."""
        return True


class Health:
    """A transport whose connection may be down: ``connected`` reads ``_up``.

    Mixed in before :class:`BroadcastBackend` by transports that reconnect.
    """

    _up = False
    reconnects = 0

    def _back_up(self, what: str) -> None:
        """The connection works (again): log and count it if it had been lost."""
        if not self._up:
            logger.info("%s re-established", what)
            self.reconnects += 1
        self._up = True

    @property
    def connected(self) -> bool:
        """Whether the transport's connection is up now."""
        return self._up

    async def _until_broken(
        self, what: str, run: Callable[[], Awaitable[None]], lost: Callable[[], None]
    ) -> None:
        """Run the reader loop ``run``; if it ends on an error, the connection is down
        for good: call ``lost`` and make every subscriber hear of it (never a hang)."""
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._up = False
            lost()
            inbox: Inbox | None = getattr(self, "_inbox", None)
            if inbox is not None:
                inbox.broke(what, exc)
