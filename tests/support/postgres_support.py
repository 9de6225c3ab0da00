"""Private Postgres databases for the Postgres-specific tests.

The shared ``test`` database is truncated by other tests (``log_url``), possibly in
another pytest run at the same time, so these tests use databases of their own.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.conftest import POSTGRES_URL, require_postgres


def database_url(name: str) -> str:
    """``POSTGRES_URL`` with its database replaced by ``name``."""
    parts = urlsplit(POSTGRES_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


def private_name(name: str) -> str:
    """``name``, namespaced by ``BH_TEST_POSTGRES``'s database when it is not ``test``,
    so that test runs pointed at different databases never share one."""
    base = urlsplit(POSTGRES_URL).path.lstrip("/") or "test"
    return name if base == "test" else f"{base}_{name}"


async def ensure_database(name: str, *, options: str = "") -> str:
    """Create database ``name`` (see :func:`private_name`) if it is missing, with
    ``CREATE DATABASE`` ``options`` if given; returns its ``postgresql://`` URL."""
    require_postgres()
    name = private_name(name)
    admin = await asyncpg.connect(database_url("postgres"))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # A concurrent run may create it meanwhile.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await admin.execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        await admin.close()
    return database_url(name)


async def terminate(url: str, pids: list[int] | None = None) -> int:
    """``pg_terminate_backend`` the given backends, or every other one of ``url``'s database."""
    conn = await asyncpg.connect(url)
    try:
        if pids is not None:
            query = "SELECT count(pg_terminate_backend(pid)) FROM unnest($1::int[]) AS pid"
            return int(await conn.fetchval(query, pids))
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            )
        )
    finally:
        await conn.close()
