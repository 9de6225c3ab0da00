"""What a chat page reads: catch-up from its last position, then live events.

The same feed backs the Server-Sent Events and the WebSocket endpoints. A position
travels as ``"<epoch>:<offset>"`` (the SSE event id), so a page that comes back after
its room was deleted and recreated is told so instead of skipping messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .._broadcast import Broadcast
from .._errors import PositionError, Unsubscribed
from .._event import Event
from .._subscriber import Subscriber

#: Channel names of chat rooms start with this, so rooms can be listed by prefix.
ROOM_PREFIX = "chat."
_ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", re.ASCII)
_POSITION = re.compile(r"(\d{1,20}):(\d{1,20})", re.ASCII)

Item = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page stopped reading: the epoch of the room and the last offset seen."""

    epoch: int
    offset: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.offset}"


def parse_position(text: str | None) -> Position | None:
    """Parse ``"<epoch>:<offset>"`` (a ``Last-Event-ID``); ``None`` if absent or malformed."""
    if not text:
        return None
    match = _POSITION.fullmatch(text.strip())
    if match is None:
        return None
    return Position(int(match[1]), int(match[2]))


def room_channel(room: str) -> str | None:
    """The channel of ``room``, or ``None`` if the name is not a valid room name."""
    return ROOM_PREFIX + room if _ROOM.fullmatch(room) else None


def encode_message(author: str, text: str) -> str:
    """The stored form of a chat message: a small JSON object."""
    return json.dumps({"author": author, "text": text}, ensure_ascii=False)


def message_item(event: Event, *, replayed: bool = False) -> Item:
    """A stored event as the JSON object the page renders."""
    author, text = "?", event.message
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    # Messages published by other tools (the admin CLI, a script) are shown raw.
    if isinstance(body, dict) and isinstance(body.get("text"), str):
        author, text = str(body.get("author") or "?"), body["text"]
    return {
        "type": "message",
        "id": str(Position(event.epoch, event.offset)),
        "epoch": event.epoch,
        "offset": event.offset,
        "timestamp": event.timestamp.isoformat() if event.timestamp else None,
        "author": author,
        "text": text,
        "replayed": replayed,
    }


_LIVE = object()


async def _pump(subscriber: Subscriber, queue: asyncio.Queue[Any]) -> None:
    """Move events from ``subscriber`` to ``queue``, marking where replay ended."""
    live = False
    try:
        while True:
            if not live and subscriber.live:
                live = True
                await queue.put(_LIVE)
            await queue.put(await subscriber.get())
    except Exception as exc:  # handed to the reader, which decides what it means
        await queue.put(exc)


async def room_feed(
    broadcast: Broadcast,
    channel: str,
    last: Position | None,
    *,
    history: int = 50,
    heartbeat: float = 15.0,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[Item]:
    """Items for one page: ``reset``?, ``ready``, ``message``..., ``live``, ``ping``...

    Args:
        broadcast: A connected broadcast.
        channel: The room's channel.
        last: The page's last position; ``None`` starts with the last ``history`` events.
        history: How many recent messages a fresh (or reset) page starts with.
        heartbeat: Seconds of silence after which a ``ping`` item is produced, so that
            proxies keep the connection and dead clients are noticed.
        stop: Set when the server shuts down: the feed then ends.
    """
    async with contextlib.AsyncExitStack() as stack:
        subscriber: Subscriber | None = None
        reset: str | None = None
        if last is not None:
            try:
                subscriber = await stack.enter_async_context(
                    broadcast.subscribe(channel, since=last.offset, epoch=last.epoch)
                )
            except PositionError as exc:
                # Reset, trimmed, or from another log: the page must start over.
                reset = str(exc)
        if subscriber is None:
            subscriber = await stack.enter_async_context(
                broadcast.subscribe(channel, history=history)
            )
        if reset is not None:
            yield {"type": "reset", "reason": reset}
        ready: Item = {"type": "ready", "position": None}
        if subscriber.epoch is not None:
            ready["id"] = ready["position"] = str(Position(subscriber.epoch, subscriber.position))
        yield ready

        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
        pump = asyncio.create_task(_pump(subscriber, queue), name="chat-demo-pump")
        stopper = asyncio.ensure_future((stop or asyncio.Event()).wait())
        getter: asyncio.Future[Any] | None = None
        try:
            live = False
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    (getter, stopper), timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    # Cancelling a waiting Queue.get leaves any item in the queue.
                    getter.cancel()
                    if stopper in done:
                        return
                    yield {"type": "ping"}
                    continue
                item = getter.result()
                if item is _LIVE:
                    live = True
                    yield {"type": "live"}
                elif isinstance(item, Unsubscribed):
                    return  # the server is shutting down
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield message_item(item, replayed=not live)
        finally:
            for task in (pump, stopper, getter):
                if task is not None:
                    task.cancel()
            await asyncio.gather(pump, stopper, return_exceptions=True)


def sse_frame(item: Item) -> str:
    """One item as a Server-Sent Events frame (``ping`` becomes a comment)."""
    if item["type"] == "ping":
        return ": ping\n\n"
    head = f"id: {item['id']}\n" if "id" in item else ""
    data = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
    return f"{head}event: {item['type']}\ndata: {data}\n\n"
