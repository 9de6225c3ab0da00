"""The :class:`Event` value delivered to subscribers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final

_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _InLog:
    """The message of an event that arrived as a notice: read it from the log."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOTICE"


#: Stands for the message of a live event whose payload did not fit the transport.
NOTICE: Final = _InLog()


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    delta = moment - _UNIX_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_UTC = timezone.utc
_from_timestamp = datetime.fromtimestamp
# Below 2**32 seconds (the year 2106) a float holds a time in seconds to within a
# quarter of a microsecond, and fromtimestamp rounds it to the nearest one: exact.
_FLOAT_EXACT_US = 2**32 * 1_000_000


def from_micros(micros: int) -> datetime:
    """Aware UTC datetime from microseconds since the Unix epoch."""
    # Replay runs this for each second its events span (and builds the datetimes
    # within a second from its fields): fromtimestamp makes one object where the
    # sum of a timedelta makes two, in little more than half the time.
    if 0 <= micros < _FLOAT_EXACT_US:
        return _from_timestamp(micros / 1_000_000, _UTC)
    return _UNIX_EPOCH + timedelta(0, 0, micros)


@dataclass(frozen=True, slots=True)
class Event:
    """One published message, as stored in the log.

    ``Event(channel=..., message=...)`` is enough to build one (as in
    encode/broadcaster); the log fills the other fields.

    Attributes:
        channel: The channel it was published on.
        message: The payload, ``str`` or ``bytes`` as it was published.
        offset: Position in the channel: 1, 2, 3, ... without gaps (0 if not stored).
        timestamp: Commit time as an aware UTC datetime (``None`` if not stored).
        epoch: Incarnation of the channel; changes when its history is deleted.
        key: The idempotency key given to ``publish``, if any.
    """

    channel: str
    message: Any
    offset: int = 0
    timestamp: datetime | None = None
    epoch: int = 0
    key: str | None = None


_new = object.__new__
_set_channel, _set_message, _set_offset, _set_timestamp, _set_epoch, _set_key = (
    Event.__dict__[name].__set__
    for name in ("channel", "message", "offset", "timestamp", "epoch", "key")
)
#: What :func:`stored_event` uses, for a loop that builds many events at once.
SLOTS: Final = (
    _new,
    _set_channel,
    _set_message,
    _set_offset,
    _set_timestamp,
    _set_epoch,
    _set_key,
)


def stored_event(
    channel: str,
    message: Any,
    offset: int,
    timestamp: datetime | None,
    epoch: int,
    key: str | None,
) -> Event:
    """``Event(...)`` at half the cost, for the library's hot loops (replay, decode).

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``;
    setting the slots directly builds the same, equally immutable object.
    """
    event: Event = _new(Event)
    _set_channel(event, channel)
    _set_message(event, message)
    _set_offset(event, offset)
    _set_timestamp(event, timestamp)
    _set_epoch(event, epoch)
    _set_key(event, key)
    return event
