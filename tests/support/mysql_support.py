"""Private MySQL/MariaDB databases for the MySQL-specific tests.

The database of ``BH_TEST_MYSQL`` is emptied by the shared fixtures (``log_url``),
possibly in another pytest run at the same time, so these tests use databases of
their own, named after it so that runs against different test databases never
share one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import make_url

from tests.conftest import MYSQL_URL, require_mysql


def private_name(name: str) -> str:
    """``name``, prefixed by ``BH_TEST_MYSQL``'s database (``test_faults``...)."""
    return f"{make_url(MYSQL_URL).database or 'test'}_{name}"


def database_url(name: str) -> str:
    """``MYSQL_URL`` with its database replaced by ``name`` (no other change)."""
    return make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)


async def _server_connection() -> Any:
    import asyncmy

    url = make_url(MYSQL_URL)
    conn = await asyncmy.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
    )
    async with conn.cursor() as cursor:
        # "database exists" and the like are notes the driver would log as warnings.
        await cursor.execute("SET SESSION sql_notes = 0")
    return conn


async def ensure_database(name: str, *, empty: bool = False) -> str:
    """Create database ``name`` (see :func:`private_name`) if it is missing, or
    drop and create it again with ``empty``; returns its URL."""
    require_mysql()
    name = private_name(name)
    conn = await _server_connection()
    try:
        async with conn.cursor() as cursor:
            if empty:
                await cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
            await cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
    finally:
        conn.close()
    return database_url(name)


async def kill_connections(url: str) -> int:
    """``KILL`` every connection to ``url``'s database but the one asking."""
    database = make_url(url).database
    conn = await _server_connection()
    killed = 0
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT id FROM information_schema.processlist"
                " WHERE db = %s AND id <> CONNECTION_ID()",
                (database,),
            )
            for (thread,) in await cursor.fetchall():
                try:
                    await cursor.execute(f"KILL CONNECTION {int(thread)}")
                    killed += 1
                except Exception:  # it ended meanwhile
                    pass
    finally:
        conn.close()
    return killed
