"""The durable event log: append with gap-free offsets, read by offset or time."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterable, Collection, Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .._errors import ImportConflict, InvalidArgument, LogUnavailable, NotConnected
from .._event import Event, from_micros, to_micros
from .._serial import FORGET_WAIT, Serial
from .._validation import check_int, check_optional_int, check_time
from . import _migrate, _queries
from ._calls import Conflict, append_error, finish_on_cancel, finish_repeatable, translated
from ._consumer_log import ConsumerMethods
from ._engine import (
    MEMORY_URL,
    cannot_open,
    is_memory_sqlite,
    is_memory_uri,
    missing_file,
    normalize_url,
    require_file,
)
from ._info import ChannelInfo, LogTotals, Pending, Retention, RetentionPass
from ._store import Store

logger = logging.getLogger("broadcast_history")

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
# Longest disconnect() waits for calls still running (a stalled database must not
# hold it for ever).
_CALLS_WAIT = 5.0
#: Most attempts an append makes beyond three for its keys' conflicts.
MAX_KEY_RETRIES = 32
#: Offsets asked for in one query by EventLog.read_at (names by channels_named):
#: drivers cap the parameters of a statement.
_OFFSETS_PER_QUERY = 500
#: Channels a retention pass reads at once.
_RETENTION_PAGE = 500
#: Events retention removes in one transaction, at most.
RETENTION_SLICE = 10_000


class EventLog(ConsumerMethods):
    """Durable, append-only store of every published event.

    Reached as ``broadcast.log``; usable alone for admin work. Offsets are allocated
    from a per-channel counter row inside the inserting transaction, so they are
    gap-free and in commit order under any number of writers sharing the database.
    It also keeps the positions and leases of durable consumers (the methods of
    ``ConsumerMethods``: ``acquire_lease``, ``commit_position``, ``consumers``...).

    Args:
        url: SQLAlchemy URL (``sqlite+aiosqlite:///events.db``,
            ``postgresql+asyncpg://host/db``, ``mysql+asyncmy://user@host/db``).
            ``None``: a private in-memory SQLite.
        migrate: Create or upgrade the schema on connect (``True``), only verify it is
            current (``False``, raising :class:`SchemaOutOfDate` otherwise), or create
            it in a database that has none but never upgrade one (``"create"``, what
            the command line's tools do: older processes may run on that schema).
        sqlite_synchronous: SQLite ``PRAGMA synchronous`` for file databases. ``NORMAL``
            (default) survives a crash of the process; ``FULL`` also a power loss.
        must_exist: Raise :class:`LogUnavailable` instead of creating a SQLite file
            that does not exist yet (for tools that only read).
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        migrate: bool | Literal["create"] = True,
        sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL",
        must_exist: bool = False,
    ) -> None:
        level = sqlite_synchronous.upper() if isinstance(sqlite_synchronous, str) else None
        if level not in _SYNCHRONOUS:
            raise InvalidArgument(
                f"sqlite_synchronous must be one of {', '.join(_SYNCHRONOUS)}, "
                f"got {sqlite_synchronous!r}"
            )
        if migrate not in (True, False, "create"):
            raise InvalidArgument(f"migrate must be True, False or 'create', got {migrate!r}")
        #: The database, with its async driver.
        self.url: URL = normalize_url(MEMORY_URL if url is None else url)
        self.migrate: bool | Literal["create"] = migrate
        self.must_exist = must_exist
        self._store = _store_for(self.url, str(level))
        self._log_id: str | None = None
        # Calls running, their callers possibly gone (see finish_on_cancel).
        self._running: set[asyncio.Future[Any]] = set()
        self._serial = Serial()
        # The event loop it was opened in (see _forget_ended_loop).
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def private(self) -> bool:
        """Whether this is an in-memory SQLite database, which only this EventLog
        (in this process) reaches."""
        return is_memory_sqlite(self.url) or is_memory_uri(self.url)

    @property
    def read_timeout(self) -> float | None:
        """Longest a read waits for the database before it raises ``LogUnavailable``
        (Postgres and MySQL: 30 s); ``None`` where reads are not bounded (SQLite)."""
        return self._store.read_timeout

    @property
    def log_id(self) -> str:
        """This log's identity: random, made with its schema, the same for every
        process using the database (only while connected)."""
        if self._log_id is None:
            raise NotConnected("the event log is not connected")
        return self._log_id

    async def connect(self) -> None:
        """Open the database and create, upgrade or check the schema; safe to call
        twice, at once too."""
        async with self._serial():
            await self._forget_ended_loop()
            if self._log_id is None:
                await self._open()

    async def _forget_ended_loop(self) -> bool:
        """Close what an event loop that ended without ``disconnect()`` left open.

        Its calls ended with it; connections that cannot be closed from this loop
        (a server's, bound to the old one) are left to the collector.
        """
        loop = self._loop
        if self._log_id is None or loop is None or not loop.is_closed():
            return False
        self._log_id = None
        self._running.clear()
        try:
            await asyncio.wait_for(self._store.drop(), FORGET_WAIT)
        except Exception as exc:
            logger.debug("closing the log after its event loop ended failed: %r", exc)
        return True

    async def _open(self) -> None:
        if self.must_exist:
            require_file(self.url)
        elif not self.migrate and missing_file(self.url):
            # Opening would create an empty file, which the check then refuses.
            raise _migrate.out_of_date(None)
        store = self._store
        create_only = self.migrate == "create"
        try:
            await store.open()
            # Read first: a current schema needs no write lock, which a stopped
            # writer of another process would hold (SQLite) for 30 s of waiting;
            # nor does one that is only checked (refused at once, newer or older).
            async with store.begin() as conn:
                if self.migrate:
                    current = await _migrate.is_current(conn, create_only=create_only)
                else:
                    await _migrate.check(conn)  # SchemaOutOfDate unless current
                    current = True
                log_id = await _queries.log_id(conn) if current else None
            if not current:
                async with store.begin(write=True) as conn:
                    await _migrate.upgrade(conn, create_only=create_only)
                    log_id = await _queries.log_id(conn)
            if log_id is None:
                raise LogUnavailable("the event log has no identity row: recreate its schema")
        except BaseException as exc:
            await store.close()
            # sqlite3's own errors too: the SQLite store opens its first connection
            # on the driver (a missing directory fails there, not in SQLAlchemy).
            if isinstance(exc, (SQLAlchemyError, OSError, sqlite3.Error)):
                raise cannot_open(self.url, exc) from exc
            raise
        self._log_id = log_id
        self._loop = asyncio.get_running_loop()

    async def disconnect(self) -> None:
        """Close every connection; safe to call twice."""
        # Under the lock connect() takes, decided there: a connect called meanwhile
        # opens after this, and this never closes what a waiting connect reopened.
        async with self._serial():
            if await self._forget_ended_loop() or self._log_id is None:
                return
            self._log_id = None
            if self._running:
                # A read left running by a cancelled subscriber holds a connection:
                # let it end rather than close the pool under it.
                await asyncio.wait(list(self._running), timeout=_CALLS_WAIT)
            await self._store.close()

    # -- writing -------------------------------------------------------------------

    async def append(self, items: Sequence[Pending]) -> list[Event]:
        """Store ``items`` in one transaction and return their events, in order.

        An item whose key was already used on its channel is not stored again: its
        earlier event is returned instead.

        Raises:
            InvalidArgument: The database refused a value (nothing was stored).
            LogUnavailable: The database failed (the batch may or may not be stored
                if the connection died while committing).
        """
        store = self._store
        # A conflict is another writer storing one of the keys (or creating the
        # channel) between our read and our insert: the transaction rolled back, and
        # the next attempt finds its row. Each key can conflict once, so writers
        # racing on many keys get one attempt more per key (three were soon used up),
        # up to a bound: a conflict that is no key race is not retried a thousand times.
        keys = len({(item.channel, item.key) for item in items if item.key is not None})
        attempts = 3 + min(keys, MAX_KEY_RETRIES)
        for attempt in range(attempts):
            try:
                return await store.append(items)
            except (IntegrityError, Conflict) as exc:
                if attempt == attempts - 1:
                    raise LogUnavailable(f"append kept conflicting: {exc!r}") from exc
            except (InvalidArgument, LogUnavailable):
                raise  # already translated by the store
            except (SQLAlchemyError, sqlite3.Error, UnicodeError, OverflowError, OSError) as exc:
                # OverflowError: sqlite3 refused an offset past 64 bits (a full channel).
                raise append_error(exc) from exc
        raise AssertionError("unreachable")

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
            async with translated():
                return await self._store.restore(infos, pages)
        except IntegrityError as exc:
            # A publisher created one of the channels while the import ran.
            raise ImportConflict(
                f"a channel of the import was created meanwhile: {exc.orig}"
            ) from exc

    @finish_repeatable
    async def refuse_existing(self, names: Sequence[str]) -> None:
        """Check that none of the channels ``names`` exists yet, as :meth:`restore` does
        under its write lock: an import fails early, before reading all its input.

        Raises:
            ImportConflict: One of them exists (the message names it).
        """
        await self._store.bounded(self._refuse_existing(names))

    async def _refuse_existing(self, names: Sequence[str]) -> None:
        async with translated(), self._store.begin() as conn:
            await _queries.refuse_existing(conn, names)

    async def trim(
        self, channel: str, *, before: int | None = None, before_time: datetime | None = None
    ) -> int:
        """Remove events with an offset below ``before`` and/or older than ``before_time``.

        Returns:
            The number of events removed.
        """
        before = check_optional_int("before", before)
        before_us = None if before_time is None else _micros(before_time, "before_time")
        return await self._in_slices(channel, before, before_us, None)

    async def _in_slices(
        self,
        channel: str,
        before: int | None,
        before_us: int | None,
        keep: int | None,
        epoch: int | None = None,
    ) -> int:
        """Trim ``channel`` (its incarnation ``epoch``, by default the current one) a
        transaction per ``RETENTION_SLICE`` events: in one, a million-event trim held
        SQLite's write lock for seconds, and every publish waited (past its 30 s busy
        timeout at about ten million). A cancelled trim stops after its slice."""
        if epoch is None:
            info = await self._store.bounded(self._channel(channel))
            if info is None:
                return 0
            epoch = info.epoch
        removed = 0
        while True:
            began = time.monotonic()
            count = await self._trim_slice(channel, before, before_us, keep, epoch)
            removed += count
            if count < RETENTION_SLICE:
                return removed
            # Only between two slices: after a channel's last one, a retention pass
            # over 5,000 small channels paid a pause each (1.3 ms, 6.5 s a pass).
            await self._store.let_writers_in(time.monotonic() - began)

    @finish_on_cancel
    async def _trim_slice(
        self,
        channel: str,
        before: int | None,
        before_us: int | None,
        keep: int | None,
        epoch: int,
    ) -> int:
        # Bounds from the locked row, and only from the incarnation seen first: one
        # deleted and started again between two slices is not this trim's.
        async with translated(), self._store.begin(write=True) as conn:
            return await _queries.trim(
                conn, channel, before, before_us, RETENTION_SLICE, keep=keep, epoch=epoch
            )

    async def apply_retention(self, retention: Retention) -> int:
        """Apply ``retention`` to every channel; returns the number of events removed.

        A transaction per channel and per slice of ``RETENTION_SLICE`` events:
        publishers wait for one slice, not for a backlog of a million rows (seconds
        of SQLite's write lock), and a cancelled pass stops after its slice.
        """
        return (await self.retention_pass(retention)).removed

    async def retention_pass(self, retention: Retention) -> RetentionPass:
        """:meth:`apply_retention`, telling also how long finding the channels due took
        (what a pass costs however little it removes: it reads every channel row)."""
        if retention.max_events is None and retention.max_age is None:
            return RetentionPass(0, 0.0)
        cutoff = None
        if retention.max_age is not None:
            # On the clock that stamped the events: a host whose own clock runs ahead
            # must not remove a shared log's recent history.
            now = await self._clock()
            try:
                cutoff = to_micros(from_micros(now) - retention.max_age)
            except OverflowError:  # an age reaching back before year 1: nothing is older
                if retention.max_events is None:
                    return RetentionPass(0, 0.0)
        removed = 0
        searching = 0.0
        after: str | None = None
        while True:  # a page of channels at a time: memory bounded by the page
            started = time.perf_counter()
            page = await self._retention_page(retention.max_events, cutoff, after)
            searching += time.perf_counter() - started
            for info in page:
                removed += await self._in_slices(
                    info.name, None, cutoff, retention.max_events, info.epoch
                )
            if len(page) < _RETENTION_PAGE:
                return RetentionPass(removed, searching)
            after = page[-1].name

    @finish_on_cancel
    async def _clock(self) -> int:
        async with translated(), self._store.begin() as conn:
            return await _queries.clock(conn)

    @finish_on_cancel
    async def _retention_page(
        self, max_events: int | None, cutoff: int | None, after: str | None
    ) -> list[ChannelInfo]:
        async with translated(), self._store.begin() as conn:
            return await _queries.retention_page(conn, max_events, cutoff, after, _RETENTION_PAGE)

    async def delete_channel(self, channel: str) -> bool:
        """Delete a channel and its history; its next use starts a new epoch.

        Returns:
            Whether the channel existed.
        """
        # Its events first, in slices (see _in_slices); then what was appended
        # meanwhile and the channel row, in one short transaction.
        await self._in_slices(channel, None, None, 0)
        return await self._delete_channel(channel)

    @finish_on_cancel
    async def _delete_channel(self, channel: str) -> bool:
        async with translated(), self._store.begin(write=True) as conn:
            return await _queries.delete_channel(conn, channel)

    # -- reading -------------------------------------------------------------------

    @finish_repeatable
    async def channel(self, name: str) -> ChannelInfo | None:
        """State of channel ``name``, or ``None`` if it has no history."""
        return await self._store.bounded(self._channel(name))

    async def _channel(self, name: str) -> ChannelInfo | None:
        async with translated(), self._store.begin() as conn:
            return await _queries.channel(conn, name)

    @finish_repeatable
    async def channels_named(self, names: Collection[str]) -> dict[str, ChannelInfo]:
        """State of the channels of ``names`` that have history, by name (one query
        per 500 names)."""
        wanted = sorted(set(names))
        found: dict[str, ChannelInfo] = {}
        for at in range(0, len(wanted), _OFFSETS_PER_QUERY):
            found.update(
                await self._store.bounded(self._named(wanted[at : at + _OFFSETS_PER_QUERY]))
            )
        return found

    async def _named(self, names: list[str]) -> dict[str, ChannelInfo]:
        async with translated(), self._store.begin() as conn:
            return {info.name: info for info in await _queries.channels_named(conn, names)}

    @finish_repeatable
    async def channels(
        self, *, prefix: str | None = None, after: str | None = None, limit: int = 100
    ) -> list[ChannelInfo]:
        """Channels in name order, optionally those starting with ``prefix``.

        Args:
            prefix: Only names starting with it.
            after: Only names sorting after it (the cursor of the previous page).
            limit: Page size.
        """
        check_int("limit", limit)
        async with translated(), self._store.begin() as conn:
            return await _queries.channel_page(conn, prefix, after, limit)

    @finish_repeatable
    async def totals(self) -> LogTotals:
        """How much the whole log holds: channels, events, trimmed events, times."""
        async with translated(), self._store.begin() as conn:
            return await _queries.totals(conn)

    @finish_repeatable
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
        after = check_optional_int("after", after)
        if since is not None and not isinstance(since, datetime):
            if after is not None:
                raise InvalidArgument("give after or an offset since, not both")
            after, since = check_int("since", since), None
        query = _queries.events_query(
            channel,
            after=after,
            before=check_optional_int("before", before),
            since_us=None if since is None else _micros(since, "since"),
            until_us=None if until is None else _micros(until, "until"),
            limit=check_int("limit", limit),
            descending=order == "desc",
            time_marks=_queries.sparse_time_index(self.url.get_backend_name()),
        )
        max_bytes = check_optional_int("max_bytes", max_bytes, minimum=1)
        async with translated():
            return await self._store.read(channel, query, max_bytes, descending=order == "desc")

    @finish_repeatable
    async def read_from(
        self,
        channel: str,
        start: int,
        limit: int,
        max_bytes: int | None = None,
        *,
        ahead: object = None,
    ) -> list[Event]:
        """Up to ``limit`` events of ``channel`` from offset ``start`` on, ascending.

        With ``max_bytes``, as :meth:`read`: cut once the payloads reach or pass it.
        With ``ahead`` (whoever will ask for the page after this one, and nobody
        else), a log that reads on the event loop (Postgres, MySQL) asks for that page
        now; only a call with the same ``ahead`` gets it.
        """
        async with translated():
            return await self._store.read_page(channel, start, limit, max_bytes, ahead)

    @finish_repeatable
    async def read_at(self, channel: str, offsets: Sequence[int]) -> list[Event]:
        """The events of ``channel`` stored at ``offsets``, in offset order (one query
        per 500 distinct offsets: drivers cap the parameters of a statement)."""
        wanted = sorted({check_int("offset", offset) for offset in offsets})
        found: list[Event] = []
        async with translated():
            for at in range(0, len(wanted), _OFFSETS_PER_QUERY):
                query = _queries.at_offsets_query(channel, wanted[at : at + _OFFSETS_PER_QUERY])
                found += await self._store.read(channel, query, None, descending=False)
        return found

    async def get(self, channel: str, offset: int) -> Event | None:
        """The event at ``offset`` of ``channel``, if stored."""
        check_int("offset", offset)
        page = await self.read(channel, after=offset - 1 if offset else None, limit=1)
        return page[0] if page and page[0].offset == offset else None

    @finish_repeatable
    async def offset_at(self, channel: str, moment: datetime) -> int | None:
        """Offset of the first stored event at or after ``moment``, if any."""
        micros = _micros(moment, "moment")
        return await self._store.bounded(self._offset_at(channel, micros))

    async def _offset_at(self, channel: str, micros: int) -> int | None:
        async with translated(), self._store.begin() as conn:
            return await _queries.offset_at(conn, channel, micros)


def _micros(moment: datetime, name: str) -> int:
    return to_micros(check_time(name, moment))


def _store_for(url: URL, synchronous: str) -> Store:
    if url.get_backend_name() == "sqlite":
        from ._sqlite import SqliteStore

        return SqliteStore(url, memory=is_memory_sqlite(url), synchronous=synchronous)
    if url.get_backend_name() == "mysql":
        from ._mysql import MySQLStore

        return MySQLStore(url)
    try:
        from ._postgres import PostgresStore
    except ModuleNotFoundError as exc:
        if exc.name != "asyncpg":
            raise
        raise ImportError(
            "a postgresql+asyncpg:// event log needs 'asyncpg': "
            "pip install 'broadcast-history[postgres]'"
        ) from exc
    return PostgresStore(url)
