"""Fixtures shared by the admin tests: fresh logs on SQLite files, Postgres and MySQL.

Postgres tests use a database of their own (that of ``BH_TEST_POSTGRES`` with
``_admin`` appended), emptied before each test, so listing or exporting "every
channel" does not see other suites' channels; named after the test database so that
runs against different test databases (other checkouts, other branches with other
migrations) do not share it. MySQL likewise (``BH_TEST_MYSQL``'s database with
``_admin`` appended).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.conftest import (
    POSTGRES_URL,
    require_postgres,
    reset_mysql_log,
    reset_postgres_log,
)

_created: list[str] = []


async def _admin_postgres_url() -> str:
    if _created:
        return _created[0]
    import asyncpg

    base = make_url(POSTGRES_URL)
    admin_db = f"{base.database}_admin"
    conn = await asyncpg.connect(
        host=base.host, port=base.port, user=base.username, database=base.database
    )
    try:
        await conn.execute(f'CREATE DATABASE "{admin_db}"')
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await conn.close()
    url = base.set(database=admin_db).render_as_string(hide_password=False)
    _created.append(url)
    return url


async def fresh_postgres_log() -> str:
    """URL of the admin tests' Postgres database, with empty log tables."""
    require_postgres()
    url = await _admin_postgres_url()
    await reset_postgres_log(url)
    return url


async def fresh_mysql_log() -> str:
    """URL of the admin tests' MySQL database, with empty log tables."""
    from tests.support.mysql_support import ensure_database

    url = await ensure_database("admin")
    await reset_mysql_log(url)
    return url


LOG_KINDS = ["log:sqlite-file", "log:postgres", "log:mysql"]


async def fresh_log_url(kind: str, tmp_path: Path) -> str:
    """A fresh, empty log of ``kind`` (one of LOG_KINDS) that processes can share."""
    if kind == "log:sqlite-file":
        return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    if kind == "log:mysql":
        return await fresh_mysql_log()
    return await fresh_postgres_log()


def sync_fresh_postgres_log() -> str:
    return asyncio.run(fresh_postgres_log())
