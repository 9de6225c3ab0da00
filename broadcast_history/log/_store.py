"""What every database behind the log provides; one subclass per database.

A store owns the engines and threads of one database and the two paths that differ
between databases: appending a batch and reading a byte-bounded page. Everything
else runs the shared queries of ``_queries`` in a connection from :meth:`begin`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._errors import BroadcastError, LogUnavailable, NotConnected
from .._event import Event
from . import _calls, _queries
from ._engine import WRITE, FreshConnections
from ._info import ChannelInfo, Pending

_T = TypeVar("_T")


class Store:
    """One database's engines and its append and read paths."""

    def __init__(self) -> None:
        self._engine: AsyncEngine | None = None
        # A database that is one shared connection (in-memory SQLite): serialize its use.
        self.lock: asyncio.Lock | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise NotConnected("the event log is not connected")
        return self._engine

    async def open(self) -> None:
        """Create the engines (and threads); no query runs yet."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close every connection and thread."""
        raise NotImplementedError

    async def drop(self) -> None:
        """Let go of connections opened in an event loop that has ended."""
        await self.close()

    @asynccontextmanager
    async def begin(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction; ``write`` takes SQLite's write lock up front."""
        engine = self.engine
        if self.lock is not None:
            await self.lock.acquire()
        try:
            async with engine.connect() as conn:
                if write:
                    await conn.execution_options(**WRITE)
                async with conn.begin():
                    yield conn
        finally:
            if self.lock is not None:
                self.lock.release()

    async def restore(
        self, infos: Sequence[ChannelInfo], pages: AsyncIterable[Sequence[Event]]
    ) -> int:
        """Store exported channels and their events in one write transaction (see
        :meth:`EventLog.restore <broadcast_history.EventLog.restore>`)."""
        async with self.begin(write=True) as conn:
            return await _queries.restore(conn, infos, pages)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection whose statements commit one by one, for lease statements.

        A lease statement is atomic by itself. Inside a transaction, a holder paused
        between its statement and COMMIT (SIGSTOP, a debugger) would keep the row
        locked and block the standby meant to take over. This default, a write
        transaction, is for SQLite, whose processes share one host and one lock.
        """
        async with self.begin(write=True) as conn:
            yield conn

    @property
    def read_timeout(self) -> float | None:
        """Longest a read waits for the database (``None``: not bounded)."""
        return None

    async def bounded(self, read: Awaitable[_T], what: str = "a read") -> _T:
        """``read``, failing past ``READ_TIMEOUT`` where the store bounds its reads
        (Postgres, MySQL); elsewhere awaited as it is. ``what`` names it in the error."""
        return await read

    async def append(self, items: Sequence[Pending]) -> list[Event]:
        """Store ``items`` in one transaction (see ``EventLog.append``)."""
        raise NotImplementedError

    async def read(
        self, channel: str, query: Select[Any], max_bytes: int | None, *, descending: bool
    ) -> list[Event]:
        """The events ``query`` selects, cut after ``max_bytes`` of payload if given."""
        raise NotImplementedError

    async def let_writers_in(self, held: float) -> None:
        """Between two transactions of a long removal (a trim, a delete, a retention
        pass), the last of which wrote for ``held`` seconds. Nothing to do here: a
        database server locks rows, and publishes to other channels go on meanwhile."""

    async def read_page(
        self, channel: str, start: int, limit: int, max_bytes: int | None, ahead: object = None
    ) -> list[Event]:
        """A replay page: ``limit`` events from offset ``start`` on, ascending, cut
        after ``max_bytes`` of payload if given (the hot path of replay). ``ahead``:
        see :meth:`EventLog.read_from <broadcast_history.EventLog.read_from>`."""
        raise NotImplementedError


class ServerStore(Store):
    """A database server reached over the network (Postgres, MySQL): its reads are
    bounded, and a read without an answer retires the connections opened before it
    (see :class:`FreshConnections`)."""

    def __init__(self) -> None:
        super().__init__()
        #: Applied to each engine the store creates (``fresh.watch(engine)``).
        self.fresh = FreshConnections()

    @property
    def read_timeout(self) -> float:
        return _calls.READ_TIMEOUT  # read each time: tests shorten it

    async def bounded(self, read: Awaitable[_T], what: str = "a read") -> _T:
        began = time.monotonic()
        try:
            return await _calls.bounded_read(read, what)
        except LogUnavailable as exc:
            if _calls.timed_out(exc):
                self.gave_up(began)
            raise

    def gave_up(self, since: float) -> None:
        """A read begun at ``since`` got no answer: the other connections opened over
        the same path likely went silent too, and each would fail a read after the
        bound in turn."""
        self.fresh.renew(since)


@asynccontextmanager
async def discarding_broken(conn: AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """Yield ``conn`` (an autocommit connection); discard it if a statement failed.

    No ROLLBACK runs when an autocommit connection goes back to the pool, so one
    broken mid-statement (killed, or still busy after a cancel) would be handed out
    again: it is invalidated instead. Our own errors are raised between statements
    and leave the connection fine.
    """
    try:
        yield conn
    except BroadcastError:
        raise
    except BaseException:
        await conn.invalidate()
        raise
