"""Postgres connections kept checked out for the statements run on asyncpg itself.

Appends and replay pages run one statement each on the asyncpg connection under a
pooled SQLAlchemy connection. Checking that connection out of the async pool and
back costs about 170 us of CPU on the event loop (three greenlet switches and the
pool's events), more than a sixth of a lone append's latency and a noticeable share
of every batch. Those statements take a connection from here instead: it comes back
after a statement that succeeded (up to ``keep`` of them wait here, the rest go back
to the pool), and one that failed is discarded, as the pool would not know to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._errors import NotConnected
from ._calls import never_sent, unreachable

T = TypeVar("T")

#: Longest close() waits for calls still running before it ends their connections.
BUSY_WAIT = 2.0


class KeptConnections:
    """Up to ``keep`` idle connections of ``engine``'s pool, held for driver calls."""

    def __init__(self, engine: AsyncEngine, keep: int) -> None:
        self._engine = engine
        self._keep = keep
        self._idle: list[tuple[AsyncConnection, asyncpg.Connection]] = []
        # Drivers of the calls running now (see close).
        self._busy: set[asyncpg.Connection] = set()
        self._none_busy = asyncio.Event()
        self._closed = False
        # A call taken out before then is not kept (see drop_idle).
        self._since = float("-inf")

    async def run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``operation`` on a connection's asyncpg driver.

        A connection that failed is discarded: asyncpg's errors bypass SQLAlchemy's
        disconnect handling, and a connection the server terminated mid-statement
        (or one still busy after a cancel) would fail the next call. One the server
        terminated while it sat idle can be taken before its socket's end is read:
        asyncpg then refuses the first statement with ``InternalClientError`` before
        sending it, so that one attempt is repeated on a fresh connection.
        """
        for attempt in (1, 2):
            try:
                conn, driver = await self._take()
            except NotConnected:
                raise
            except Exception as exc:  # nothing was sent: an append failed for sure
                raise unreachable(exc) from exc
            taken = time.monotonic()
            self._busy.add(driver)
            self._none_busy.clear()
            try:
                result = await operation(driver)
            except asyncpg.UniqueViolationError:
                await self._give(conn, driver, taken)  # refused by the server: it is fine
                raise
            except asyncpg.InternalClientError as exc:
                await _discard(conn)
                # asyncpg raises this class after a statement ran too: only a refusal
                # before sending is safe to repeat (an append would be stored twice).
                if attempt == 2 or not never_sent(exc):
                    raise
                continue
            except BaseException:
                await _discard(conn)
                raise
            finally:
                self._busy.discard(driver)
                if not self._busy:
                    self._none_busy.set()
            await self._give(conn, driver, taken)
            return result
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the idle connections; end those still in use.

        The store closes once the log's calls ended or were given up on (a server gone
        silent holds them): past :data:`BUSY_WAIT`, their sockets are closed, so those
        calls fail at once instead of waiting for the server, or for their
        cancellation to reach it.
        """
        self._closed = True
        try:
            # A call the log does not wait for (an append of an EventLog used
            # directly) may be about to end: a moment for it first.
            if self._busy:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._none_busy.wait(), BUSY_WAIT)
        except BaseException:  # cancelled meanwhile: close the idle ones' sockets too
            for _, driver in self._idle:
                driver.terminate()
            self._idle = []
            raise
        finally:
            for driver in list(self._busy):
                driver.terminate()
        idle, self._idle = self._idle, []
        while idle:
            conn, driver = idle.pop()
            try:
                await _discard(conn)
            except BaseException:
                # Failed or cancelled: close the sockets of this one and the rest.
                for _, left in [(conn, driver), *idle]:
                    left.terminate()
                raise

    def drop_idle(self, since: float) -> None:
        """Close the idle connections' sockets: a read begun at ``since``
        (``time.monotonic()``) got no answer, and the others opened over the same
        network path likely went silent too; each would fail a read once. No goodbye
        (a silent server would not answer it); their pool entries are invalidated in
        the background. Those in use since before ``since`` are not kept either when
        their call ends: an answer sent before the path went silent can arrive after
        that read began."""
        self._since = max(self._since, since)
        idle, self._idle = self._idle, []
        for conn, driver in idle:
            driver.terminate()
            task = asyncio.ensure_future(_discard(conn))  # quick: the socket is closed
            task.add_done_callback(_ignore_failure)

    async def _take(self) -> tuple[AsyncConnection, asyncpg.Connection]:
        if self._closed:
            raise NotConnected("the event log is not connected")
        while self._idle:
            conn, driver = self._idle.pop()
            if not driver.is_closed():
                return conn, driver
            await _discard(conn)  # closed by the server while it waited here
        conn = await self._engine.connect()
        try:
            raw = await conn.get_raw_connection()
        except BaseException:
            await conn.close()
            raise
        driver = raw.driver_connection
        assert isinstance(driver, asyncpg.Connection)
        return conn, driver

    async def _give(self, conn: AsyncConnection, driver: asyncpg.Connection, taken: float) -> None:
        if taken <= self._since:
            driver.terminate()  # likely silent now (see drop_idle)
            await _discard(conn)
        elif self._closed:
            await _discard(conn)  # its pool may be disposed already: close it for good
        elif len(self._idle) >= self._keep:
            await conn.close()
        else:
            self._idle.append((conn, driver))


def _ignore_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _discard(conn: AsyncConnection) -> None:
    """Close ``conn``'s database connection instead of returning it to the pool."""
    try:
        await conn.invalidate()
    finally:
        await conn.close()
