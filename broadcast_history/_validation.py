"""Argument checks shared by publish, subscribe and the admin API."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from ._errors import InvalidArgument, InvalidMessage, MessageTooLarge

MAX_CHANNEL_LENGTH = 255
MAX_KEY_LENGTH = 255
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_channel(channel: Any) -> str:
    """Return ``channel`` if it is a valid channel name, else raise."""
    if not isinstance(channel, str):
        raise InvalidArgument(f"channel must be a str, got {type(channel).__name__}")
    if not channel:
        raise InvalidArgument("channel must not be empty")
    if len(channel) > MAX_CHANNEL_LENGTH:
        raise InvalidArgument(f"channel is longer than {MAX_CHANNEL_LENGTH} characters")
    if _CONTROL.search(channel):
        raise InvalidArgument(f"channel contains a control character: {channel!r}")
    return channel


def check_message(message: Any, max_size: int) -> str | bytes:
    """Return ``message`` as ``str`` or ``bytes`` if it fits ``max_size`` bytes."""
    if isinstance(message, str):
        # Four bytes per character at most: skip encoding when it cannot be too large.
        if len(message) * 4 > max_size and len(message.encode()) > max_size:
            raise MessageTooLarge(f"message is larger than {max_size} bytes (UTF-8)")
        return message
    if isinstance(message, (bytearray, memoryview)):
        message = bytes(message)
    if isinstance(message, bytes):
        if len(message) > max_size:
            raise MessageTooLarge(f"message is larger than {max_size} bytes")
        return message
    raise InvalidMessage(f"message must be str or bytes, got {type(message).__name__}")


def check_key(key: Any) -> str | None:
    """Return ``key`` if it is ``None`` or a valid idempotency key."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"key must be a non-empty str of at most {MAX_KEY_LENGTH} chars")
    return key


def check_position(since: Any, history: Any, epoch: Any) -> None:
    """Check the start-position arguments of ``subscribe`` (types and combinations)."""
    if since is not None and history is not None:
        raise InvalidArgument("give since or history, not both")
    if since is not None:
        if isinstance(since, datetime):
            if since.tzinfo is None or since.utcoffset() is None:
                raise InvalidArgument("since: naive datetimes are refused; give a timezone")
        elif isinstance(since, bool) or not isinstance(since, int):
            raise InvalidArgument(f"since must be an int or datetime, got {type(since).__name__}")
    if history is not None and (
        isinstance(history, bool) or not isinstance(history, int) or history < 0
    ):
        raise InvalidArgument("history must be an int >= 0")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise InvalidArgument("epoch must be an int")
