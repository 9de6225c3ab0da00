"""The durable event log: append with gap-free offsets, read by offset or time."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, Concatenate, Literal, NamedTuple, ParamSpec, TypeVar

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._errors import ImportConflict, InvalidArgument, LogUnavailable, NotConnected
from .._event import Event, from_micros, to_micros
from .._validation import check_int, check_optional_int, check_time
from . import _migrate, _postgres, _restore
from ._engine import (
    MEMORY_URL,
    create_engine,
    create_sync_engine,
    is_memory_sqlite,
    normalize_url,
    shared_memory_url,
)
from ._info import ChannelInfo, Retention
from ._rows import EVENT_COLUMNS, now_micros, rows_to_events
from ._schema import channels, events, log_identity
from ._sqlite import SqliteReader, SqliteWriter

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

_CHANNEL_COLUMNS = (
    channels.c.name,
    channels.c.epoch,
    channels.c.last_offset,
    channels.c.first_offset,
    channels.c.last_timestamp,
    channels.c.trimmed_timestamp,
)


_P = ParamSpec("_P")
_T = TypeVar("_T")


class Pending(NamedTuple):
    """A validated message waiting to be appended."""

    channel: str
    message: str | bytes
    key: str | None


def _finish_on_cancel(
    method: Callable[Concatenate[EventLog, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[EventLog, _P], Coroutine[Any, Any, _T]]:
    """Let a database call run to its end even if its caller is cancelled.

    Cancelling an aiosqlite or asyncpg call midway can leave the connection unusable,
    and for an in-memory SQLite database (one connection) that would lose the data.
    Subscribers are cancelled routinely (a client goes away), so the call finishes in
    the background and only the caller stops waiting.
    """

    @functools.wraps(method)
    async def wrapper(self: EventLog, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        task = asyncio.ensure_future(method(self, *args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_ignore_outcome)
            raise

    return wrapper


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _info(row: Sequence[Any]) -> ChannelInfo:
    name, epoch, last, first, last_ts, trimmed_ts = row
    return ChannelInfo(
        name=name,
        epoch=epoch,
        last_offset=last,
        first_offset=first,
        last_timestamp=from_micros(last_ts) if last else None,
        trimmed_timestamp=None if trimmed_ts is None else from_micros(trimmed_ts),
    )


class EventLog:
    """Durable, append-only store of every published event.

    Reached as ``broadcast.log``; usable alone for admin work. Offsets are allocated
    from a per-channel counter row inside the inserting transaction, so they are
    gap-free and in commit order under any number of writers sharing the database.

    Args:
        url: SQLAlchemy URL (``sqlite+aiosqlite:///events.db``,
            ``postgresql+asyncpg://host/db``). ``None``: a private in-memory SQLite.
        migrate: Create or upgrade the schema on connect (``True``), only verify it is
            current (``False``, raising :class:`SchemaOutOfDate` otherwise).
        sqlite_synchronous: SQLite ``PRAGMA synchronous`` for file databases. ``NORMAL``
            (default) survives a crash of the process; ``FULL`` also a power loss.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        migrate: bool = True,
        sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL",
    ) -> None:
        level = sqlite_synchronous.upper() if isinstance(sqlite_synchronous, str) else None
        if level not in _SYNCHRONOUS:
            raise InvalidArgument(
                f"sqlite_synchronous must be one of {', '.join(_SYNCHRONOUS)}, "
                f"got {sqlite_synchronous!r}"
            )
        self.url = normalize_url(MEMORY_URL if url is None else url)
        self.migrate = migrate
        self._synchronous = str(level)
        self._engine: AsyncEngine | None = None
        self._writer: SqliteWriter | None = None
        self._reader: SqliteReader | None = None
        self._log_id: str | None = None
        self._dialect = self.url.get_backend_name()
        # An in-memory SQLite database is one shared connection: serialize its use.
        self._lock: asyncio.Lock | None = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine (only while connected)."""
        if self._engine is None:
            raise NotConnected("the event log is not connected")
        return self._engine

    @property
    def log_id(self) -> str:
        """This log's identity: random, made with its schema, shared by every process
        using the same database (only while connected)."""
        if self._log_id is None:
            raise NotConnected("the event log is not connected")
        return self._log_id

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    async def connect(self) -> None:
        """Open the engine and create, upgrade or check the schema."""
        if self._engine is not None:
            return
        memory = is_memory_sqlite(self.url)
        url = shared_memory_url(self.url) if memory else self.url
        engine = create_engine(url, memory=memory, sqlite_synchronous=self._synchronous)
        writer = reader = None
        if self._dialect == "sqlite":
            sync = self._synchronous
            writer = SqliteWriter(create_sync_engine(url, memory=memory, sqlite_synchronous=sync))
            reader = SqliteReader(
                create_sync_engine(url, memory=memory, sqlite_synchronous=sync, single=memory)
            )
        self._lock = asyncio.Lock() if memory else None
        try:
            async with engine.connect() as conn:
                await conn.execution_options(bh_write=True)
                if self.migrate:
                    await _migrate.upgrade(conn)
                else:
                    await _migrate.check(conn)
                found = await conn.execute(select(log_identity.c.id).limit(1))
                log_id = found.scalar()
                await conn.commit()
            if log_id is None:
                raise LogUnavailable("the event log has no identity row: recreate its schema")
        except BaseException as exc:
            await engine.dispose()
            for closing in (writer, reader):
                if closing is not None:
                    closing.close()
            if isinstance(exc, (SQLAlchemyError, OSError)):
                raise LogUnavailable(f"cannot open the event log: {exc}") from exc
            raise
        self._engine, self._writer, self._reader = engine, writer, reader
        self._log_id = str(log_id)

    async def disconnect(self) -> None:
        """Close every connection; safe to call twice."""
        if self._lock is not None and self._engine is not None:
            # Let a call still using the single in-memory connection finish first.
            async with self._lock:
                pass
        engine, self._engine = self._engine, None
        writer, self._writer = self._writer, None
        reader, self._reader = self._reader, None
        self._log_id = None
        for closing in (writer, reader):
            if closing is not None:
                closing.close()
        if engine is not None:
            await engine.dispose()

    @asynccontextmanager
    async def _begin(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        engine = self.engine
        if self._lock is not None:
            await self._lock.acquire()
        try:
            async with engine.connect() as conn:
                if write:
                    await conn.execution_options(bh_write=True)
                async with conn.begin():
                    yield conn
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise LogUnavailable(f"event log failure: {exc.orig!r}") from exc
        except (SQLAlchemyError, OSError) as exc:
            raise LogUnavailable(f"event log failure: {exc!r}") from exc
        finally:
            if self._lock is not None:
                self._lock.release()

    def transaction(self, *, write: bool = False) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection in a transaction, for queries the log has no method for (admin).

        Driver errors come out as :class:`LogUnavailable`, as for the log's own methods.

        Args:
            write: The transaction will write: SQLite takes its write lock up front.
        """
        return self._begin(write=write)

    # -- writing -------------------------------------------------------------------

    async def append(self, items: Sequence[Pending]) -> list[Event]:
        """Store ``items`` in one transaction and return their events, in order.

        An item whose key was already used on its channel is not stored again: its
        earlier event is returned instead.
        """
        for attempt in range(3):
            try:
                return await self._append(items)
            except IntegrityError as exc:
                # Another process stored the same idempotency key (or created the
                # channel) between our read and our insert; the transaction rolled
                # back, so retrying is safe and finds its row.
                if attempt == 2:
                    raise LogUnavailable(f"append kept conflicting: {exc.orig!r}") from exc
            except (SQLAlchemyError, UnicodeError) as exc:
                if _is_data_error(exc):
                    # Refused before anything was stored: safe to retry without the
                    # offending item (the appender does, one item at a time).
                    raise InvalidArgument(f"the event log refused the data: {exc}") from exc
                if isinstance(exc, DBAPIError):
                    # Not retried: if the connection died after the server committed, a
                    # retry would store the batch twice. The caller decides, ideally by
                    # publishing again with the same key.
                    raise LogUnavailable(
                        f"event log failure, the publish may or may not be stored: {exc.orig!r}"
                    ) from exc
                raise LogUnavailable(f"event log failure: {exc!r}") from exc
            except OSError as exc:
                raise LogUnavailable(f"event log failure: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def _append(self, items: Sequence[Pending]) -> list[Event]:
        if self._writer is not None:
            if self._lock is None:
                return await self._writer.append(items)
            async with self._lock:
                return await self._writer.append(items)
        # One autocommit statement instead of a transaction of several (see _postgres).
        return await _postgres.append(self.engine, items)

    # -- reading -------------------------------------------------------------------

    @_finish_on_cancel
    async def channel(self, name: str) -> ChannelInfo | None:
        """State of channel ``name``, or ``None`` if it has no history."""
        async with self._begin() as conn:
            result = await conn.execute(select(*_CHANNEL_COLUMNS).where(channels.c.name == name))
            row = result.first()
        return None if row is None else _info(row)

    @_finish_on_cancel
    async def channels(
        self, *, prefix: str | None = None, after: str | None = None, limit: int = 100
    ) -> list[ChannelInfo]:
        """Channels in name order, optionally those starting with ``prefix``.

        Args:
            prefix: Only names starting with it.
            after: Only names sorting after it (the cursor of the previous page).
            limit: Page size.
        """
        query = select(*_CHANNEL_COLUMNS).order_by(channels.c.name).limit(limit)
        if prefix:
            query = query.where(channels.c.name.startswith(prefix, autoescape=True))
        if after is not None:
            query = query.where(channels.c.name > after)
        async with self._begin() as conn:
            result = await conn.execute(query)
            return [_info(row) for row in result]

    @_finish_on_cancel
    async def read(
        self,
        channel: str,
        *,
        after: int | None = None,
        before: int | None = None,
        since: int | datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        order: Literal["asc", "desc"] = "asc",
        max_bytes: int | None = None,
    ) -> list[Event]:
        """A page of stored events of ``channel``.

        Args:
            after: Only offsets greater than this.
            before: Only offsets smaller than this.
            since: An offset: only offsets greater than it (as ``subscribe(since=)``,
                so not together with ``after``); an aware datetime: only events with
                a timestamp at or after it.
            until: Only events with a timestamp before this (aware datetime).
            limit: At most this many events.
            order: ``"asc"`` (oldest first) or ``"desc"`` (newest first).
            max_bytes: Stop once the payloads reach or pass this many bytes; the
                event that passes it is the last one returned (at least one is).
        """
        if order not in ("asc", "desc"):
            raise InvalidArgument("order must be 'asc' or 'desc'")
        check_int("limit", limit)
        after = check_optional_int("after", after)
        before = check_optional_int("before", before)
        max_bytes = check_optional_int("max_bytes", max_bytes, minimum=1)
        query = select(*EVENT_COLUMNS).where(events.c.channel == channel)
        if since is not None and not isinstance(since, datetime):
            if after is not None:
                raise InvalidArgument("give after or an offset since, not both")
            after = check_int("since", since)
            since = None
        if after is not None:
            query = query.where(events.c.offset > after)
        if before is not None:
            query = query.where(events.c.offset < before)
        if since is not None:
            query = query.where(events.c.timestamp >= _micros(since, "since"))
        if until is not None:
            query = query.where(events.c.timestamp < _micros(until, "until"))
        column = events.c.offset
        query = query.order_by(column.asc() if order == "asc" else column.desc()).limit(limit)
        return await self._read(channel, query, max_bytes, descending=order == "desc")

    @_finish_on_cancel
    async def read_from(
        self, channel: str, start: int, limit: int, max_bytes: int | None = None
    ) -> list[Event]:
        """Up to ``limit`` events of ``channel`` from offset ``start`` on, ascending.

        With ``max_bytes``, as :meth:`read`: cut once the payloads reach or pass it.
        """
        query = (
            select(*EVENT_COLUMNS)
            .where(events.c.channel == channel, events.c.offset >= start)
            .order_by(events.c.offset)
            .limit(limit)
        )
        return await self._read(channel, query, max_bytes)

    async def _read(
        self,
        channel: str,
        query: Select[Any],
        max_bytes: int | None,
        *,
        descending: bool = False,
    ) -> list[Event]:
        reader = self._reader
        if reader is not None:
            try:
                if self._lock is None:
                    return await reader.read(channel, query, max_bytes)
                async with self._lock:
                    return await reader.read(channel, query, max_bytes)
            except (SQLAlchemyError, OSError) as exc:
                raise LogUnavailable(f"event log failure: {exc!r}") from exc
        if max_bytes is not None:
            query = _postgres.byte_bounded(query, max_bytes, descending=descending)
        async with self._begin() as conn:
            result = await conn.execute(query)
            return rows_to_events(channel, result)

    async def get(self, channel: str, offset: int) -> Event | None:
        """The event at ``offset`` of ``channel``, if stored."""
        page = await self.read(channel, after=offset - 1, limit=1)
        return page[0] if page and page[0].offset == offset else None

    @_finish_on_cancel
    async def offset_at(self, channel: str, moment: datetime) -> int | None:
        """Offset of the first stored event at or after ``moment``, if any."""
        query = (
            select(events.c.offset)
            .where(events.c.channel == channel, events.c.timestamp >= _micros(moment))
            .order_by(events.c.timestamp, events.c.offset)
            .limit(1)
        )
        async with self._begin() as conn:
            result = await conn.execute(query)
            return result.scalar()

    async def restore(
        self, infos: Sequence[ChannelInfo], pages: AsyncIterable[Sequence[Event]]
    ) -> int:
        """Store exported channels as they were: rows, offsets, epochs, timestamps.

        All or nothing, in one write transaction; the caller has checked that each
        channel's events run gap-free from its ``first_offset`` to its
        ``last_offset`` (see ``HistoryAdmin.import_jsonl``). Returns the events stored.

        Raises:
            ImportConflict: One of the channels exists already (nothing is stored).
        """
        try:
            async with self._begin(write=True) as conn:
                return await _restore.restore(conn, infos, pages)
        except IntegrityError as exc:
            # A publisher created one of the channels while the import ran.
            raise ImportConflict(
                f"a channel of the import was created meanwhile: {exc.orig}"
            ) from exc

    # -- trimming and deletion -----------------------------------------------------

    @_finish_on_cancel
    async def trim(
        self, channel: str, *, before: int | None = None, before_time: datetime | None = None
    ) -> int:
        """Remove events with an offset below ``before`` and/or older than ``before_time``.

        Returns:
            The number of events removed.
        """
        before = check_optional_int("before", before)
        if before_time is not None:
            check_time("before_time", before_time)
        async with self._begin(write=True) as conn:
            return await self._trim(conn, channel, before, before_time)

    @_finish_on_cancel
    async def apply_retention(self, retention: Retention) -> int:
        """Apply ``retention`` to every channel; returns the number of events removed."""
        if retention.max_events is None and retention.max_age is None:
            return 0
        cutoff = None
        if retention.max_age is not None:
            cutoff = from_micros(now_micros()) - retention.max_age
        removed = 0
        for info in await self._all_channels():
            before = None
            if retention.max_events is not None:
                before = info.last_offset - retention.max_events + 1
                if before <= info.first_offset:
                    before = None
            if before is None and (
                cutoff is None or info.count == 0 or info.last_timestamp is None
            ):
                continue
            async with self._begin(write=True) as conn:
                removed += await self._trim(conn, info.name, before, cutoff)
        return removed

    async def _all_channels(self) -> list[ChannelInfo]:
        async with self._begin() as conn:
            result = await conn.execute(select(*_CHANNEL_COLUMNS))
            return [_info(row) for row in result]

    async def _trim(
        self,
        conn: AsyncConnection,
        channel: str,
        before: int | None,
        before_time: datetime | None,
    ) -> int:
        result = await conn.execute(
            select(channels.c.first_offset, channels.c.last_offset).where(
                channels.c.name == channel
            )
        )
        row = result.first()
        if row is None:
            return 0
        first, last = row
        new_first = first
        if before is not None:
            new_first = max(new_first, min(before, last + 1))
        if before_time is not None:
            kept = await conn.execute(
                select(events.c.offset)
                .where(events.c.channel == channel, events.c.timestamp >= _micros(before_time))
                .order_by(events.c.timestamp, events.c.offset)
                .limit(1)
            )
            first_kept = kept.scalar()
            new_first = max(new_first, last + 1 if first_kept is None else first_kept)
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

    @_finish_on_cancel
    async def delete_channel(self, channel: str) -> bool:
        """Delete a channel and its history; its next use starts a new epoch.

        Returns:
            Whether the channel existed.
        """
        async with self._begin(write=True) as conn:
            await conn.execute(delete(events).where(events.c.channel == channel))
            result = await conn.execute(delete(channels).where(channels.c.name == channel))
            return bool(result.rowcount)

    @_finish_on_cancel
    async def count(self, channel: str) -> int:
        """Number of stored events of ``channel`` (counted, not derived)."""
        async with self._begin() as conn:
            result = await conn.execute(
                select(func.count()).select_from(events).where(events.c.channel == channel)
            )
            return int(result.scalar_one())


def _micros(moment: datetime, name: str = "time") -> int:
    return to_micros(check_time(name, moment))


def _is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the database refused the values (nothing was stored).

    Such errors come wrapped several times (SQLAlchemy, the driver's adapter, the
    driver), so the whole chain is searched: an encoding failure, or SQLSTATE class
    22 ("data exception") from Postgres.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (UnicodeError, sqlite3.DataError)):
            return True
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state.startswith("22"):
            return True
        pending += [current.__cause__, getattr(current, "orig", None)]
    return False


__all__ = ["ChannelInfo", "EventLog", "Pending", "Retention"]
