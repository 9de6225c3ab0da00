"""The MySQL/MariaDB store: one short transaction per appended batch, bounded reads.

An append is one InnoDB transaction (READ COMMITTED, see ``_engine``):

1. the events already stored under the batch's idempotency keys, if any keys;
2. ``INSERT ... ON DUPLICATE KEY UPDATE`` of the batch's channel rows, in name order:
   it creates missing channels and bumps the existing counters by the number of
   events each channel gets, holding each row's exclusive lock from then on;
3. the new counters: returned by the upsert on MariaDB (``RETURNING``), read back on
   MySQL 8 (the rows are ours until the commit);
4. the events inserted at the offsets below the new counters; COMMIT.

A concurrent writer of the same channel waits on the row lock at step 2 and then
bumps the committed value, so offsets are gap-free and in commit order. Rows are
locked in name order everywhere, so appends touching several channels never
deadlock each other; a deadlock with another kind of writer (a trim) rolls the
whole transaction back and is retried here. A statement that failed otherwise (a
lock wait timed out or interrupted) never reached COMMIT: the batch is not stored and
the error says so. A failure of COMMIT itself is ambiguous and is not retried
(``EventLog.append`` says the batch may or may not be stored).
Timestamps come from the database clock (UTC), one clock for every host, and never
go below the channel's last one.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Dialect, Select, bindparam, func, literal_column, select, tuple_
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._errors import LogUnavailable, MessageTooLarge, NotConnected
from .._event import Event
from ._ahead import ReadAhead
from ._batch import assemble, plan
from ._calls import Sending, append_error, bounded_append, unreachable
from ._engine import create_engine
from ._info import Pending
from ._queries import page_query
from ._rows import (
    EVENT_COLUMNS,
    MYSQL_NOW_US,
    event_row,
    keyed_events,
    new_epoch,
    prepared,
    rows_to_events,
)
from ._schema import channels, events
from ._shapes import padded
from ._store import ServerStore, discarding_broken

# InnoDB's "deadlock found": the transaction was rolled back whole, so retrying is safe.
_DEADLOCK = 1213
_ATTEMPTS = 5
# Bytes of a bulk-inserted row besides its payload, name and key (a generous bound).
_ROW_OVERHEAD = 64
# The smallest max_allowed_packet a server allows, should it not say.
_MIN_PACKET = 1024
_HEADS = select(
    channels.c.name, channels.c.epoch, channels.c.last_offset, channels.c.last_timestamp
)


class MySQLStore(ServerStore):
    """A MySQL (8.0+) or MariaDB (10.5+) database shared by every process and host.

    Its reads may be given up on midway (see ``bounded``): asyncmy closes a connection
    whose read was cancelled, and a read's transaction ends with its COMMIT, so no
    ROLLBACK goes to a silent server when the connection returns to the pool.
    """

    def __init__(self, url: URL) -> None:
        super().__init__()
        if importlib.util.find_spec("asyncmy") is None:
            raise ImportError(
                "a mysql+asyncmy:// event log needs 'asyncmy': "
                "pip install 'broadcast-history[mysql]'"
            )
        self._url = url
        self.ahead = ReadAhead(self._page_rows)
        # The server's max_allowed_packet, read with the first append.
        self._packet: int | None = None
        # Connections in autocommit mode, for lease statements (see autocommit) and
        # replay pages (see _page_rows).
        self._autocommit: AsyncEngine | None = None

    async def open(self) -> None:
        self._engine = create_engine(self._url)
        self._autocommit = create_engine(self._url, autocommit=True)
        for engine in (self._engine, self._autocommit):
            self.fresh.watch(engine)
        self.ahead = ReadAhead(self._page_rows)

    async def close(self) -> None:
        await self.ahead.close()
        engines = (self._engine, self._autocommit)
        self._engine = self._autocommit = None
        for engine in engines:
            if engine is not None:
                await engine.dispose()

    async def drop(self) -> None:
        engines = (self._engine, self._autocommit)
        self._engine = self._autocommit = None
        self.ahead = ReadAhead(self._page_rows)
        for engine in engines:
            if engine is not None:  # sockets of the loop that ended: see the Postgres store
                await engine.dispose(close=False)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        # A pool of its own: switching a pooled connection to autocommit and back
        # would cost three round trips per use.
        if self._autocommit is None:
            raise NotConnected("the event log is not connected")
        async with self._autocommit.connect() as conn, discarding_broken(conn):
            yield conn

    async def append(self, items: Sequence[Pending]) -> list[Event]:
        # In a transaction: nothing is stored before its COMMIT is sent.
        sending = Sending()
        return await bounded_append(self._append(items, sending), items, sending)

    async def _append(self, items: Sequence[Pending], sending: Sending) -> list[Event]:
        engine = self.engine
        for attempt in range(_ATTEMPTS):
            try:
                return await self._append_once(engine, items, sending)
            except OperationalError as exc:
                # Deadlocks are found while waiting for a lock, never at COMMIT: the
                # transaction was rolled back whole and nothing was stored.
                if _errno(exc) != _DEADLOCK:
                    raise
                if attempt == _ATTEMPTS - 1:
                    raise append_error(exc, ambiguous=False) from exc
        raise AssertionError("unreachable")

    async def _append_once(
        self, engine: AsyncEngine, items: Sequence[Pending], sending: Sending
    ) -> list[Event]:
        entered = False
        try:
            async with engine.connect() as conn:
                entered = True
                return await self._append_on(conn, items, sending)
        except Exception as exc:
            if entered:
                raise
            raise unreachable(exc) from exc  # no connection: nothing was sent

    async def _append_on(
        self, conn: AsyncConnection, items: Sequence[Pending], sending: Sending
    ) -> list[Event]:
        transaction = await conn.begin()
        try:
            if self._packet is None:
                found = await conn.exec_driver_sql("SELECT @@max_allowed_packet")
                self._packet = int(found.scalar() or _MIN_PACKET)
            stored = await _append(conn, items, self._packet // 2)
        except IntegrityError:
            await transaction.rollback()  # a key stored meanwhile: EventLog retries
            raise
        except DBAPIError as exc:
            await conn.invalidate()  # the server rolls back what it did not commit
            if _errno(exc) == _DEADLOCK:
                raise  # retried by _append
            # Before COMMIT: nothing was stored, whatever happened to the connection.
            raise append_error(exc, ambiguous=False) from exc
        except BaseException:
            await conn.invalidate()
            raise
        try:
            # A failure of the COMMIT is ambiguous (the server may have committed
            # before the connection died): EventLog does not retry it.
            sending.sent = True
            await transaction.commit()
        except BaseException:
            # The connection may be dead (killed, or dropped by the server after
            # a packet too large): discard it rather than send it a ROLLBACK,
            # which would fail and hide why. The server rolls back what it did
            # not commit.
            await conn.invalidate()
            raise
        return stored

    async def read(
        self, channel: str, query: Select[Any], max_bytes: int | None, *, descending: bool
    ) -> list[Event]:
        if max_bytes is not None:
            query = byte_bounded(channel, query, max_bytes, descending=descending)
        return await self.bounded(self._read(channel, query))

    async def _read(self, channel: str, query: Select[Any]) -> list[Event]:
        async with self.begin() as conn:
            return rows_to_events(channel, await conn.execute(query))

    async def read_page(
        self, channel: str, start: int, limit: int, max_bytes: int | None, ahead: object = None
    ) -> list[Event]:
        rows = await self.ahead.rows(channel, start, limit, max_bytes, ahead)
        # Keys are bytes here (VARBINARY), without the column type that decodes them.
        return rows_to_events(
            channel,
            [row if row[5] is None else (*row[:5], row[5].decode()) for row in rows],
        )

    async def _page_rows(
        self, channel: str, start: int, limit: int, max_bytes: int | None
    ) -> list[Any]:
        dialect = self.engine.dialect
        values = {"channel": channel.encode(), "after": start - 1, "limit": limit}
        if max_bytes is None:
            sql, params = prepared("page", page_query, dialect, values)
        else:
            values["max_bytes"] = max_bytes
            sql, params = prepared("mysql_bounded_page", _bounded_page, dialect, values)
        return await self.bounded(self._driver_rows(sql, params))

    async def _driver_rows(self, sql: str, params: Any) -> list[Any]:
        # In autocommit: outside a transaction, the connection goes back to the pool
        # without a ROLLBACK, one round trip less per page. (A ROLLBACK sent there to
        # a server gone silent would also hold that connection after the read gave up.)
        if self._autocommit is None:
            raise NotConnected("the event log is not connected")
        async with self._autocommit.connect() as conn:
            raw = await conn.get_raw_connection()
            # The statement on asyncmy itself (kept prepared by its statement cache):
            # plain tuples, no SQLAlchemy row per event.
            try:
                async with raw.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
                    await cursor.execute(sql, params)
                    rows = await cursor.fetchall()
            except BaseException as exc:
                # asyncmy's own errors, past SQLAlchemy: the connection may be broken
                # or still busy, so it must not go back to the pool.
                await conn.invalidate()
                if isinstance(exc, Exception):
                    raise LogUnavailable(f"event log failure: {exc!r}") from exc
                raise
        return list(rows)


async def _append(
    conn: AsyncConnection, items: Sequence[Pending], max_statement: int
) -> list[Event]:
    """Store ``items`` in ``conn``'s transaction (see the module's docstring).

    Items whose idempotency key is already stored on their channel (or repeated
    earlier in ``items``) get the earlier event. A concurrent writer storing the same
    key first makes the insert fail with an IntegrityError; ``EventLog`` retries.
    """
    seen = await _find_keys(conn, items)
    batch = plan(items, seen)
    heads: dict[str, tuple[int, int, int]] = {}
    if batch.fresh:
        names = sorted(batch.counts)
        # Padded with the last name (adding 0 events: no change): statements take a
        # few shapes, each compiled once and kept prepared by the driver.
        shaped = padded(names)
        counts = [batch.counts[name] for name in names] + [0] * (len(shaped) - len(names))
        params: list[Any] = []
        for name, count in zip(shaped, counts, strict=True):
            params += [name.encode(), new_epoch(), count]
        sql, returning = _allocation(conn.dialect, len(shaped))
        result: Any = await conn.exec_driver_sql(sql, tuple(params))
        if returning:
            rows: Any = [(name.decode(), *head) for name, *head in result]
        else:  # MySQL has no RETURNING: read the counters (locked: ours) back
            rows = await conn.execute(_HEADS.where(channels.c.name.in_(shaped)))
        heads = {name: (epoch, last, micros) for name, epoch, last, micros in rows}
        stored = []
        for index, behind in zip(batch.fresh, batch.later, strict=True):
            channel, message, key = items[index]
            epoch, last, micros = heads[channel]
            stored.append(event_row(channel, last - behind, epoch, micros, message, key))
        if all(row["key"] is None for row in stored):
            # A column of NULLs only would make asyncmy fall back from MariaDB's bulk
            # insert (binary, one round trip) to escaped SQL text, 8x slower on
            # large payloads: leave the column to its default instead.
            for row in stored:
                del row["key"]
        for chunk in _chunks(stored, max_statement):
            await conn.execute(events.insert(), chunk)
    return assemble(items, batch, heads, seen)


@functools.lru_cache(maxsize=32)
def _allocation(dialect: Dialect, size: int) -> tuple[str, bool]:
    """SQL of the allocation of ``size`` channel rows (see the module's docstring),
    and whether it returns the new counters (MariaDB's RETURNING, one round trip
    less than reading them back).

    Compiled once per size: SQLAlchemy does not cache statements with several VALUES
    rows, and compiling one of 64 rows costs more than running it. Parameters: name
    (UTF-8 bytes), epoch of a new channel, events added; per row, in order.
    """
    rows = [
        {
            "name": bindparam(f"n{row}"),
            "epoch": bindparam(f"e{row}"),
            "last_offset": bindparam(f"c{row}"),
            "last_timestamp": MYSQL_NOW_US,
            "first_offset": literal_column("1"),
        }
        for row in range(size)
    ]
    statement = insert(channels).values(rows)
    statement = statement.on_duplicate_key_update(
        last_offset=channels.c.last_offset + statement.inserted.last_offset,
        last_timestamp=func.greatest(channels.c.last_timestamp, statement.inserted.last_timestamp),
    )
    # MariaDB returns each row as updated, duplicates included (MySQL 8 lacks it).
    returning = bool(getattr(dialect, "is_mariadb", False)) and dialect.insert_returning
    final = statement.returning(*_HEADS.selected_columns) if returning else statement
    compiled = final.compile(dialect=dialect)
    expected = [name for row in range(size) for name in (f"n{row}", f"e{row}", f"c{row}")]
    if list(compiled.positiontup or ()) != expected:
        raise AssertionError(f"unexpected parameter order: {compiled.positiontup}")
    return compiled.string, returning


def _chunks(rows: list[dict[str, Any]], limit: int) -> Iterator[list[dict[str, Any]]]:
    """``rows`` in runs of less than ``limit`` bytes each (a row alone may be more).

    A bulk insert is one packet, and the server refuses a packet over its
    ``max_allowed_packet`` (and drops the connection).
    """
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        row_size = len(row["payload"]) + 4 * len(row["channel"] + (row.get("key") or ""))
        row_size += _ROW_OVERHEAD
        if row_size > 2 * limit:  # over the packet itself (limit is half of it)
            raise MessageTooLarge(
                f"a message of {len(row['payload'])} bytes is over the MySQL server's "
                f"max_allowed_packet ({2 * limit} bytes): raise it on the server, or "
                "lower max_message_size"
            )
        if chunk and size + row_size > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += row_size
    if chunk:
        yield chunk


async def _find_keys(
    conn: AsyncConnection, items: Sequence[Pending]
) -> dict[tuple[str, str], Event]:
    pairs = sorted({(item.channel, item.key) for item in items if item.key is not None})
    if not pairs:
        return {}
    result = await conn.execute(
        select(events.c.channel, *EVENT_COLUMNS).where(
            tuple_(events.c.channel, events.c.key).in_(padded(pairs))
        )
    )
    return keyed_events(result)


def _errno(exc: DBAPIError) -> object:
    args = getattr(exc.orig, "args", ())
    return args[0] if args else None


def _bounded_page() -> Select[Any]:
    return byte_bounded(
        bindparam("channel", None),  # type: ignore[arg-type]
        page_query(),
        bindparam("max_bytes", None),  # type: ignore[arg-type]
    )


def byte_bounded(
    channel: str, query: Select[Any], max_bytes: int, *, descending: bool = False
) -> Select[Any]:
    """``query`` (events of ``channel`` in offset order, with a LIMIT) cut after
    ``max_bytes`` of payload.

    The page's offsets and payload sizes are selected first (the LIMIT applies
    there, so no more than a page is ever sized), a running sum over them gives
    each row's start in bytes, and only rows starting below the budget are joined
    back to their payloads: the row that passes the budget is the last one (the
    caller sees the page was cut) and a single large event still comes through.
    """
    sizes = query.with_only_columns(
        events.c.offset, func.length(events.c.payload).label("size")
    ).subquery()
    order = sizes.c.offset.desc() if descending else sizes.c.offset.asc()
    start = func.sum(sizes.c.size).over(order_by=order) - sizes.c.size
    starts = select(sizes.c.offset, start.label("start")).subquery()
    kept = select(starts.c.offset).where(starts.c.start < max_bytes).subquery()
    offset = events.c.offset
    return (
        select(*EVENT_COLUMNS)
        .join_from(events, kept, offset == kept.c.offset)
        .where(events.c.channel == channel)
        .order_by(offset.desc() if descending else offset.asc())
    )
