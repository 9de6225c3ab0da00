"""Conversions between stored rows and values, shared by every store and query."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Dialect, literal_column, select
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from .._event import _UNIX_EPOCH, _UTC, SLOTS, Event, from_micros, to_micros
from ._info import ChannelInfo
from ._schema import channels, events

#: Columns read to rebuild an Event (the channel is known from the query).
EVENT_COLUMNS = (
    events.c.offset,
    events.c.epoch,
    events.c.timestamp,
    events.c.is_text,
    events.c.payload,
    events.c.key,
)

# Timestamp of the oldest stored event: one primary-key seek per channel.
#: The timestamp of a channel row's first stored event (a subquery of its row).
FIRST_TIMESTAMP = (
    select(events.c.timestamp)
    .where(events.c.channel == channels.c.name, events.c.offset == channels.c.first_offset)
    .correlate(channels)
    .scalar_subquery()
)

#: Columns read to build a ChannelInfo (see :func:`channel_info`).
CHANNEL_COLUMNS = (
    channels.c.name,
    channels.c.epoch,
    channels.c.last_offset,
    channels.c.first_offset,
    channels.c.last_timestamp,
    channels.c.trimmed_timestamp,
    FIRST_TIMESTAMP.label("first_timestamp"),
)

# Epochs are random so that a channel deleted and created again (possibly by another
# host) never reuses one; 2**53 keeps them exact in JSON and JavaScript.
EPOCH_LIMIT = 2**53


#: MySQL's clock in microseconds since the Unix epoch, whatever the session's time zone:
#: UTC has no hour that repeats (``UNIX_TIMESTAMP(NOW(6))`` does under summer time),
#: and UTC_TIMESTAMP is fixed for the duration of a statement. Event timestamps and
#: consumer leases both use it.
MYSQL_NOW_US = literal_column(
    "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))", BigInteger
)


def new_epoch() -> int:
    """A fresh random epoch in 1 .. 2**53 - 1."""
    return secrets.randbelow(EPOCH_LIMIT - 1) + 1


def now_micros() -> int:
    """Wall-clock time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def _time(micros: int | None) -> Any:
    return None if micros is None else from_micros(micros)


def keyed_events(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, str], Event]:
    """Events of rows selected as ``(channel, *EVENT_COLUMNS)``, by (channel, key): what
    an append finds of the idempotency keys it was given."""
    found: dict[tuple[str, str], Event] = {}
    for channel, *columns in rows:
        (event,) = rows_to_events(channel, [columns])
        found[(channel, columns[5])] = event
    return found


def channel_info(row: Sequence[Any]) -> ChannelInfo:
    """The ChannelInfo of a row selected with :data:`CHANNEL_COLUMNS`."""
    name, epoch, last, first, last_ts, trimmed_ts, first_ts = row
    return ChannelInfo(
        name=name,
        epoch=epoch,
        last_offset=last,
        first_offset=first,
        last_timestamp=from_micros(last_ts) if last else None,
        trimmed_timestamp=_time(trimmed_ts),
        first_timestamp=_time(first_ts),
    )


def channel_row(info: ChannelInfo) -> dict[str, Any]:
    """The channel row that stores ``info`` (as an import restores it)."""
    return {
        "name": info.name,
        "epoch": info.epoch,
        "last_offset": info.last_offset,
        "first_offset": info.first_offset,
        "last_timestamp": 0 if info.last_timestamp is None else to_micros(info.last_timestamp),
        "trimmed_timestamp": (
            None if info.trimmed_timestamp is None else to_micros(info.trimmed_timestamp)
        ),
    }


#: SQLite's insert of an events row, for the driver's cursor: values as
#: :func:`event_tuple` gives them, with no SQLAlchemy parameter handling per row.
SQLITE_INSERT_EVENTS = str(events.insert().compile(dialect=sqlite_dialect(paramstyle="qmark")))


def event_tuple(
    channel: str, offset: int, epoch: int, micros: int, message: str | bytes, key: str | None
) -> tuple[Any, ...]:
    """The events row of one event, as :data:`SQLITE_INSERT_EVENTS` takes it."""
    if isinstance(message, str):
        return (channel, offset, epoch, micros, True, message.encode(), key)
    return (channel, offset, epoch, micros, False, message, key)


def event_row(
    channel: str, offset: int, epoch: int, micros: int, message: str | bytes, key: str | None
) -> dict[str, Any]:
    """The events row that stores one event."""
    is_text = isinstance(message, str)
    return {
        "channel": channel,
        "offset": offset,
        "epoch": epoch,
        "timestamp": micros,
        "is_text": is_text,
        "payload": message.encode() if isinstance(message, str) else message,
        "key": key,
    }


def rows_to_events(channel: str, rows: Iterable[Sequence[Any]]) -> list[Event]:
    """Rebuild the Events of rows selected with :data:`EVENT_COLUMNS` (replay's hot loop).

    A group commit gives all its events one timestamp, so a run of equal timestamps
    shares one datetime instead of converting each. Within one second, a datetime is
    built from the second's fields and the microseconds: the constructor with all
    its fields given costs half of a conversion from a timestamp.
    """
    result: list[Event] = []
    append = result.append
    last_micros: int | None = None  # (any int could be a row's)
    stamp = _UNIX_EPOCH
    # The fields of the second that starts at `second` (microseconds): at first, the
    # epoch's own.
    second = 0
    year, month, day, hour, minute, sec = 1970, 1, 1, 0, 0, 0
    # stored_event() written out with local names: about a tenth less time per event.
    new, set_channel, set_message, set_offset, set_timestamp, set_epoch, set_key = SLOTS
    for offset, epoch, micros, is_text, payload, key in rows:
        if micros != last_micros:
            us = micros - second
            if 0 <= us < 1_000_000:
                stamp = datetime(year, month, day, hour, minute, sec, us, _UTC)
            else:
                stamp = from_micros(micros)
                second = micros - stamp.microsecond
                year, month, day = stamp.year, stamp.month, stamp.day
                hour, minute, sec = stamp.hour, stamp.minute, stamp.second
            last_micros = micros
        event = new(Event)
        set_channel(event, channel)
        set_message(event, payload.decode() if is_text else bytes(payload))
        set_offset(event, offset)
        set_timestamp(event, stamp)
        set_epoch(event, epoch)
        set_key(event, key)
        append(event)
    return result


def compiled(query: ClauseElement, dialect: Dialect) -> tuple[str, tuple[Any, ...]]:
    """``query`` as driver SQL and its positional parameters, for the read paths that
    run on the driver itself (no SQLAlchemy row objects per event)."""
    # render_postcompile: an IN list becomes one parameter per value.
    compiled_query = query.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    assert isinstance(compiled_query, SQLCompiler)  # a SELECT compiles to SQL
    values = compiled_query.construct_params()
    order = compiled_query.positiontup or []
    return str(compiled_query), tuple(values[name] for name in order)


_PREPARED: dict[tuple[str, str], tuple[str, tuple[str, ...], dict[str, Any]]] = {}


def prepared(
    name: str, build: Callable[[], ClauseElement], dialect: Dialect, values: dict[str, Any]
) -> tuple[str, tuple[Any, ...]]:
    """Like :func:`compiled`, for a query of bound parameters compiled once per dialect
    (``name`` tells the queries apart): the replay hot path compiles nothing."""
    key = (name, dialect.name)
    known = _PREPARED.get(key)
    if known is None:
        compiled_query = build().compile(dialect=dialect)
        assert isinstance(compiled_query, SQLCompiler)  # a SELECT compiles to SQL
        # Constants the dialect itself bound (SQLite's OFFSET of a LIMIT, say).
        constants = dict(compiled_query.construct_params())
        order = tuple(compiled_query.positiontup or ())
        known = _PREPARED[key] = (str(compiled_query), order, constants)
    sql, order, constants = known
    return sql, tuple(values[p] if p in values else constants[p] for p in order)
