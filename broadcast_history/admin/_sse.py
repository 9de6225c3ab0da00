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
from dataclasses import dataclass
from datetime import datetime

from .._broadcast import Broadcast
from .._errors import InvalidArgument, PositionError, Unsubscribed
from .._event import Event
from ._jsonl import event_json

_MAX_INT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream starts: the arguments of ``Broadcast.subscribe``."""

    since: int | datetime | None = None
    history: int | None = None
    epoch: int | None = None


def _offset(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > _MAX_INT:
        raise InvalidArgument(f"{what} must be an offset (a non-negative integer)")
    return int(text)


def parse_position(since: str | None, history: int | None, last_event_id: str | None) -> Position:
    """The start position from ``?since=``/``?history=`` and ``Last-Event-ID``.

    ``Last-Event-ID`` wins: it is what a reconnecting client sends, and it knows
    better than the query string of the first connection.
    """
    if last_event_id:
        epoch_text, sep, offset_text = last_event_id.strip().rpartition(":")
        offset = _offset(offset_text, "Last-Event-ID")
        return Position(
            since=offset, epoch=_offset(epoch_text, "Last-Event-ID epoch") if sep else None
        )
    if since is not None and history is not None:
        raise InvalidArgument("give since or history, not both")
    if since is None:
        return Position(history=history)
    if since.isascii() and since.isdigit():
        return Position(since=_offset(since, "since"))
    try:
        moment = datetime.fromisoformat(since)
    except ValueError as exc:
        raise InvalidArgument("since must be an offset or an ISO 8601 time") from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidArgument("since: naive times are refused; give a timezone (e.g. Z)")
    return Position(since=moment)


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
