"""The Postgres store: one statement per appended batch, byte-bounded reads.

A transaction of SELECT ... FOR UPDATE, INSERT channels, INSERT events and UPDATE
counters costs six round trips with BEGIN and COMMIT. Here a single autocommit
statement upserts the channel rows, which both creates missing channels and bumps
their counters under the row lock, and inserts the events from arrays using the
offsets the upsert returned. Offsets stay gap-free and in commit order: a concurrent
writer of the same channel waits on the row lock, then increments the committed value
(READ COMMITTED re-reads it), and the statement commits before the lock is released.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from itertools import accumulate
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import Select, bindparam, event, func, select
from sqlalchemy.engine import URL, ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._cancel import wait_for
from .._errors import LogUnavailable, NotConnected
from .._event import Event
from ._ahead import ReadAhead
from ._batch import assemble, plan
from ._calls import (
    Conflict,
    Sending,
    append_error,
    bounded_append,
    is_data_error,
)
from ._engine import create_engine
from ._info import Pending
from ._kept import KeptConnections
from ._queries import page_query
from ._rows import EVENT_COLUMNS, compiled, keyed_events, new_epoch, prepared, rows_to_events
from ._schema import channels, events
from ._store import ServerStore, discarding_broken

_T = TypeVar("_T")

#: Longest closing the pool may wait for the server to see its connections close.
CLOSE_WAIT = 2.0

#: Idle connections kept for appends and replay pages. A broadcast runs one append
#: and up to four replay reads at a time (and up to ReadAhead.SLOTS pages read
#: ahead); a call beyond the kept ones checks a connection out of the pool as before.
KEEP = 4


class PostgresStore(ServerStore):
    """A Postgres database shared by every process and host."""

    def __init__(self, url: URL) -> None:
        super().__init__()
        self._url = url
        self._kept: KeptConnections | None = None
        self._drivers: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()
        self.ahead = ReadAhead(self._page_records)

    async def open(self) -> None:
        engine = create_engine(self._url)
        discard_broken_connections(engine)
        self.fresh.watch(engine)
        self._drivers = opened_drivers(engine)
        self._engine = engine
        self._kept = KeptConnections(engine, keep=KEEP)
        self.ahead = ReadAhead(self._page_records)

    async def close(self) -> None:
        await self.ahead.close()
        engine, self._engine = self._engine, None
        kept, self._kept = self._kept, None
        if kept is not None:
            await kept.close()
        if engine is not None:
            # Closing a connection waits for the server's goodbye, which a server gone
            # silent never sends: past CLOSE_WAIT the sockets left open are closed.
            try:
                await wait_for(engine.dispose(), CLOSE_WAIT)
            except asyncio.TimeoutError:
                for driver in list(self._drivers):
                    driver.terminate()

    async def drop(self) -> None:
        engine, self._engine, self._kept = self._engine, None, None
        self.ahead = ReadAhead(self._page_records)
        if engine is not None:
            # Their sockets belong to the loop that ended, where nothing runs any
            # more: the pool's are dereferenced, not closed. (Connections that loop
            # held checked out are still closed by SQLAlchemy when collected, which
            # fails and logs it: noise, nothing is lost.)
            await engine.dispose(close=False)

    @property
    def kept(self) -> KeptConnections:
        if self._kept is None:
            raise NotConnected("the event log is not connected")
        return self._kept

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            async with discarding_broken(conn):
                yield conn

    def gave_up(self, since: float) -> None:
        # The kept idle ones too (the pooled ones are replaced when taken out).
        super().gave_up(since)
        if self._kept is not None:
            self._kept.drop_idle(since)

    async def append(self, items: Sequence[Pending]) -> list[Event]:
        return await append(self.kept, items)

    async def read(
        self, channel: str, query: Select[Any], max_bytes: int | None, *, descending: bool
    ) -> list[Event]:
        if max_bytes is not None:
            query = byte_bounded(query, max_bytes, descending=descending)
        return await self._fetch(channel, *compiled(query, self.engine.dialect))

    async def read_page(
        self, channel: str, start: int, limit: int, max_bytes: int | None, ahead: object = None
    ) -> list[Event]:
        rows = await self.ahead.rows(channel, start, limit, max_bytes, ahead)
        return rows_to_events(channel, rows)

    async def _page_records(
        self, channel: str, start: int, limit: int, max_bytes: int | None
    ) -> list[asyncpg.Record]:
        values = {"channel": channel, "after": start - 1, "limit": limit, "max_bytes": max_bytes}
        if max_bytes is None:
            sql, params = prepared("page", page_query, self.engine.dialect, values)
        else:
            sql, params = prepared("bounded_page", _bounded_page, self.engine.dialect, values)
        return await self._records(sql, params)

    async def _fetch(self, channel: str, sql: str, params: tuple[Any, ...]) -> list[Event]:
        return rows_to_events(channel, await self._records(sql, params))

    async def _records(self, sql: str, params: tuple[Any, ...]) -> list[asyncpg.Record]:
        # One autocommit SELECT on asyncpg itself: one round trip (no BEGIN and COMMIT
        # around it) and plain records, no SQLAlchemy row per event.
        try:
            return await self.bounded(self.kept.run(lambda driver: driver.fetch(sql, *params)))
        except LogUnavailable:
            raise
        except Exception as exc:
            raise LogUnavailable(f"event log failure: {exc!r}") from exc


# Channel rows are upserted in name order, so batches touching several channels
# take their row locks in the same order everywhere and cannot deadlock. Timestamps
# come from the database clock, one clock for every host, never below the last one.
# Per item, `channel` indexes the array of names, and `later` is how many items of
# the same channel follow it in this batch, so its offset is the channel's new last
# offset minus `later`. The payloads travel as one bytea, each item's a slice of it.
#
# Numbers and flags travel as array literals in text ("{1,2,3}"), which Postgres
# parses: a Python list bound as an array makes asyncpg check each element against
# the collections ABCs (is it a nested array?), which cost ~1.1-2.5 us of loop CPU
# per element here, several per event. Names and keys stay arrays (they would need
# quoting in a literal); keys are NULL when no item has one (unnest pads with NULLs).
_APPEND = f"""
WITH alloc AS (
    INSERT INTO {channels.name} AS c
        (name, epoch, last_offset, last_timestamp, first_offset)
    SELECT t.name, t.epoch, t.n, clock.us, 1
    FROM unnest($1::varchar[], $2::text::bigint[], $3::text::bigint[]) AS t(name, n, epoch),
         (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS us) AS clock
    ORDER BY t.name
    ON CONFLICT (name) DO UPDATE
        SET last_offset = c.last_offset + excluded.last_offset,
            last_timestamp = greatest(c.last_timestamp, excluded.last_timestamp)
    RETURNING c.name, c.epoch, c.last_offset, c.last_timestamp
), stored AS (
    INSERT INTO {events.name}
        (channel, "offset", epoch, "timestamp", is_text, payload, key)
    SELECT a.name, a.last_offset - e.later, a.epoch, a.last_timestamp,
           e.is_text, substring($7::bytea FROM e.start FOR e.length), e.key
    FROM unnest($4::text::int[], $5::text::bigint[], $6::text::bool[], $8::text::int[],
                $9::text::int[], $10::varchar[])
        AS e(channel, later, is_text, start, length, key)
    JOIN alloc AS a ON a.name = ($1::varchar[])[e.channel]
)
SELECT name, epoch, last_offset, last_timestamp FROM alloc
"""

_FIND_KEYS = f"""
SELECT e.channel, e."offset", e.epoch, e."timestamp", e.is_text, e.payload, e.key
FROM {events.name} AS e
JOIN unnest($1::varchar[], $2::varchar[]) AS k(channel, key)
    ON e.channel = k.channel AND e.key = k.key
WHERE e.key IS NOT NULL  -- lets the planner use the partial key index
"""


async def append(kept: KeptConnections, items: Sequence[Pending]) -> list[Event]:
    """Store ``items`` atomically; their events in input order.

    Items whose idempotency key is already stored on their channel (or repeated
    earlier in ``items``) get the earlier event. A concurrent writer storing the same
    key first makes the insert fail: :class:`Conflict`, and the caller retries.

    Raises:
        Conflict: A concurrent writer stored one of the keys first (nothing stored).
        InvalidArgument: Postgres refused a value (nothing stored).
        LogUnavailable: The statement failed otherwise; it may have been committed.
    """
    # The append is one statement on asyncpg itself, atomic by itself: without BEGIN
    # and COMMIT it costs one round trip instead of three, and no SQLAlchemy work. The
    # key lookup needs no transaction either: the unique index catches a key stored
    # after it.
    # Taking a connection counts too: a new one to a frozen server waits as long.
    try:
        sending = Sending()
        append = kept.run(lambda driver: _append(driver, items, sending))
        return await bounded_append(append, items, sending)
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"append conflicted: {exc!r}") from exc
    except (NotConnected, LogUnavailable):
        raise  # closed meanwhile (nothing was sent), or no answer in time
    except Exception as exc:
        raise append_error(exc, ambiguous=not is_data_error(exc)) from exc


async def _append(
    conn: asyncpg.Connection, items: Sequence[Pending], sending: Sending
) -> list[Event]:
    seen = await _find_keys(conn, items)
    batch = plan(items, seen)
    heads: dict[str, tuple[int, int, int]] = {}
    if batch.fresh:
        names = sorted(batch.counts)
        position = {name: number for number, name in enumerate(names, 1)}
        stored = [items[i] for i in batch.fresh]
        payloads = [_payload(item.message) for item in stored]
        lengths = list(map(len, payloads))
        keys = [item.key for item in stored]
        sending.sent = True
        rows: list[Any] = await conn.fetch(
            _APPEND,
            names,
            _literal([batch.counts[name] for name in names]),
            _literal([new_epoch() for _ in names]),
            _literal([position[item.channel] for item in stored]),
            _literal(batch.later),
            _literal(["t" if isinstance(item.message, str) else "f" for item in stored]),
            b"".join(payloads),
            _literal(list(accumulate(lengths[:-1], initial=1))),
            _literal(lengths),
            None if all(key is None for key in keys) else keys,
        )
        heads = {name: (epoch, last, micros) for name, epoch, last, micros in rows}
    return assemble(items, batch, heads, seen)


def _payload(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


def _literal(values: list[int] | list[str]) -> str:
    """A Postgres array literal of integers or of ``t``/``f`` flags (see _APPEND)."""
    return "{" + ",".join(map(str, values)) + "}"


async def _find_keys(
    conn: asyncpg.Connection, items: Sequence[Pending]
) -> dict[tuple[str, str], Event]:
    pairs = sorted({(item.channel, item.key) for item in items if item.key is not None})
    if not pairs:
        return {}
    result = await conn.fetch(
        _FIND_KEYS, [channel for channel, _ in pairs], [key for _, key in pairs]
    )
    return keyed_events(result)


def opened_drivers(engine: AsyncEngine) -> weakref.WeakSet[asyncpg.Connection]:
    """The asyncpg connections ``engine`` opens from now on, while they live."""
    drivers: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        drivers.add(dbapi_connection.driver_connection)

    return drivers


def discard_broken_connections(engine: AsyncEngine) -> None:
    """Make ``engine``'s pool drop connections the server has already closed.

    asyncpg notices a terminated backend (``pg_terminate_backend``, a server restart)
    as soon as the socket closes, but SQLAlchemy's pool would still hand the dead
    connection out once and fail that query. Checking ``is_closed()`` at checkout is
    free, unlike ``pool_pre_ping``'s round trip; the pool then opens a fresh one.
    A connection terminated while idle can be checked out before the socket's end
    is read; its first statement fails with ``InternalClientError``, which
    SQLAlchemy does not count as a disconnect: counted here, so the pool drops it.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("connection closed by the server")

    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        cause = getattr(context.original_exception, "__cause__", None)
        if isinstance(cause, asyncpg.InternalClientError):
            context.is_disconnect = True


def byte_bounded(query: Select[Any], max_bytes: int, *, descending: bool = False) -> Select[Any]:
    """``query`` (events in offset order, with a LIMIT) cut after ``max_bytes`` of payload.

    A running sum over the page computes each row's start in bytes; rows that start
    below the budget are kept, so the row that passes it is the last one (the caller
    sees the page was cut) and a single large event still comes through. Postgres
    reads payload sizes from TOAST headers, so cut rows are never fetched.
    """
    # The page (its ORDER BY and LIMIT) first, the running sum over it: in one SELECT,
    # a plan that does not read the index in order (stale statistics after a bulk
    # load) summed and sorted every event of the channel before the LIMIT (a
    # million-event channel: 0.3-1.1 s a page, spilled to disk, against 2-30 ms).
    page = query.subquery()
    size = func.octet_length(page.c.payload)
    order = page.c.offset.desc() if descending else page.c.offset.asc()
    start = (func.sum(size).over(order_by=order) - size).label("bh_start")
    inner = select(page, start).subquery()
    offset = inner.c.offset
    return (
        select(*(inner.c[column.name] for column in EVENT_COLUMNS))
        .where(inner.c.bh_start < max_bytes)
        .order_by(offset.desc() if descending else offset.asc())
    )


def _bounded_page() -> Select[Any]:
    return byte_bounded(page_query(), bindparam("max_bytes", None))  # type: ignore[arg-type]
