"""Conversions between stored rows and events, shared by every append path."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .._event import _UNIX_EPOCH, Event, from_micros
from ._schema import events

#: Columns read to rebuild an Event (the channel is known from the query).
EVENT_COLUMNS = (
    events.c.offset,
    events.c.epoch,
    events.c.timestamp,
    events.c.is_text,
    events.c.payload,
    events.c.key,
)

# Epochs are random so that a channel deleted and created again (possibly by another
# host) never reuses one; 2**53 keeps them exact in JSON and JavaScript.
EPOCH_LIMIT = 2**53


def new_epoch() -> int:
    """A fresh random epoch in 1 .. 2**53 - 1."""
    return secrets.randbelow(EPOCH_LIMIT - 1) + 1


def now_micros() -> int:
    """Wall-clock time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def rows_to_events(channel: str, rows: Iterable[Sequence[Any]]) -> list[Event]:
    """Rebuild the Events of rows selected with :data:`EVENT_COLUMNS` (replay's hot loop).

    A group commit gives all its events one timestamp, so a run of equal timestamps
    shares one datetime instead of converting each.
    """
    result: list[Event] = []
    append = result.append
    last_micros = -1
    stamp = _UNIX_EPOCH
    for offset, epoch, micros, is_text, payload, key in rows:
        if micros != last_micros:
            stamp = from_micros(micros)
            last_micros = micros
        message = payload.decode() if is_text else bytes(payload)
        append(Event(channel, message, offset, stamp, epoch, key))
    return result


def row_to_event(channel: str, row: Sequence[Any]) -> Event:
    """Rebuild the Event of a row selected with :data:`EVENT_COLUMNS`."""
    offset, epoch, micros, is_text, payload, key = row
    message = payload.decode() if is_text else bytes(payload)
    return Event(channel, message, offset, from_micros(micros), epoch, key)
