"""Running the suite in parallel (pytest-xdist): a database per worker, and tests
that must run alone.

Each worker gets its own Postgres and MySQL test databases (``test_gw0``...), so one
worker truncating its log tables or terminating its connections never touches
another's. The helpers that name private databases already derive them from the
test database's name, so they follow.

A few tests act on a whole shared service (``CLIENT KILL`` of every pub/sub
connection on the shared Redis): they are marked ``alone`` and run while no other
worker is inside a test. Every other test holds a shared lock while it runs; an
``alone`` test takes it exclusively. A turnstile lock taken first gives the waiting
``alone`` test priority, so a worker starting test after test cannot starve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sqlalchemy.engine import make_url

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1...; unset without xdist


def per_worker_url(url: str) -> str:
    """``url`` with this worker's name appended to its database (unchanged without xdist)."""
    parsed = make_url(url)
    if not WORKER or (parsed.database or "").endswith(f"_{WORKER}"):
        return url  # no xdist, or already this worker's (a process a test started)
    return parsed.set(database=f"{parsed.database or 'test'}_{WORKER}").render_as_string(
        hide_password=False
    )


async def _create_postgres(url: str) -> None:
    import asyncpg

    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        password=parsed.password,
        database="postgres",
    )
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", parsed.database
        )
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{parsed.database}"')
    finally:
        await conn.close()


async def _create_mysql(url: str) -> None:
    # Imported here: that module imports the conftest, which imports this one.
    from tests.support.mysql_support import _server_connection

    conn = await _server_connection()
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{make_url(url).database}`")
    finally:
        conn.close()


def create_databases(postgres_url: str, mysql_url: str) -> None:
    """Create this worker's test databases where the servers answer; a server that
    does not is left to the tests, which skip (or fail under CI=true) on it."""
    for create, url in ((_create_postgres, postgres_url), (_create_mysql, mysql_url)):
        try:
            asyncio.run(asyncio.wait_for(create(url), 10))
        except (OSError, asyncio.TimeoutError, ImportError):
            pass  # not there: its tests say so
        except Exception as exc:  # there, but it refused: say why its tests will fail
            warnings.warn(f"could not create {make_url(url)!r}: {exc!r}", stacklevel=1)


class TestLock:
    """Shared for ordinary tests, exclusive for ``alone`` ones, across workers."""

    def __init__(self, run: str) -> None:
        directory = Path(tempfile.gettempdir()) / f"broadcast-history-tests-{run}"
        directory.mkdir(exist_ok=True)
        self._turnstile: IO[bytes] = (directory / "turnstile").open("ab")
        self._room: IO[bytes] = (directory / "room").open("ab")

    @contextlib.contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._room, fcntl.LOCK_UN)
