"""Build big logs fast: rows inserted directly through the log's own schema.

Publishing 10M events one by one would take longer than the benchmark itself, so the
replay scenarios get their logs from here: the schema is created by ``EventLog``
(Alembic), then rows go in with ``executemany`` (SQLite, MySQL) or ``COPY``
(Postgres) in big transactions, and the channel row is set to match. Built logs are
kept (SQLite files under ``build/bench/cache``, channels ``big-<N>`` in the databases
``bench_history_big`` on Postgres and ``<test database>_bench_big`` on MySQL) and
reused by later runs.
"""

from __future__ import annotations

import sqlite3
import time

from broadcast_history import EventLog

from .configs import (
    MYSQL_BIG_DB,
    OUT,
    POSTGRES_BIG_DB,
    mysql_connect,
    mysql_log_url,
    postgres_log_url,
    postgres_url,
)

PAYLOAD = b'{"user": "bench", "text": "' + b"x" * 40 + b'"}'  # 70 bytes
EPOCH = 4242
BASE_MICROS = 1_700_000_000_000_000
CHUNK = 200_000


def channel_name(size: int) -> str:
    return f"big-{size}"


def sqlite_path(size: int) -> str:
    return str(OUT / "cache" / f"log-{size}.db")


def sqlite_url(size: int) -> str:
    return f"sqlite+aiosqlite:///{sqlite_path(size)}"


def _rows(channel: str, start: int, stop: int) -> list[tuple[object, ...]]:
    # One event per microsecond: timestamps increase like real ones.
    return [
        (channel, offset, EPOCH, BASE_MICROS + offset, True, PAYLOAD, None)
        for offset in range(start, stop)
    ]


async def ensure_sqlite(size: int) -> tuple[str, float]:
    """URL of a SQLite file log holding ``size`` events; seconds spent building it."""
    path = sqlite_path(size)
    (OUT / "cache").mkdir(parents=True, exist_ok=True)
    channel = channel_name(size)
    conn = sqlite3.connect(path)
    try:
        try:
            row = conn.execute(
                "SELECT last_offset FROM broadcast_channels WHERE name = ?", (channel,)
            ).fetchone()
        except sqlite3.OperationalError:
            row = None
    finally:
        conn.close()
    if row is not None and row[0] == size:
        return sqlite_url(size), 0.0
    began = time.perf_counter()
    log = EventLog(sqlite_url(size))
    await log.connect()
    await log.disconnect()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("DELETE FROM broadcast_events WHERE channel = ?", (channel,))
        conn.execute("DELETE FROM broadcast_channels WHERE name = ?", (channel,))
        for start in range(1, size + 1, CHUNK):
            with conn:
                conn.executemany(
                    "INSERT INTO broadcast_events "
                    '(channel, "offset", epoch, "timestamp", is_text, payload, key) '
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    _rows(channel, start, min(start + CHUNK, size + 1)),
                )
        with conn:
            conn.execute(
                "INSERT INTO broadcast_channels "
                "(name, epoch, last_offset, last_timestamp, first_offset) VALUES (?, ?, ?, ?, 1)",
                (channel, EPOCH, size, BASE_MICROS + size),
            )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return sqlite_url(size), time.perf_counter() - began


async def ensure_postgres(size: int) -> tuple[str, float]:
    """URL of the Postgres benchmark log with channel ``big-<size>``; build seconds."""
    import asyncpg

    log = EventLog(postgres_log_url(POSTGRES_BIG_DB))
    await log.connect()
    await log.disconnect()
    channel = channel_name(size)
    conn = await asyncpg.connect(postgres_url(POSTGRES_BIG_DB))
    try:
        last = await conn.fetchval(
            "SELECT last_offset FROM broadcast_channels WHERE name = $1", channel
        )
        if last == size:
            return postgres_log_url(POSTGRES_BIG_DB), 0.0
        began = time.perf_counter()
        await conn.execute("DELETE FROM broadcast_events WHERE channel = $1", channel)
        await conn.execute("DELETE FROM broadcast_channels WHERE name = $1", channel)
        for start in range(1, size + 1, CHUNK * 5):
            await conn.copy_records_to_table(
                "broadcast_events",
                records=_rows(channel, start, min(start + CHUNK * 5, size + 1)),
                columns=["channel", "offset", "epoch", "timestamp", "is_text", "payload", "key"],
            )
        await conn.execute(
            "INSERT INTO broadcast_channels "
            "(name, epoch, last_offset, last_timestamp, first_offset) VALUES ($1, $2, $3, $4, 1)",
            channel,
            EPOCH,
            size,
            BASE_MICROS + size,
        )
        await conn.execute("VACUUM ANALYZE broadcast_events")
        return postgres_log_url(POSTGRES_BIG_DB), time.perf_counter() - began
    finally:
        await conn.close()


async def ensure_mysql(size: int) -> tuple[str, float]:
    """URL of the MySQL benchmark log with channel ``big-<size>``; build seconds."""
    url = mysql_log_url(MYSQL_BIG_DB)
    log = EventLog(url)
    await log.connect()
    await log.disconnect()
    channel = channel_name(size).encode()  # names are VARBINARY on MySQL
    conn = await mysql_connect(MYSQL_BIG_DB)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT last_offset FROM broadcast_channels WHERE name = %s", (channel,)
            )
            found = await cursor.fetchone()
            if found is not None and found[0] == size:
                return url, 0.0
            began = time.perf_counter()
            await cursor.execute("DELETE FROM broadcast_events WHERE channel = %s", (channel,))
            await cursor.execute("DELETE FROM broadcast_channels WHERE name = %s", (channel,))
            await conn.commit()
            for start in range(1, size + 1, CHUNK // 20):
                rows = [
                    (channel, offset, EPOCH, BASE_MICROS + offset, 1, PAYLOAD)
                    for offset in range(start, min(start + CHUNK // 20, size + 1))
                ]
                await cursor.executemany(
                    "INSERT INTO broadcast_events "
                    "(channel, `offset`, epoch, `timestamp`, is_text, payload) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    rows,
                )
                await conn.commit()
            await cursor.execute(
                "INSERT INTO broadcast_channels "
                "(name, epoch, last_offset, last_timestamp, first_offset) "
                "VALUES (%s, %s, %s, %s, 1)",
                (channel, EPOCH, size, BASE_MICROS + size),
            )
            await cursor.execute("ANALYZE TABLE broadcast_events")
            await cursor.fetchall()
            await conn.commit()
        return url, time.perf_counter() - began
    finally:
        conn.close()


async def ensure(log: str, size: int) -> tuple[str, float]:
    if log == "sqlite":
        return await ensure_sqlite(size)
    if log == "mysql":
        return await ensure_mysql(size)
    return await ensure_postgres(size)
