"""The SQLite store: appends and event reads on sqlite3 itself, in one hop to a thread
or (a moderate batch) on the event loop.

Through aiosqlite every statement is a round trip to the driver's thread, and a batch
needs five (BEGIN, read counters, insert, update counters, COMMIT). Running the batch
as one synchronous function on a dedicated writer thread pays a single hop instead,
which is what makes group commit on SQLite fast. Event reads do the same on reader
threads, which also lets them stop after a byte budget: SQLite steps one row at a
time, so a page of large events is cut before the rest of it is read from disk.
The async engine (aiosqlite) serves migrations and the shared queries.

Batches of moderate size are the exception: with ``synchronous`` OFF or NORMAL they
are committed on the event loop itself, on a connection that never waits for the write
lock (if another connection holds it, the batch goes to the writer thread). For a lone
event, the hop to the writer thread and back costs several times its commit (a WAL
commit that does not sync writes a few pages to the OS). For a batch of many
publishers, handing it to the thread does not let the loop get on meanwhile: the
driver gives the GIL up around every SQLite step (a row inserted, a counter updated)
and gets it back only when the loop sleeps or after the interpreter's switch interval,
so the two threads take turns, and each turn costs a wake-up. Large batches, whose
commit would hold the loop for more than a millisecond or two, go to the thread, and
so does all but a small batch while events are being read, or after a commit on the
loop was slow (the loop would wait for the GIL at every step of its commit on threads
running Python). Whatever syncs the disk stays on the writer thread: the store
checkpoints the WAL there itself (neither connection does on its own) while commits go
on, then the next batch goes there to copy what they added with nothing committed
meanwhile, and the commit after that, which starts the WAL over and syncs its header,
goes there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from sqlite3 import Cursor
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, bindparam, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import PoolProxiedConnection

from .._errors import LogUnavailable, NotConnected
from .._event import Event, from_micros, stored_event
from . import _queries
from ._engine import (
    WAL_CHECKPOINT_PAGES,
    WRITE,
    create_engine,
    create_sync_engine,
    shared_memory_url,
)
from ._info import ChannelInfo, Pending
from ._queries import page_query
from ._rows import (
    EVENT_COLUMNS,
    SQLITE_INSERT_EVENTS,
    compiled,
    new_epoch,
    now_micros,
    prepared,
    rows_to_events,
)
from ._schema import channels, events
from ._shapes import padded
from ._store import Store

_T = TypeVar("_T")
logger = logging.getLogger("broadcast_history")
# An import's events, before they are copied into the events table (see restore).
_COLUMNS = ", ".join(f'"{column.name}"' for column in events.c)
_STAGE_CREATE = f"CREATE TEMP TABLE bh_import AS SELECT {_COLUMNS} FROM main.{events.name} WHERE 0"
_STAGE_INSERT = f"INSERT INTO temp.bh_import ({_COLUMNS}) VALUES ({', '.join('?' * len(events.c))})"
_STAGE_COPY = f"INSERT INTO main.{events.name} ({_COLUMNS}) SELECT {_COLUMNS} FROM temp.bh_import"
#: Longest pause between two transactions of a long removal (see let_writers_in).
LET_IN_MAX = 0.05
#: Largest batch committed on the event loop (see the module's docstring): events and
#: payload size (characters of a text). 128 events over 100 channels commit in about
#: 1.5 ms here, about as long as a loop may stall; larger batches go to the thread.
INLINE_MAX_EVENTS = 128
INLINE_MAX_BYTES = 64 * 1024
#: The same while event reads are under way, or for a while after a commit on the
#: loop was slow: the loop's commit gives the GIL up at every SQLite step and waits to
#: get it back from whatever thread runs Python meanwhile (reader threads, or the
#: application's), so it holds the loop far longer than it takes.
INLINE_MAX_EVENTS_BUSY = 8
#: A commit on the loop that took longer than this starts INLINE_BUSY_SECONDS of
#: the smaller limit.
INLINE_SLOW_SECONDS = 0.005
INLINE_BUSY_SECONDS = 1.0
# SQLite's result codes for a lock held by another connection (the primary code is
# the low byte of an extended one).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
# The append's statements, compiled once to SQLite's SQL: the writer runs them on the
# driver's cursor, with tuples, without SQLAlchemy's per-statement work.
_DIALECT = sqlite_dialect(paramstyle="qmark")
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
#: Most channels whose counters a store keeps between commits (see Counters).
COUNTERS_KEPT = 10_000
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


class Counters:
    """The channel counters as this store's last commit on one connection left them.

    Over 100 channels, reading a batch's ~64 counter rows took 0.08 ms of a 0.68 ms
    commit. SQLite's ``PRAGMA data_version`` on a connection changes when another
    connection commits to the file (another process, the store's other writing
    connection, the admin's trims and deletes), never for the connection's own
    commits: read after ``BEGIN IMMEDIATE``, with the write lock held, an unchanged
    value means no counter moved since this connection's last commit. The in-memory
    log keeps none: left out to be safe, not for a measured reason (its connections
    share one cache, and it is not the log that many channels run on).
    """

    def __init__(self) -> None:
        # (connection, its data_version, counters by channel), or None; one attribute,
        # set at once, as the loop and the writer thread may each commit.
        self.kept: tuple[sqlite3.Connection, int, dict[str, list[int]]] | None = None

    def take(self, conn: sqlite3.Connection) -> tuple[int, dict[str, list[int]]]:
        """``conn``'s data_version and the counters still current for it (often none);
        forgotten until :meth:`keep`, as the commit advances them in place."""
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        kept, self.kept = self.kept, None
        if kept is None or kept[0] is not conn or kept[1] != version:
            return version, {}
        return version, kept[2] if len(kept[2]) < COUNTERS_KEPT else {}

    def keep(self, conn: sqlite3.Connection, version: int, state: dict[str, list[int]]) -> None:
        """What a successful commit on ``conn`` left."""
        self.kept = (conn, version, state)


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
        # The connection that commits small batches on the event loop, if any.
        self._inline_engine: Engine | None = None
        self._inline: PoolProxiedConnection | None = None
        # WAL pages written since the last checkpoint (estimated, see _wal_pages);
        # a checkpoint under way; the next commit starts the WAL over.
        self._wal_pages = 0
        self._checkpointing = False
        self._restart_pending = True
        # A copy of the WAL under way beside commits; one that commits overlapped, so
        # the next batch finishes it (see append).
        self._copying: Future[None] | None = None
        self._finish_pending = False
        # Commits by this store: one since a copy began means the copy left frames.
        self._commits = 0
        self._copy_commits = 0
        # A read transaction held open while a copy runs (see _start_copy).
        self._guard: PoolProxiedConnection | None = None
        # Event reads queued or under way on the reader threads; until when (monotonic)
        # only small batches commit on the loop.
        self._reads = 0
        self._busy_until = 0.0
        self._counters: Counters | None = None

    async def open(self) -> None:
        memory, sync = self._memory, self._synchronous
        # Several engines must reach the same in-memory database: name it.
        url = shared_memory_url(self._url) if memory else self._url
        self._engine = create_engine(url, memory=memory, sqlite_synchronous=sync)
        self._writer = create_sync_engine(
            url, memory=memory, sqlite_synchronous=sync, checkpoints=False
        )
        self._reader = create_sync_engine(
            url, memory=memory, sqlite_synchronous=sync, single=memory
        )
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="broadcast-history-write")
        self._read_threads = ThreadPoolExecutor(2, thread_name_prefix="broadcast-history-read")
        self.lock = asyncio.Lock() if memory else None
        self._wal_pages, self._checkpointing, self._restart_pending = 0, False, True
        self._copying, self._finish_pending = None, False
        self._counters = None if memory else Counters()
        if not memory and sync in ("OFF", "NORMAL"):
            # FULL and EXTRA sync the disk at every commit: never on the event loop.
            self._inline_engine = create_sync_engine(
                url, sqlite_synchronous=sync, checkpoints=False
            )
            loop = asyncio.get_running_loop()
            self._inline = await loop.run_in_executor(
                self._write_thread, _open_inline, self._inline_engine
            )
            self._guard = await loop.run_in_executor(self._write_thread, _open_guard, self._reader)

    async def close(self) -> None:
        # Detach first: a call made while closing finds no threads (NotConnected)
        # instead of queueing work on an executor about to shut down.
        engine, writer, reader = self._engine, self._writer, self._reader
        inline, inline_engine, guard = self._inline, self._inline_engine, self._guard
        self._guard, self._copying = None, None
        threads = (self._write_thread, self._read_threads)
        self._engine = self._writer = self._reader = self._inline_engine = None
        self._inline = None
        self._write_thread = self._read_threads = None
        if self.lock is not None and engine is not None:
            # Let a call still using the single in-memory connection finish first.
            async with self.lock:
                pass
        for pool in threads:
            if pool is not None:
                pool.shutdown(wait=True)
        for connection in (inline, guard):
            if connection is not None:
                connection.close()
        for sync in (writer, reader, inline_engine):
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

    async def restore(
        self, infos: Sequence[ChannelInfo], pages: AsyncIterable[Sequence[Event]]
    ) -> int:
        """Store an import's events in a temporary table of its connection first, then
        copy them over in one write transaction.

        The write lock is the whole file's: held while every page was stored, it kept
        every publisher waiting (5 s per million events, and a publish gives up after
        30 s). Filling the temporary table takes no lock on the file; the copy is one
        statement that SQLite runs by itself (2.2 s per million of 100 bytes, against
        6.8 s to insert them page by page).
        """
        if self.lock is not None or (self._url.database or "").startswith("file:"):
            # Staged for a plain path only. In memory (a private database, or a URI's
            # mode=memory or vfs=memdb) there is no file to lock, and this connection
            # may be the database's only one: closing it (below) would throw it away.
            return await super().restore(infos, pages)
        async with self.engine.connect() as conn:
            try:
                async with conn.begin():
                    await conn.exec_driver_sql(_STAGE_CREATE)
                # Deferred, and writing the temporary database only: no lock on the
                # file, nor a snapshot of it that would keep its WAL from starting over.
                try:
                    async with conn.begin():
                        stored = await _queries.insert_pages(conn, pages, _STAGE_INSERT)
                except OperationalError as exc:
                    raise LogUnavailable(
                        "staging the import's events failed (is SQLite's temporary "
                        "directory full or not writable? $SQLITE_TMPDIR, else $TMPDIR, "
                        f"else /var/tmp, /usr/tmp, /tmp): {exc.orig}; nothing was imported"
                    ) from exc
                await conn.execution_options(**WRITE)
                async with conn.begin():
                    await _queries.restore_channels(conn, infos)
                    await _queries.to_its_end(conn.exec_driver_sql(_STAGE_COPY))
            finally:
                # Its temporary table (and the file under it) go with the connection,
                # whatever happened: no DROP that a cancellation could cut short.
                await conn.invalidate()
        return stored

    async def append(self, items: Sequence[Pending]) -> list[Event]:
        writer = self._writer
        if writer is None:
            raise NotConnected("the event log is not connected")
        if not self._memory:
            self._wal_pages += _wal_pages(items)
        # After a copy of the WAL that commits overlapped (see _start_copy), this batch
        # goes to the writer thread and copies what they added right after committing,
        # with nothing committed meanwhile: only a fully copied WAL starts over from its
        # beginning (else it grows for ever).
        self._poll_copy()
        finish = self._finish_pending
        # A copy whose thread waits for the GIL behind a busy loop can take a while:
        # once the WAL has grown by as much again, batches wait for it on the writer
        # thread, so the WAL stays within about twice WAL_CHECKPOINT_PAGES.
        overdue = self._copying is not None and self._wal_pages >= WAL_CHECKPOINT_PAGES
        inline = self._inline
        if (
            inline is not None
            and not (finish or overdue or self._checkpointing or self._restart_pending)
            and _small(items, self._inline_max_events())
        ):
            began = time.perf_counter()
            stored = self._append_inline(inline, items)
            if time.perf_counter() - began > INLINE_SLOW_SECONDS:
                self._busy_until = time.monotonic() + INLINE_BUSY_SECONDS
            if stored is not None:
                self._commits += 1
                self._start_copy()
                return stored

        counters = self._counters

        def run() -> list[Event]:
            # The driver's connection itself: SQLAlchemy's checkout, begin events and
            # commit cost about as much as storing a small batch.
            pooled = writer.raw_connection()
            try:
                driver: sqlite3.Connection = pooled.driver_connection  # type: ignore[assignment]
                stored = commit(driver, items, counters)
                if finish:
                    _checkpoint(driver)
                return stored
            finally:
                pooled.close()

        if finish:
            self._finish_pending, self._checkpointing = False, True
        try:
            stored = await self._run(self._write_thread, run)
        except BaseException:
            if finish:
                self._finish_pending = True  # not committed: the next batch finishes
            raise
        finally:
            if finish:
                self._checkpointing = False
        self._commits += 1
        if finish:
            self._wal_pages = 0  # what was added during the copy is copied now
        # The commit after a checkpoint starts the WAL over: on this thread too.
        self._restart_pending = finish
        self._start_copy()
        return stored

    async def let_writers_in(self, held: float) -> None:
        """SQLite has one write lock for the whole file, and a writer that finds it
        taken sleeps and tries again (SQLite's busy handler: 1 ms, then longer, up to
        100 ms between tries), while a removal starts its next transaction at once:
        a publish could wait out a removal's many transactions (another process's
        publisher, every 10 ms during a 1M-event trim: up to 0.8 s of its 1 s; 10-19
        ms with this). This process's appends that queued for the lock meanwhile
        commit now, before the next transaction."""
        write_thread = self._write_thread
        if write_thread is not None:
            # The writer thread runs its calls in turn: this one ends after every
            # batch queued before it.
            await asyncio.get_running_loop().run_in_executor(write_thread, int)
        # Other processes' writers cannot be waited for: the lock stays free for half
        # as long as it was held (a 1M-event trim 1.0-1.35 s -> 1.5-1.9 s).
        await asyncio.sleep(min(held / 2, LET_IN_MAX))

    def _start_copy(self) -> None:
        """Once the WAL holds WAL_CHECKPOINT_PAGES, copy it to the database file on the
        writer thread while commits go on (the copy and its syncs took 9-23 ms here,
        which the group commit used to wait out).

        A commit that finds the WAL fully copied starts it over, and that syncs: not
        on the loop. So a read transaction (the guard) is opened first and held until
        the loop has seen the copy end (_poll_copy): while a reader uses the WAL,
        SQLite does not start it over, and the copy still copies every frame the
        guard can see.
        """
        write_thread, writer = self._write_thread, self._writer
        if (
            self._wal_pages < WAL_CHECKPOINT_PAGES
            or self._copying is not None
            or self._finish_pending
            or write_thread is None
            or writer is None
        ):
            return
        guard = self._guard
        if guard is not None and not _hold(guard):
            return  # the file is busy: try again after the next commit
        self._wal_pages, self._copy_commits = 0, self._commits

        def copy() -> None:
            pooled = writer.raw_connection()
            try:
                _checkpoint(pooled.driver_connection)  # type: ignore[arg-type]
            finally:
                pooled.close()

        self._copying = write_thread.submit(copy)

    def _poll_copy(self) -> None:
        """If the copy ended, let the guard go and say what the next commits do."""
        copying = self._copying
        if copying is None or not copying.done():
            return
        self._copying = None
        if self._guard is not None:
            _let_go(self._guard)
        if self._commits == self._copy_commits:
            # Nothing was committed since the copy began: the next commit starts the
            # WAL over (on the writer thread). The store's own commits only: another
            # process's would leave the WAL short, and a later copy catches up.
            self._restart_pending = True
        else:
            self._finish_pending = True

    def _inline_max_events(self) -> int:
        if self._reads or time.monotonic() < self._busy_until:
            return INLINE_MAX_EVENTS_BUSY
        return INLINE_MAX_EVENTS

    def _append_inline(
        self, inline: PoolProxiedConnection, items: Sequence[Pending]
    ) -> list[Event] | None:
        """Commit ``items`` on the event loop; ``None`` if another connection writes."""
        driver: sqlite3.Connection = inline.driver_connection  # type: ignore[assignment]
        try:
            return commit(driver, items, self._counters)
        except BaseException as exc:
            if driver.in_transaction:
                # The rollback failed too: the connection would hold the write lock for
                # good. Commits go to the writer thread from now on.
                self._inline = None
                inline.invalidate()
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                return None  # rolled back: the writer thread waits for its turn
            raise

    async def read(
        self, channel: str, query: Select[Any], max_bytes: int | None, *, descending: bool
    ) -> list[Event]:
        reader = self._reader
        if reader is None:
            raise NotConnected("the event log is not connected")

        return await self._fetch(channel, *compiled(query, reader.dialect), max_bytes)

    async def read_page(
        self, channel: str, start: int, limit: int, max_bytes: int | None, ahead: object = None
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

        self._reads += 1
        try:
            return await self._run(self._read_threads, run)
        finally:
            self._reads -= 1


def _counters(cursor: Cursor, names: Sequence[str]) -> dict[str, list[int]]:
    state: dict[str, list[int]] = {}
    for at in range(0, len(names), _COUNTERS_CHUNK):
        chunk = padded(names[at : at + _COUNTERS_CHUNK])
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
            chunk = padded(wanted[at : at + _COUNTERS_CHUNK])
            sql = _BY_KEYS % ", ".join("?" * len(chunk))
            for event in rows_to_events(channel, cursor.execute(sql, [channel, *chunk])):
                if event.key is not None:  # it is: selected by key
                    found[(channel, event.key)] = event
    return found


def _open_inline(engine: Engine) -> PoolProxiedConnection:
    """The connection for inline commits (its engine never checkpoints): it never
    waits for the write lock either."""
    pooled = engine.raw_connection()
    driver = pooled.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    driver.execute("PRAGMA busy_timeout=0")
    return pooled


def _open_guard(reader: Engine) -> PoolProxiedConnection:
    """The connection whose read transaction holds the WAL while it is copied."""
    pooled = reader.raw_connection()
    driver = pooled.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    driver.execute("PRAGMA busy_timeout=0")  # used on the loop: never wait there
    return pooled


def _hold(guard: PoolProxiedConnection) -> bool:
    """Open a read transaction on ``guard``; ``False`` if the file was busy."""
    driver: sqlite3.Connection = guard.driver_connection  # type: ignore[assignment]
    try:
        driver.execute("BEGIN")
        # The first read takes the snapshot: it marks the WAL as in use.
        driver.execute("SELECT 1 FROM broadcast_channels LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        _let_go(guard)
        return False
    return True


def _let_go(guard: PoolProxiedConnection) -> None:
    driver: sqlite3.Connection = guard.driver_connection  # type: ignore[assignment]
    if driver.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            driver.rollback()


def _checkpoint(driver: sqlite3.Connection) -> None:
    """Copy the WAL into the database file as far as readers allow (PASSIVE: waits
    for nobody). A failure is logged, not raised: the events are stored, and the
    next copy tries again."""
    try:
        driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:
        logger.warning("checkpoint of the SQLite WAL failed: %s", exc)


def _wal_pages(items: Sequence[Pending]) -> int:
    """About how many WAL pages committing ``items`` writes: a leaf per channel plus
    the rows' bytes, twice over (measured with 2 KiB pages: 3.4 for one event, 13 for
    64 of one channel, 63 for 64 over 64 channels, 170 for 500 over 100)."""
    channels = len({item.channel for item in items})
    size = sum(len(item.message) for item in items) + 64 * len(items)
    return 3 + channels + size // 1024


def _small(items: Sequence[Pending], max_events: int) -> bool:
    if len(items) > max_events:
        return False
    return sum(len(item.message) for item in items) <= INLINE_MAX_BYTES


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is None:
        return "locked" in str(exc)
    return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


def commit(
    conn: sqlite3.Connection, items: Sequence[Pending], counters: Counters | None = None
) -> list[Event]:
    """Store ``items`` in a transaction of their own on ``conn`` and commit it.

    ``counters``: what the last commit on ``conn`` left, kept up to date (see
    :class:`Counters`).
    """
    conn.execute("BEGIN IMMEDIATE")  # the write lock up front (see WRITE)
    try:
        version, known = counters.take(conn) if counters is not None else (0, {})
        stored = append(conn, items, known)
        conn.commit()
        if counters is not None:
            counters.keep(conn, version, known)
    except BaseException:
        if conn.in_transaction:
            # The first error is the one to report; the pool rolls back again on
            # check-in if this fails too.
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
        raise
    return stored


def append(
    conn: sqlite3.Connection, items: Sequence[Pending], state: dict[str, list[int]] | None = None
) -> list[Event]:
    """Store ``items`` in ``conn``'s write transaction.

    The transaction holds SQLite's write lock from its start (BEGIN IMMEDIATE), so the
    counters read here cannot change before the update: offsets are gap-free across
    processes sharing the file. ``state``: counters known to be current (by channel:
    epoch, last offset, last timestamp); the others are read into it, and all of the
    batch's are advanced in it.
    """
    cursor = conn.cursor()
    if state is None:
        state = {}
    names = sorted({item.channel for item in items})
    unknown = [name for name in names if name not in state]
    if unknown:
        state.update(_counters(cursor, unknown))
    missing = [name for name in unknown if name not in state]
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
        cursor.executemany(SQLITE_INSERT_EVENTS, rows)
        touched = {row[0] for row in rows}
        cursor.executemany(_UPDATE_COUNTER, [(state[n][1], state[n][2], n) for n in touched])
    cursor.close()
    return results
