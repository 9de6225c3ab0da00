"""Argument checks shared by publish, subscribe, the log and the admin API.

Everything a batch could fail on is checked here, before a publish is queued: one
caller's bad input must never fail the other publishes committed with it.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from ._errors import (
    HistoryTruncated,
    InvalidArgument,
    InvalidMessage,
    MessageTooLarge,
    OffsetOutOfRange,
)

MAX_CHANNEL_LENGTH = 255
MAX_KEY_LENGTH = 255
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
#: Offsets, epochs and cursors are 64-bit signed integers in every database.
MAX_INT = 2**63 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogates), i.e. encodable as UTF-8."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_channel(channel: Any) -> str:
    """Return ``channel`` if it is a valid channel name, else raise."""
    return _check_name("channel", channel)


def check_consumer(name: Any) -> str:
    """Return ``name`` if it is a valid durable consumer name (the rules of channels)."""
    return _check_name("consumer", name)


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_CHANNEL_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_CHANNEL_LENGTH} characters")
    if _CONTROL.search(value):
        raise InvalidArgument(f"{what} contains a control character: {value!r}")
    if not _encodable(value):
        raise InvalidArgument(f"{what} is not valid Unicode (a lone surrogate?): {value!r}")
    return value


def check_seconds(name: str, value: Any) -> float:
    """Return ``value`` if it is a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise InvalidArgument(f"{name} must be a positive number of seconds, got {value}")
    return float(value)


#: Lease durations of durable consumers, in seconds: a shorter one cannot be renewed
#: in time (every third of it, one database round trip), a longer one overflows what
#: the databases compute with (and would keep a dead holder's consumer for weeks).
LEASE_RANGE = (0.1, 7 * 86_400.0)


def check_lease(value: Any) -> float:
    """Return ``value`` if it is a lease duration within :data:`LEASE_RANGE`."""
    seconds = check_seconds("lease", value)
    low, high = LEASE_RANGE
    if not low <= seconds <= high:
        raise InvalidArgument(f"lease must be from {low} s to {high:.0f} s (a week), got {value}")
    return seconds


#: Longest idle time of delete_idle_consumers: about a century (its microseconds
#: must fit the databases' BIGINT arithmetic with the clock's).
MAX_IDLE = timedelta(days=36_600)


def check_idle(value: Any) -> int:
    """``value``, a timedelta from a microsecond to :data:`MAX_IDLE`, in microseconds."""
    if not isinstance(value, timedelta) or not timedelta(microseconds=1) <= value <= MAX_IDLE:
        raise InvalidArgument(
            f"idle_for must be a timedelta from a microsecond to {MAX_IDLE.days} days, "
            f"got {value!r}"
        )
    return value // timedelta(microseconds=1)


def check_message(message: Any, max_size: int) -> str | bytes:
    """Return ``message`` as ``str`` or ``bytes`` if it fits ``max_size`` bytes."""
    if isinstance(message, str):
        if message.isascii():
            size = len(message)
        else:
            try:
                size = len(message.encode())
            except UnicodeEncodeError as exc:
                raise InvalidMessage(
                    f"message is not valid Unicode text ({exc.reason} at index {exc.start}); "
                    "publish bytes for binary data"
                ) from None
        if size > max_size:
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
    if _CONTROL.search(key) or not _encodable(key):
        raise InvalidArgument(f"key must be valid Unicode without control characters: {key!r}")
    return key


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` if it is an int in ``minimum`` .. 2**63 - 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= MAX_INT:
        raise InvalidArgument(f"{name} must be between {minimum} and {MAX_INT}, got {value}")
    return value


def check_optional_int(name: str, value: Any, *, minimum: int = 0) -> int | None:
    """:func:`check_int`, letting ``None`` through."""
    return None if value is None else check_int(name, value, minimum=minimum)


def check_time(name: str, value: Any) -> datetime:
    """Return ``value`` if it is an aware datetime (naive ones are ambiguous: refused)."""
    if not isinstance(value, datetime):
        raise InvalidArgument(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{name}: naive datetimes are refused; give a timezone (e.g. UTC)")
    return value


def check_position(since: Any, history: Any, epoch: Any) -> None:
    """Check the start-position arguments of ``subscribe`` (types and combinations).

    A negative ``since`` passes: it is an :class:`OffsetOutOfRange`, raised on entry.
    """
    if since is not None and history is not None:
        raise InvalidArgument("give since or history, not both")
    if isinstance(since, datetime):
        check_time("since", since)
    elif since is not None:
        check_int("since", since, minimum=-MAX_INT)
    if history is not None:
        check_int("history", history)
    if epoch is not None:
        check_int("epoch", epoch)


def check_served(channel: str, position: int, first: int, last: int, what: str = "since") -> None:
    """Raise unless the events after ``position`` can be served from a channel that
    stores ``first`` .. ``last``.

    Raises:
        OffsetOutOfRange: ``position`` is negative or beyond ``last``.
        HistoryTruncated: Events after ``position`` were removed.
    """
    if position < 0:
        raise OffsetOutOfRange(f"{what} must be >= 0, got {position}")
    if position > last:
        raise OffsetOutOfRange(f"{what}={position} is beyond the head of {channel!r} ({last})")
    if position + 1 < first:
        raise HistoryTruncated(
            f"events {position + 1}..{first - 1} of {channel!r} were trimmed; "
            f"the oldest stored offset is {first}"
        )
