"""The log's queries that every database runs alike (SQLAlchemy Core).

What differs per database (appending, byte-bounded reads) lives in the stores; this
module holds the rest, each function running inside a connection the store opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import weakref
from collections.abc import AsyncIterable, Awaitable, Sequence
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    ScalarSelect,
    Select,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import ImportConflict
from .._event import Event, from_micros, to_micros
from ._info import ChannelInfo, LogTotals
from ._rows import (
    CHANNEL_COLUMNS,
    EVENT_COLUMNS,
    FIRST_TIMESTAMP,
    MYSQL_NOW_US,
    SQLITE_INSERT_EVENTS,
    channel_info,
    channel_row,
    event_row,
    event_tuple,
    now_micros,
)
from ._schema import channels, events, log_identity, time_marked
from ._shapes import padded

_CHUNK = 500
#: A channel row that still stores events (it keeps its row once all are trimmed).
_STORED = channels.c.first_offset <= channels.c.last_offset


async def log_id(conn: AsyncConnection) -> str | None:
    """The log's identity (written with its schema)."""
    found = await conn.execute(select(log_identity.c.id).limit(1))
    value = found.scalar()
    return None if value is None else str(value)


async def clock(conn: AsyncConnection) -> int:
    """The clock events are stamped with, in microseconds since the Unix epoch: the
    database server's on Postgres and MySQL (one clock for every host), this host's
    on SQLite."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        seconds = func.extract("epoch", func.clock_timestamp())
        query = select(cast(func.round(seconds * 1_000_000), BigInteger))
    elif dialect in ("mysql", "mariadb"):
        query = select(MYSQL_NOW_US)
    else:
        return now_micros()
    return int((await conn.execute(query)).scalar_one())


async def channel(conn: AsyncConnection, name: str) -> ChannelInfo | None:
    result = await conn.execute(select(*CHANNEL_COLUMNS).where(channels.c.name == name))
    row = result.first()
    return None if row is None else channel_info(row)


async def channels_named(conn: AsyncConnection, names: list[str]) -> list[ChannelInfo]:
    result = await conn.execute(select(*CHANNEL_COLUMNS).where(channels.c.name.in_(padded(names))))
    return [channel_info(row) for row in result]


async def channel_page(
    conn: AsyncConnection, prefix: str | None, after: str | None, limit: int
) -> list[ChannelInfo]:
    query = select(*CHANNEL_COLUMNS).order_by(channels.c.name).limit(limit)
    if prefix:
        query = query.where(channels.c.name.startswith(prefix, autoescape=True))
        if conn.dialect.name == "sqlite":
            # SQLite's LIKE ignores ASCII case: 'tenantA/' would match 'TENANTA/secret'.
            query = query.where(func.substr(channels.c.name, 1, len(prefix)) == prefix)
        if await _ordered_by_code_point(conn):
            # Neither LIKE above reads a range of the primary key here (SQLite's folds
            # case, Postgres' C.UTF-8 is not C): a rare prefix scanned every channel
            # row, 50-270 ms with a million, for each poll of an open console.
            query = query.where(channels.c.name >= prefix)
            upper = _after_prefix(prefix)
            if upper is not None:
                query = query.where(channels.c.name < upper)
    if after is not None:
        query = query.where(channels.c.name > after)
    result = await conn.execute(query)
    return [channel_info(row) for row in result]


def _after_prefix(prefix: str) -> str | None:
    """The first text after every text starting with ``prefix``, in code point order
    (``None`` if there is none)."""
    kept = prefix.rstrip(chr(sys.maxunicode))
    if not kept:
        return None
    following = ord(kept[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates: no text holds them
        following = 0xE000
    return kept[:-1] + chr(following)


#: Postgres' collations that order text by code point, as SQLite's BINARY and MySQL's
#: bytes do (names are VARBINARY there).
_CODE_POINT_COLLATIONS = frozenset({"c", "posix", "c.utf8", "c.utf-8"})
_CODE_POINT_ORDER: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()
# The collation of the channel names: the column's own, else the database's (read
# through JSON: their columns differ between versions, datlocprovider is new in 15).
_NAME_COLLATION = text(
    "SELECT c.collname, to_jsonb(c) ->> 'collprovider', to_jsonb(c) ->> 'collcollate', "
    "to_jsonb(d) ->> 'datlocprovider', to_jsonb(d) ->> 'datcollate', "
    "pg_encoding_to_char(d.encoding) "
    "FROM pg_database d, pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation "
    "WHERE d.datname = current_database() AND a.attname = 'name' "
    f"AND a.attrelid = to_regclass('{channels.name}')"
)


async def _ordered_by_code_point(conn: AsyncConnection) -> bool:
    """Whether channel names sort by code point: then a prefix is a range of them."""
    if conn.dialect.name != "postgresql":
        return True
    known = _CODE_POINT_ORDER.get(conn.sync_engine)
    if known is None:
        found = (await conn.execute(_NAME_COLLATION)).first()
        known = found is not None and _by_code_point(*found)
        _CODE_POINT_ORDER[conn.sync_engine] = known
    return known


def _by_code_point(
    name: str,
    provider: str | None,
    collate: str | None,
    database_provider: str | None,
    database_collate: str | None,
    encoding: str,
) -> bool:
    if encoding != "UTF8":  # a bound past the encoding's characters would fail
        return False
    if name == "default":
        provider, collate = database_provider or "c", database_collate
    # 'b' (Postgres 17's builtin) sorts by code point; 'i' (ICU) never does.
    return provider == "b" or (provider == "c" and str(collate).lower() in _CODE_POINT_COLLATIONS)


def events_query(
    channel: str,
    *,
    after: int | None = None,
    before: int | None = None,
    since_us: int | None = None,
    until_us: int | None = None,
    limit: int,
    descending: bool = False,
    time_marks: bool = False,
) -> Select[tuple[int, int, int, bool, bytes, str | None]]:
    """Events of ``channel`` in a range of offsets and/or times, in offset order.

    ``time_marks``: the database has the sparse time index (see
    :func:`sparse_time_index`); times then also bound the offsets, in the same
    statement, so that the scan along the primary key stays short.
    """
    query = select(*EVENT_COLUMNS).where(events.c.channel == channel)
    if after is not None:
        query = query.where(events.c.offset > after)
    if before is not None:
        query = query.where(events.c.offset < before)
    if since_us is not None:
        query = query.where(events.c.timestamp >= since_us)
        if time_marks:
            # Start at most TIME_MARK_EVERY rows before the first match (see offset_at).
            start = func.coalesce(_mark(channel, since_us, before=True), 0)
            query = query.where(events.c.offset > start)
    if until_us is not None:
        query = query.where(events.c.timestamp < until_us)
        if time_marks:
            # And stop at the first indexed event at or after the end, likewise.
            end = func.coalesce(_mark(channel, until_us, before=False), _NO_OFFSET)
            query = query.where(events.c.offset < end)
    order = [events.c.offset]
    if not time_marks and (since_us is not None or until_us is not None):
        # The same order (timestamps never decrease along offsets), which a full time
        # index gives as it is: a scan from the time on, not along the key from an end.
        order.insert(0, events.c.timestamp)
    query = query.order_by(*(column.desc() if descending else column for column in order))
    return query.limit(limit)


def at_offsets_query(
    channel: str, offsets: Sequence[int]
) -> Select[tuple[int, int, int, bool, bytes, str | None]]:
    """The stored events of ``channel`` at ``offsets``, in offset order."""
    return (
        select(*EVENT_COLUMNS)
        .where(events.c.channel == channel, events.c.offset.in_(padded(offsets)))
        .order_by(events.c.offset)
    )


def page_query() -> Select[tuple[int, int, int, bool, bytes, str | None]]:
    """A replay page: ``limit`` events of ``channel`` from offset ``start`` on (bound
    parameters, so it is compiled once)."""
    return events_query(
        bindparam("channel", None),  # type: ignore[arg-type]
        after=bindparam("after", None),  # type: ignore[arg-type]
        limit=bindparam("limit", None),  # type: ignore[arg-type]
    )


#: Above every offset: the end of a range that has none.
_NO_OFFSET = 2**63 - 1


def sparse_time_index(dialect: str) -> bool:
    """Whether the time index holds only every TIME_MARK_EVERY-th event (not MySQL,
    which has no partial indexes and indexes every event)."""
    return dialect not in ("mysql", "mariadb")


def _mark(channel: str, micros: int, *, before: bool) -> ScalarSelect[int]:
    """The newest indexed event before ``micros`` (``before``), or the oldest at or
    after it: one seek in the time index."""
    stamp, offset = events.c.timestamp, events.c.offset
    query = select(offset).where(events.c.channel == channel, time_marked(offset))
    if before:
        query = query.where(stamp < micros).order_by(stamp.desc(), offset.desc())
    else:
        query = query.where(stamp >= micros).order_by(stamp, offset)
    return query.limit(1).scalar_subquery()


def offset_at_query(channel: str, micros: int, *, time_marks: bool) -> Select[int]:
    """The offset of the first event of ``channel`` at or after ``micros``."""
    offset = events.c.offset
    query = select(offset).where(events.c.channel == channel, events.c.timestamp >= micros)
    if time_marks:
        # Timestamps never decrease along offsets, so the answer is among the
        # TIME_MARK_EVERY rows after the newest indexed event before the time. (MySQL
        # would not bound its key scan by the subquery: it seeks its full index.)
        query = query.where(offset > func.coalesce(_mark(channel, micros, before=True), 0))
        return query.order_by(offset).limit(1)
    return query.order_by(events.c.timestamp, offset).limit(1)


async def offset_at(conn: AsyncConnection, channel: str, micros: int) -> int | None:
    """Offset of the first stored event at or after ``micros``, if any."""
    marks = sparse_time_index(conn.dialect.name)
    result = await conn.execute(offset_at_query(channel, micros, time_marks=marks))
    return result.scalar()


async def trim(
    conn: AsyncConnection,
    channel: str,
    before: int | None,
    before_us: int | None,
    limit: int | None = None,
    *,
    keep: int | None = None,
    epoch: int | None = None,
) -> int:
    """Remove events below offset ``before``, older than ``before_us`` and/or all but
    the newest ``keep``; the oldest ``limit`` of them at most. With ``epoch``, only
    from that incarnation of the channel (another one was not seen by the caller)."""
    # The channel row is locked first (Postgres, MySQL; SQLite's write transaction
    # already excludes other writers): two trims cannot both compute from the same
    # first offset, and an append waits rather than race the new bounds.
    result = await conn.execute(
        select(channels.c.first_offset, channels.c.last_offset, channels.c.epoch)
        .where(channels.c.name == channel)
        .with_for_update()
    )
    row = result.first()
    if row is None or (epoch is not None and row.epoch != epoch):
        return 0
    first, last = row.first_offset, row.last_offset
    new_first = first
    if keep is not None:
        # From the locked row: the head may have moved since the caller looked.
        before = last - keep + 1 if before is None else max(before, last - keep + 1)
    if before is not None:
        new_first = max(new_first, min(before, last + 1))
    if before_us is not None:
        first_kept = await offset_at(conn, channel, before_us)
        new_first = max(new_first, last + 1 if first_kept is None else first_kept)
    if limit is not None:
        new_first = min(new_first, first + limit)
    if new_first <= first:
        return 0
    newest_removed = await conn.execute(
        select(events.c.timestamp).where(
            events.c.channel == channel, events.c.offset == new_first - 1
        )
    )
    trimmed_ts = newest_removed.scalar()
    deleted = await conn.execute(
        delete(events).where(events.c.channel == channel, events.c.offset < new_first)
    )
    await conn.execute(
        update(channels)
        .where(channels.c.name == channel)
        .values(first_offset=new_first, trimmed_timestamp=trimmed_ts)
    )
    return int(deleted.rowcount)


async def retention_page(
    conn: AsyncConnection,
    max_events: int | None,
    cutoff_us: int | None,
    after: str | None,
    limit: int,
) -> list[ChannelInfo]:
    """Up to ``limit`` channels after ``after``, in name order, that retention may
    remove something from: holding more than ``max_events`` events, or an event
    older than ``cutoff_us``.

    Only those leave the database: channel rows outlive their events, and a log of
    per-session channels has far more rows than channels with history. Timestamps
    never decrease within a channel, so the first stored event tells the age.
    """
    due = []
    if max_events is not None:
        due.append(channels.c.last_offset - channels.c.first_offset + 1 > max_events)
    if cutoff_us is not None:
        first = FIRST_TIMESTAMP  # (a plain name: ruff's SIM300 takes the constant for one)
        due.append(and_(_STORED, or_(first.is_(None), first < cutoff_us)))
    if not due:
        return []
    query = select(*CHANNEL_COLUMNS).where(or_(*due)).order_by(channels.c.name).limit(limit)
    if after is not None:
        query = query.where(channels.c.name > after)
    return [channel_info(row) for row in await conn.execute(query)]


async def delete_channel(conn: AsyncConnection, channel: str) -> bool:
    # Lock the channel row before deleting its events: an append committed between
    # the two deletes would otherwise leave an event behind with no channel row, and
    # the channel's next epoch would collide with its offset.
    locked = await conn.execute(
        select(channels.c.name).where(channels.c.name == channel).with_for_update()
    )
    if locked.first() is None:
        return False
    await conn.execute(delete(events).where(events.c.channel == channel))
    result = await conn.execute(delete(channels).where(channels.c.name == channel))
    return bool(result.rowcount)


async def totals(conn: AsyncConnection) -> LogTotals:
    stored = func.sum(channels.c.last_offset - channels.c.first_offset + 1)
    # The first event's timestamp is looked up only for channels that store one: a
    # log of per-session channels has mostly rows with nothing left (a million rows:
    # 1.35 s on Postgres when each row looked).
    oldest = case((_STORED, FIRST_TIMESTAMP))
    query = select(
        func.count(),
        func.coalesce(stored, 0),
        func.coalesce(func.sum(channels.c.first_offset - 1), 0),
        func.min(oldest),
        func.max(channels.c.last_timestamp),
    ).select_from(channels)
    count, total, trimmed, oldest_us, newest_us = (await conn.execute(query)).one()
    return LogTotals(
        channels=int(count),
        events=int(total),
        trimmed=int(trimmed),
        oldest_timestamp=None if oldest_us is None else from_micros(oldest_us),
        newest_timestamp=from_micros(newest_us) if count and newest_us else None,
    )


async def refuse_existing(conn: AsyncConnection, names: Sequence[str]) -> None:
    """Raise ImportConflict if one of the channels ``names`` exists."""
    for start in range(0, len(names), _CHUNK):
        found = await conn.execute(
            select(channels.c.name, channels.c.epoch, channels.c.last_offset)
            .where(channels.c.name.in_(padded(names[start : start + _CHUNK])))
            .limit(1)
        )
        row = found.first()
        if row is not None:
            raise ImportConflict(
                f"channel {row[0]!r} already exists in this log (epoch {row[1]}, offsets "
                f"up to {row[2]}); nothing was imported: delete it first or import into "
                "another log"
            )


async def restore(
    conn: AsyncConnection, infos: Sequence[ChannelInfo], pages: AsyncIterable[Sequence[Event]]
) -> int:
    """Insert ``infos`` and the events of ``pages``; refuses channels that exist."""
    # The channel rows first: a publish creating one of them meanwhile then waits on
    # its row (and goes after the import), or the import fails on it (ImportConflict).
    # Events first, each waited on a row the other had written: a deadlock on Postgres.
    await restore_channels(conn, infos)
    return await insert_pages(conn, pages)


async def restore_channels(conn: AsyncConnection, infos: Sequence[ChannelInfo]) -> None:
    """Insert the channel rows ``infos``; refuses channels that exist."""
    await refuse_existing(conn, [info.name for info in infos])
    if infos:
        await to_its_end(conn.execute(channels.insert(), [channel_row(info) for info in infos]))


async def insert_pages(
    conn: AsyncConnection,
    pages: AsyncIterable[Sequence[Event]],
    sqlite_insert: str = SQLITE_INSERT_EVENTS,
) -> int:
    """Insert the events of ``pages`` (on SQLite, with ``sqlite_insert``, which takes
    the rows of :func:`event_tuple`); returns how many."""
    stored = 0
    async for page in pages:
        if page:
            await to_its_end(_insert_events(conn, page, sqlite_insert))
            stored += len(page)
    return stored


async def _insert_events(conn: AsyncConnection, page: Sequence[Event], sqlite_insert: str) -> None:
    if conn.dialect.name == "sqlite":
        # The driver's cursor takes these values as they are, where SQLAlchemy's
        # handling of each row's parameters took 0.9 s of 1.4 for 200,000 events.
        rows = [event_tuple(*_row_values(e)) for e in page]
        await conn.exec_driver_sql(sqlite_insert, rows)
    else:
        await conn.execute(events.insert(), [event_row(*_row_values(e)) for e in page])


def _row_values(e: Event) -> tuple[str, int, int, int, str | bytes, str | None]:
    micros = 0 if e.timestamp is None else to_micros(e.timestamp)
    return e.channel, e.offset, e.epoch, micros, e.message, e.key


_T = TypeVar("_T")


async def to_its_end(statement: Awaitable[_T]) -> _T:
    """Await ``statement``; if the caller is cancelled meanwhile (Ctrl-C during an
    import), let it finish first, then raise the cancellation (the transaction then
    rolls back). asyncpg's executemany, cancelled midway, could leave the process
    waiting for its answer for ever, holding the transaction and its row locks open.
    A statement here is one page of rows, or SQLite's copy of a staged import (about
    2 s a million events): it ends soon."""
    task = asyncio.ensure_future(statement)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            # Cancelled again (a timeout around the import, asyncio.run's clean-up):
            # the transaction must not roll back under the statement still running.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller gets
        raise
