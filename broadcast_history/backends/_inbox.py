"""The queue between a transport's reader task and ``next_published``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .._errors import NotConnected, TransportError
from .._event import Event


class Inbox:
    """Events a transport received, in order, and then perhaps the failure that ended it.

    A failure is sticky: once raised by ``get`` it is put back, so every later call
    raises it too. The reader task that hit it is gone and nothing else will ever be
    queued, so a second caller (or a retry) must fail at once instead of waiting
    forever. Events received before the failure are still returned first.

    Make it in ``connect()``: the queue belongs to the running event loop.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Queue an event received from the transport."""
        self._queue.put_nowait(event)

    def fail(self, exc: BaseException) -> None:
        """Make ``get`` raise ``exc`` once the events queued before it are taken.

        Disconnecting fails the inbox with ``NotConnected`` too: that wakes a pending
        ``get`` at once.
        """
        self._queue.put_nowait(exc)

    def broke(self, what: str, exc: BaseException) -> None:
        """The reader task ended on ``exc``: fail with a :class:`TransportError` saying
        ``what`` failed (``exc`` as its cause). A ``TransportError`` passes as it is."""
        if not isinstance(exc, TransportError):
            # Its type and text: some clients' repr leaves the text out (redis-py 8's
            # NoPermissionError said nothing of NOPERM).
            text = str(exc)
            error = TransportError(
                f"{what} failed: {type(exc).__name__}: {text}"
                if text
                else f"{what} failed: {exc!r}"
            )
            error.__cause__ = exc
            exc = error
        self.fail(exc)

    async def get(self) -> Event:
        """The next event; raises the failure, if one was queued, from then on."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later call fails the same way
            raise item
        return item


class InboxTransport:
    """What a networked transport repeats: ``publish`` sends a batch of one, and
    ``next_published`` reads the :class:`Inbox` its reader task fills.

    Mixed in before ``BroadcastBackend``; the transport names itself in ``_name``
    (for errors) and implements ``publish_many``.
    """

    _name = "live"
    _inbox: Inbox | None

    async def publish(self, channel: str, message: Any) -> None:
        """Send one message (as a batch of one)."""
        await self.publish_many([(channel, message)])

    async def publish_many(self, messages: Sequence[tuple[str, Any]]) -> None:
        raise NotImplementedError

    async def next_published(self) -> Event:
        """The next message received, or the failure that ended the reader."""
        if self._inbox is None:
            raise NotConnected(f"the {self._name} transport is not connected")
        return await self._inbox.get()

    def _wake_readers(self) -> None:
        """On disconnect: a ``next_published`` waiting now raises ``NotConnected``."""
        if self._inbox is not None:
            self._inbox.fail(NotConnected(f"the {self._name} transport was disconnected"))
