"""Server-Sent Events for ``GET /channels/{channel}/stream``.

Each event goes out as::

    id: <epoch>:<offset>
    event: message
    data: {"channel": ..., "offset": ..., ...}

so a reconnecting ``EventSource`` sends ``Last-Event-ID: <epoch>:<offset>`` and resumes
right after that event, and learns (``event: error``, ``"error": "StreamReset"``) if
the channel was deleted meanwhile instead of silently reading a new incarnation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import suppress

from .._broadcast import Broadcast
from .._errors import PositionError, Unsubscribed
from .._event import Event
from .._parse import Position
from ._jsonl import event_json


def format_event(event: Event) -> str:
    """One SSE message for ``event``."""
    data = json.dumps(event_json(event), separators=(",", ":"))
    return f"id: {event.epoch}:{event.offset}\nevent: message\ndata: {data}\n\n"


def format_error(error: Exception) -> str:
    """The typed ``event: error`` message that ends a stream."""
    data = json.dumps({"error": type(error).__name__, "detail": str(error)})
    return f"event: error\ndata: {data}\n\n"


async def stream(
    broadcast: Broadcast, channel: str, position: Position, heartbeat: float
) -> AsyncIterator[str]:
    """Catch-up from ``position`` then live, as SSE text, until the client leaves."""
    try:
        async with broadcast.subscribe(
            channel, since=position.since, history=position.history, epoch=position.epoch
        ) as subscriber:
            # Sent at once so the client sees the response start before any event.
            yield ": subscribed\n\n"
            pending: asyncio.Task[Event] | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(subscriber.get())
                    # Waiting on the task (not cancelling get()) keeps the subscriber
                    # intact across heartbeats.
                    done, _ = await asyncio.wait({pending}, timeout=heartbeat)
                    if not done:
                        yield ": keep-alive\n\n"
                        continue
                    event, pending = pending.result(), None
                    yield format_event(event)
            finally:
                if pending is not None:
                    pending.cancel()
                    with suppress(BaseException):
                        await pending
    except PositionError as exc:
        yield format_error(exc)
    except Unsubscribed:
        return
