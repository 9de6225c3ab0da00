"""Chat rooms on channels: names, the stored form of a message, what the page renders."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from .._event import Event

#: Channel names of chat rooms start with this, so rooms can be listed by prefix.
ROOM_PREFIX = "chat."
_ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", re.ASCII)


def room_channel(room: str) -> str | None:
    """The channel of ``room``, or ``None`` if the name is not a valid room name."""
    return ROOM_PREFIX + room if _ROOM.fullmatch(room) else None


def is_room_channel(channel: str) -> bool:
    """Whether ``channel`` is the channel of a valid room name."""
    return channel.startswith(ROOM_PREFIX) and room_channel(channel[len(ROOM_PREFIX) :]) is not None


def encode_message(author: str, text: str) -> str:
    """The stored form of a chat message: a small JSON object (the page parses it).

    It carries the time it was sent: Server-Sent Events give the page only the
    event's id and data, and the page shows when each message was written.
    """
    sent = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return json.dumps({"author": author, "text": text, "sent": sent}, ensure_ascii=False)


def message_item(event: Event) -> dict[str, Any]:
    """A stored event as the JSON object the history API returns."""
    author, text = "?", event.message
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        body = None
    # Messages published by other tools (the admin CLI, a script) are shown raw.
    if isinstance(body, dict) and isinstance(body.get("text"), str):
        author, text = str(body.get("author") or "?"), body["text"]
    return {
        "id": f"{event.epoch}:{event.offset}",
        "epoch": event.epoch,
        "offset": event.offset,
        "timestamp": event.timestamp.isoformat() if event.timestamp else None,
        "author": author,
        "text": text,
    }
