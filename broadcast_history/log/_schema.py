"""Tables of the event log (SQLAlchemy Core metadata; Alembic migrations mirror it)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    VARBINARY,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Dialect,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    TypeDecorator,
    literal_column,
)
from sqlalchemy.dialects.mysql import LONGBLOB

#: Alembic's version table for this library, apart from the host application's.
VERSION_TABLE = "broadcast_history_version"

_MYSQL = ("mysql", "mariadb")


class _Utf8Bytes(TypeDecorator[str]):
    """Text kept as its UTF-8 bytes (MySQL's VARBINARY), compared byte for byte.

    MySQL's text collations fold case or pad with spaces (``'a' = 'a '`` holds even
    under ``utf8mb4_bin``), which would merge distinct channel names and keys.
    """

    impl = VARBINARY
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return value.encode() if isinstance(value, str) else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return value.decode() if isinstance(value, (bytes, bytearray)) else value


def _name() -> String:
    """VARCHAR(255); on MySQL the 1020 bytes that 255 characters of UTF-8 can take."""
    return String(255).with_variant(_Utf8Bytes(1020), *_MYSQL)


#: Payloads up to the largest message size (MySQL's BLOB stops at 64 KiB).
_PAYLOAD = LargeBinary().with_variant(LONGBLOB(), *_MYSQL)

metadata = MetaData()

#: One row per channel: the counter offsets are allocated from, and the epoch.
channels = Table(
    "broadcast_channels",
    metadata,
    Column("name", _name(), primary_key=True),
    # Random per incarnation: a channel deleted and used again gets a new one.
    Column("epoch", BigInteger, nullable=False),
    Column("last_offset", BigInteger, nullable=False),
    # Microseconds since the Unix epoch; timestamps are max(now, last) per channel.
    Column("last_timestamp", BigInteger, nullable=False),
    # First offset still stored; last_offset + 1 once everything was trimmed.
    Column("first_offset", BigInteger, nullable=False),
    # Timestamp of the newest trimmed event, so `since=<time>` knows what is gone.
    Column("trimmed_timestamp", BigInteger, nullable=True),
)

#: One row per event. Replay reads by (channel, offset), never by a global id.
events = Table(
    "broadcast_events",
    metadata,
    Column("channel", _name(), nullable=False),
    Column("offset", BigInteger, nullable=False),
    # The channel's epoch when stored: a replayed page proves it was not reset.
    Column("epoch", BigInteger, nullable=False),
    Column("timestamp", BigInteger, nullable=False),
    # The payload is bytes; is_text says it was a str (stored as UTF-8).
    Column("is_text", Boolean, nullable=False),
    Column("payload", _PAYLOAD, nullable=False),
    # The idempotency key of the publish, unique per channel.
    Column("key", _name(), nullable=True),
    PrimaryKeyConstraint("channel", "offset", name="pk_broadcast_events"),
)

#: Offsets between two entries of the time index (see TIME_INDEX).
TIME_MARK_EVERY = 64


def time_marked(offset: ColumnElement[int]) -> ColumnElement[bool]:
    """Whether an event is in the time index. Literal numbers, not parameters: a
    query uses a partial index only if it repeats the index's condition as is."""
    return offset.op("%")(literal_column(str(TIME_MARK_EVERY))) == literal_column("0")


#: "First event at or after a time": timestamps grow with offsets within a channel, so
#: indexing every 64th event is enough to land within 64 rows of it, and a commit over
#: many channels no longer dirties an index page per channel (only a channel that
#: passes a multiple of 64 does). MySQL has no partial indexes and indexes them all.
TIME_INDEX = Index(
    "ix_broadcast_events_time",
    events.c.channel,
    events.c.timestamp,
    events.c.offset,
    sqlite_where=time_marked(events.c.offset),
    postgresql_where=time_marked(events.c.offset),
)

#: Idempotency keys, unique per channel. Partial where the database allows it: most
#: events have no key, and an entry per event would add a dirty index page per channel
#: to every commit (a third of a SQLite commit's cost over 100 channels). MySQL has no
#: partial indexes and keeps every row in it.
KEY_INDEX = Index(
    "ux_broadcast_events_key",
    events.c.channel,
    events.c.key,
    unique=True,
    sqlite_where=events.c.key.is_not(None),
    postgresql_where=events.c.key.is_not(None),
)

#: One row: the log's identity, random, made with the schema. Envelopes carry it.
log_identity = Table(
    "broadcast_log",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", BigInteger, nullable=False),
)

#: Position of each durable consumer of a channel, and the lease of its holder.
consumers = Table(
    "broadcast_consumers",
    metadata,
    Column("channel", _name(), nullable=False),
    Column("name", _name(), nullable=False),
    # The position and the channel's epoch it belongs to (a reset channel invalidates
    # it), and when it was stored: all NULL until the first commit, since a holder's
    # lease needs the row before there is a position to keep.
    Column("epoch", BigInteger, nullable=True),
    Column("position", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=True),
    # Who holds the consumer and until when (microseconds, the log's clock).
    Column("holder", String(64), nullable=True),
    Column("lease_expires", BigInteger, nullable=True),
    PrimaryKeyConstraint("channel", "name", name="pk_broadcast_consumers"),
)
