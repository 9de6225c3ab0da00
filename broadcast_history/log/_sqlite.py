"""The SQLite store: appends and event reads, each in one hop to a thread.

Through aiosqlite every statement is a round trip to the driver's thread, and a batch
needs five (BEGIN, read counters, insert, update counters, COMMIT). Running the batch
as one synchronous function on a dedicated writer thread pays a single hop instead,
which is what makes group commit on SQLite fast. Event reads do the same on reader
threads, which also lets them stop after a byte budget: SQLite steps one row at a
time, so a page of large events is cut before the rest of it is read from disk.
The async engine (aiosqlite) serves migrations and the shared queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from sqlite3 import Cursor
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, bindparam, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import URL

from .._errors import NotConnected
from .._event import Event, from_micros, stored_event
from ._engine import create_engine, create_sync_engine, shared_memory_url
from ._info import Pending
from ._queries import page_query
from ._rows import EVENT_COLUMNS, compiled, new_epoch, now_micros, prepared, rows_to_events
from ._schema import channels, events
from ._store import Store

_T = TypeVar("_T")
# The append's statements, compiled once to SQLite's SQL: the writer runs them on the
# driver's cursor, with tuples, without SQLAlchemy's per-statement work.
_DIALECT = sqlite_dialect(paramstyle="qmark")
_INSERT_EVENTS = str(events.insert().compile(dialect=_DIALECT))
_INSERT_CHANNELS = str(
    insert(channels).on_conflict_do_nothing(index_elements=["name"]).compile(dialect=_DIALECT)
)
_UPDATE_COUNTER = str(
    update(channels)
    .where(channels.c.name == bindparam("b_name"))
    .values(last_offset=bindparam("b_last"), last_timestamp=bindparam("b_ts"))
    .compile(dialect=_DIALECT)
)  # parameters: last offset, last timestamp, name
_COUNTERS = (
    f"SELECT name, epoch, last_offset, last_timestamp FROM {channels.name} WHERE name IN (%s)"
)
# Channels per counter query: one query for a batch over many channels instead of one
# per channel, under SQLite's oldest limit of 999 parameters.
_COUNTERS_CHUNK = 500
# Stored events of one channel by key; the IN list is filled in per call (compiling a
# query per batch would cost the writer more than running it).
_BY_KEYS = (
    str(
        select(*EVENT_COLUMNS)
        .where(events.c.channel == bindparam("b_channel"))
        .compile(dialect=_DIALECT)
    )
    + f" AND {events.c.key.compile(dialect=_DIALECT)} IN (%s)"
)


class SqliteStore(Store):
    """A SQLite file, or a private in-memory database (one shared connection)."""

    def __init__(self, url: URL, *, memory: bool, synchronous: str) -> None:
        super().__init__()
        self._url = url
        self._memory = memory
        self._synchronous = synchronous
        self._writer: Engine | None = None
        self._reader: Engine | None = None
        self._write_thread: ThreadPoolExecutor | None = None
        self._read_threads: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        memory, sync = self._memory, self._synchronous
        # Several engines must reach the same in-memory database: name it.
        url = shared_memory_url(self._url) if memory else self._url
        self._engine = create_engine(url, memory=memory, sqlite_synchronous=sync)
        self._writer = create_sync_engine(url, memory=memory, sqlite_synchronous=sync)
        self._reader = create_sync_engine(
            url, memory=memory, sqlite_synchronous=sync, single=memory
        )
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="broadcast-history-write")
        self._read_threads = ThreadPoolExecutor(2, thread_name_prefix="broadcast-history-read")
        self.lock = asyncio.Lock() if memory else None

    async def close(self) -> None:
        # Detach first: a call made while closing finds no threads (NotConnected)
        # instead of queueing work on an executor about to shut down.
        engine, writer, reader = self._engine, self._writer, self._reader
        threads = (self._write_thread, self._read_threads)
        self._engine = self._writer = self._reader = None
        self._write_thread = self._read_threads = None
        if self.lock is not None and engine is not None:
            # Let a call still using the single in-memory connection finish first.
            async with self.lock:
                pass
        for pool in threads:
            if pool is not None:
                pool.shutdown(wait=True)
        for sync in (writer, reader):
            if sync is not None:
                sync.dispose()
        if engine is not None:
            await engine.dispose()

    async def _run(self, threads: ThreadPoolExecutor | None, call: Callable[[], _T]) -> _T:
        if threads is None:
            raise NotConnected("the event log is not connected")
        loop = asyncio.get_running_loop()
        if self.lock is None:
            return await loop.run_in_executor(threads, call)
        async with self.lock:
            return await loop.run_in_executor(threads, call)

    async def append(self, items: Sequence[Pending]) -> list[Event]:
        writer = self._writer
        if writer is None:
            raise NotConnected("the event log is not connected")

        def run() -> list[Event]:
            # The driver's connection itself: SQLAlchemy's checkout, begin events and
            # commit cost about as much as storing a small batch.
            pooled = writer.raw_connection()
            try:
                driver: sqlite3.Connection = pooled.driver_connection  # type: ignore[assignment]
                driver.execute("BEGIN IMMEDIATE")  # the write lock up front (see WRITE)
                try:
                    stored = append(driver, items)
                    driver.commit()
                except BaseException:
                    if driver.in_transaction:
                        # The first error is the one to report; the pool rolls back
                        # again on check-in if this fails too.
                        with contextlib.suppress(sqlite3.Error):
                            driver.rollback()
                    raise
                return stored
            finally:
                pooled.close()

        return await self._run(self._write_thread, run)

    async def read(
        self, channel: str, query: Select[Any], max_bytes: int | None, *, descending: bool
    ) -> list[Event]:
        reader = self._reader
        if reader is None:
            raise NotConnected("the event log is not connected")

        return await self._fetch(channel, *compiled(query, reader.dialect), max_bytes)

    async def read_page(
        self, channel: str, start: int, limit: int, max_bytes: int | None
    ) -> list[Event]:
        if self._reader is None:
            raise NotConnected("the event log is not connected")
        values = {"channel": channel, "after": start - 1, "limit": limit}
        sql, params = prepared("page", page_query, self._reader.dialect, values)
        return await self._fetch(channel, sql, params, max_bytes)

    async def _fetch(
        self, channel: str, sql: str, params: tuple[Any, ...], max_bytes: int | None
    ) -> list[Event]:
        reader = self._reader
        if reader is None:
            raise NotConnected("the event log is not connected")

        def run() -> list[Event]:
            with reader.connect() as conn:
                # The driver's own cursor: plain tuples, no SQLAlchemy row per event.
                cursor = conn.connection.driver_connection.execute(sql, params)  # type: ignore[union-attr]
                try:
                    if max_bytes is None:
                        return rows_to_events(channel, cursor)
                    # Rows until their payloads reach the budget (at least one): the
                    # row that passes it shows the caller the page was cut.
                    rows: list[Any] = []
                    total = 0
                    for row in cursor:
                        rows.append(row)
                        total += len(row[4])
                        if total >= max_bytes:
                            break
                    return rows_to_events(channel, rows)
                finally:
                    cursor.close()

        return await self._run(self._read_threads, run)


def _counters(cursor: Cursor, names: Sequence[str]) -> dict[str, list[int]]:
    state: dict[str, list[int]] = {}
    for at in range(0, len(names), _COUNTERS_CHUNK):
        chunk = names[at : at + _COUNTERS_CHUNK]
        sql = _COUNTERS % ", ".join("?" * len(chunk))
        for name, epoch, last_offset, last_timestamp in cursor.execute(sql, chunk):
            state[name] = [epoch, last_offset, last_timestamp]
    return state


def _find_keys(cursor: Cursor, items: Sequence[Pending]) -> dict[tuple[str, str], Event]:
    by_channel: dict[str, set[str]] = {}
    for channel, _, key in items:
        if key is not None:
            by_channel.setdefault(channel, set()).add(key)
    found: dict[tuple[str, str], Event] = {}
    for channel, keys in by_channel.items():
        wanted = sorted(keys)
        for at in range(0, len(wanted), _COUNTERS_CHUNK):
            chunk = wanted[at : at + _COUNTERS_CHUNK]
            sql = _BY_KEYS % ", ".join("?" * len(chunk))
            for event in rows_to_events(channel, cursor.execute(sql, [channel, *chunk])):
                if event.key is not None:  # it is: selected by key
                    found[(channel, event.key)] = event
    return found


def append(conn: sqlite3.Connection, items: Sequence[Pending]) -> list[Event]:
    """Store ``items`` in ``conn``'s write transaction.

    The transaction holds SQLite's write lock from its start (BEGIN IMMEDIATE), so the
    counters read here cannot change before the update: offsets are gap-free across
    processes sharing the file.
    """
    cursor = conn.cursor()
    names = sorted({item.channel for item in items})
    state = _counters(cursor, names)
    missing = [name for name in names if name not in state]
    if missing:
        cursor.executemany(
            _INSERT_CHANNELS, [(name, new_epoch(), 0, 0, 1, None) for name in missing]
        )
        state.update(_counters(cursor, missing))
    seen = _find_keys(cursor, items) if any(item.key is not None for item in items) else {}

    now = now_micros()
    stamps: dict[int, datetime] = {}
    results: list[Event] = []
    rows: list[tuple[Any, ...]] = []
    for channel, message, key in items:
        if key is not None:
            earlier = seen.get((channel, key))
            if earlier is not None:
                results.append(earlier)
                continue
        counter = state[channel]
        counter[1] += 1
        if now > counter[2]:
            counter[2] = now
        epoch, offset, micros = counter
        stamp = stamps.get(micros)
        if stamp is None:
            stamp = stamps[micros] = from_micros(micros)
        is_text = isinstance(message, str)
        payload = message.encode() if isinstance(message, str) else message
        rows.append((channel, offset, epoch, micros, is_text, payload, key))
        event = stored_event(channel, message, offset, stamp, epoch, key)
        if key is not None:
            seen[(channel, key)] = event
        results.append(event)
    if rows:
        cursor.executemany(_INSERT_EVENTS, rows)
        touched = {row[0] for row in rows}
        cursor.executemany(_UPDATE_COUNTER, [(state[n][1], state[n][2], n) for n in touched])
    cursor.close()
    return results
