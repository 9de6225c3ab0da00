"""Redis connections killed or cut under a running publisher: nothing lost, nothing twice.

A publisher and a subscriber broadcast share a SQLite-file log but have transports of
their own, so the live path really crosses Redis. Faults are real (``CLIENT KILL``);
the TCP proxy only stands in for a network that goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from broadcast_history import Broadcast, BroadcastBackend
from tests.conftest import REDIS_URL, require_redis, unique
from tests.support.helpers import assert_contiguous, take
from tests.support.proxy import CuttableProxy

pytest.importorskip("redis")
import redis.asyncio as aioredis

from broadcast_history.backends.redis import CLIENT_NAME, RedisBackend
from broadcast_history.backends.redis_stream import RedisStreamBackend

HOST_PORT = REDIS_URL.split("://", 1)[1]


def make_backend(kind: str, host_port: str = HOST_PORT) -> BroadcastBackend:
    if kind == "pubsub":
        return RedisBackend(f"redis://{host_port}", max_reconnect_delay=0.2)
    return RedisStreamBackend(f"redis-stream://{host_port}", max_reconnect_delay=0.2)


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    require_redis()
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


async def kill_readers(admin: aioredis.Redis, kind: str) -> int:
    """Kill the connections our transports of ``kind`` receive on; how many were killed."""
    if kind == "pubsub":
        return int(await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
    killed = 0
    for client in await admin.client_list():
        if client.get("name") == f"{CLIENT_NAME}:stream-reader":
            killed += int(await admin.execute_command("CLIENT", "KILL", "ID", client["id"]))
    return killed


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def pair(
    tmp_path: Path, subscriber_backend: BroadcastBackend, kind: str
) -> AsyncIterator[tuple[Broadcast, Broadcast]]:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    publisher = Broadcast(backend=make_backend(kind), log=log)
    subscriber = Broadcast(backend=subscriber_backend, log=log, idle_check=0.2)
    async with publisher, subscriber:
        yield publisher, subscriber


async def publish_steadily(broadcast: Broadcast, channel: str, count: int) -> None:
    for i in range(count):
        await broadcast.publish(channel, f"m{i}")
        if i % 10 == 0:
            await asyncio.sleep(0.005)


async def test_a_subscribe_whose_connection_is_lost_returns_at_once() -> None:
    """A subscribe whose SUBSCRIBE went out on a connection that was then lost waited
    the whole 5 s for a confirmation that could not come (4 of 1,000 clients stalled
    when a black-box probe killed Redis under a reconnect storm)."""
    host, port = HOST_PORT.split("/", 1)[0].split(":")
    proxy = CuttableProxy(host, int(port))
    proxy_port = await proxy.start()
    db = HOST_PORT.split("/", 1)[1] if "/" in HOST_PORT else "0"
    backend = RedisBackend(f"redis://127.0.0.1:{proxy_port}/{db}", max_reconnect_delay=0.2)
    try:
        await backend.connect()
        await backend.subscribe(unique())  # the subscription connection is open
        proxy.stall()  # what it sends now gets no answer
        waiting = asyncio.ensure_future(backend.subscribe(unique()))
        await asyncio.sleep(0.3)  # its SUBSCRIBE is out
        assert not waiting.done()
        proxy.cut()  # and the connection is lost
        await asyncio.wait_for(waiting, 1)
    finally:
        await backend.disconnect()
        await proxy.stop()


@pytest.mark.alone  # kills every worker's connections of a kind on the shared Redis
@pytest.mark.parametrize("kind", ["pubsub", "stream"])
async def test_connection_killed_mid_stream(
    tmp_path: Path, admin: aioredis.Redis, kind: str
) -> None:
    total = 400
    async with pair(tmp_path, make_backend(kind), kind) as (publisher, subscriber):
        channel = unique()
        async with subscriber.subscribe(channel) as sub:
            killed = 0

            async def killer() -> None:
                nonlocal killed
                for _ in range(3):
                    await asyncio.sleep(0.15)
                    # The transport may still be reconnecting (with backoff) from the
                    # last kill: wait for its new connection, then kill that one.
                    for _ in range(250):
                        if now := await kill_readers(admin, kind):
                            killed += now
                            break
                        await asyncio.sleep(0.02)

            received = asyncio.create_task(take(sub, total, timeout=60))
            await asyncio.gather(publish_steadily(publisher, channel, total), killer())
            assert_contiguous(await received, 1, total)
            assert killed >= 3  # the transport was really reconnected each time

            async def recovered() -> bool:
                if not subscriber.transport_connected:
                    return False
                if kind == "pubsub":  # and subscribed again on the server
                    return dict(await admin.pubsub_numsub(channel)) == {channel: 1}
                return True

            await eventually(recovered)
            await publisher.publish(channel, "after")
            (last,) = await take(sub, 1)
            assert (last.offset, last.message) == (total + 1, "after")


@pytest.mark.alone  # kills every worker's connections of a kind on the shared Redis
async def test_publishing_connections_killed_under_multi_channel_batches(
    tmp_path: Path, admin: aioredis.Redis
) -> None:
    """Batches over several channels go as script calls; killing the connections they
    go on loses nothing and repeats nothing on any channel."""
    per_channel, channels = 160, [unique() for _ in range(4)]  # 40 per task
    async with (
        pair(tmp_path, make_backend("pubsub"), "pubsub") as (publisher, subscriber),
        contextlib.AsyncExitStack() as stack,
    ):
        subs = [await stack.enter_async_context(subscriber.subscribe(c)) for c in channels]
        killed = 0

        async def killer() -> None:
            nonlocal killed
            for _ in range(3):
                await asyncio.sleep(0.05)
                for client in await admin.client_list():
                    # Our command connections (publishing), not the subscriptions.
                    if client.get("name") == CLIENT_NAME and "P" not in client["flags"]:
                        killed += int(
                            await admin.execute_command("CLIENT", "KILL", "ID", client["id"])
                        )

        async def publish(task: int) -> None:
            # 16 tasks, each over every channel in turn: commits touch several channels.
            for i in range(per_channel * len(channels) // 16):
                await publisher.publish(channels[(task + i) % len(channels)], f"m{task}-{i}")
                if i % 5 == 0:
                    await asyncio.sleep(0.01)

        received = [asyncio.create_task(take(sub, per_channel, timeout=60)) for sub in subs]
        await asyncio.gather(*(publish(task) for task in range(16)), killer())
        for task in received:
            assert_contiguous(await task, 1, per_channel)
        assert killed >= 1


@pytest.mark.parametrize("kind", ["pubsub", "stream"])
async def test_degraded_while_redis_is_unreachable(
    tmp_path: Path, admin: aioredis.Redis, kind: str
) -> None:
    """With its transport cut off, a subscriber reads from the log, then goes live again."""
    host, port = HOST_PORT.split("/", 1)[0].split(":")
    proxy = CuttableProxy(host, int(port))
    proxy_port = await proxy.start()
    db = HOST_PORT.split("/", 1)[1] if "/" in HOST_PORT else "0"
    try:
        backend = make_backend(kind, f"127.0.0.1:{proxy_port}/{db}")
        async with pair(tmp_path, backend, kind) as (publisher, subscriber):
            channel = unique()
            async with subscriber.subscribe(channel) as sub:
                await publish_steadily(publisher, channel, 20)
                assert_contiguous(await take(sub, 20), 1, 20)

                proxy.cut()

                async def down() -> bool:
                    return not subscriber.transport_connected

                await eventually(down)
                await publish_steadily(publisher, channel, 50)
                assert_contiguous(await take(sub, 50), 21, 70)  # from the log alone
                assert not subscriber.transport_connected

                proxy.is_cut = False

                async def up() -> bool:
                    return subscriber.transport_connected

                await eventually(up)
                await publish_steadily(publisher, channel, 30)
                assert_contiguous(await take(sub, 30), 71, 100)
    finally:
        await proxy.stop()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_silent_subscription_connection_is_pinged_then_replaced(
    admin: aioredis.Redis, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    """No reset, no data: the silence check pings, gets no answer and reconnects."""
    host, port = HOST_PORT.split("/", 1)[0].split(":")
    proxy = CuttableProxy(host, int(port))
    proxy_port = await proxy.start()
    db = HOST_PORT.split("/", 1)[1] if "/" in HOST_PORT else "0"
    backend = RedisBackend(
        f"redis://127.0.0.1:{proxy_port}/{db}?protocol={protocol}",
        ping_interval=0.2,
        max_reconnect_delay=0.2,
    )
    channel = unique()
    try:
        await backend.connect()
        await backend.subscribe(channel)
        await backend.publish(channel, "before")
        assert (await asyncio.wait_for(backend.next_published(), 5)).message == "before"
        proxy.stall()

        async def replaced() -> bool:
            return backend.reconnects >= 1 and backend.connected

        await eventually(replaced, timeout=10)
        assert "redis did not answer a ping" in caplog.text

        # A message published now reaches the new subscription connection.
        async def delivered() -> bool:
            await admin.publish(channel, "after")
            try:
                event = await asyncio.wait_for(backend.next_published(), 0.2)
            except asyncio.TimeoutError:
                return False
            return event.message == "after"

        await eventually(delivered, timeout=10)
    finally:
        await backend.disconnect()
        await proxy.stop()


@pytest.mark.alone  # kills every worker's connections of a kind on the shared Redis
async def test_subscriptions_come_and_go_while_the_connection_is_killed(
    tmp_path: Path, admin: aioredis.Redis
) -> None:
    """A subscribe or unsubscribe under way when the subscription connection dies
    raises nothing (redis-py's own AttributeError once escaped), and a failed one
    leaves no channel behind for the reconnections to subscribe again."""
    backend = make_backend("pubsub")
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    outcomes: list[str] = []
    async with Broadcast(backend=backend, log=log) as broadcast:
        stop = asyncio.Event()

        async def churn() -> None:
            while not stop.is_set():
                try:
                    async with broadcast.subscribe(unique()):
                        await asyncio.sleep(0.005)
                    outcomes.append("ok")
                except Exception as exc:  # any escape is the failure
                    outcomes.append(repr(exc))

        async def killer() -> int:
            killed = 0
            while not stop.is_set():
                await asyncio.sleep(0.03)
                killed += await kill_readers(admin, "pubsub")
            return killed

        churners = [asyncio.create_task(churn()) for _ in range(4)]
        killing = asyncio.create_task(killer())
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*churners)
        assert await killing >= 10
        assert [o for o in outcomes if o != "ok"] == []
        assert len(outcomes) > 100
        assert broadcast.subscriber_modes() == {"replay": 0, "live": 0}
        assert isinstance(backend, RedisBackend)
        assert backend._channels == set()


async def test_a_stream_transport_with_nothing_to_read_comes_back_up(
    tmp_path: Path,
) -> None:
    """Redis is cut off, and the last subscriber leaves meanwhile: ``connected``
    turns true again once Redis answers, though nothing is read any more."""
    host, port = HOST_PORT.split("/", 1)[0].split(":")
    proxy = CuttableProxy(host, int(port))
    proxy_port = await proxy.start()
    db = HOST_PORT.split("/", 1)[1] if "/" in HOST_PORT else "0"
    backend = make_backend("stream", f"127.0.0.1:{proxy_port}/{db}")
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    try:
        async with Broadcast(backend=backend, log=log) as broadcast:
            channel = unique()
            async with broadcast.subscribe(channel) as sub:
                await broadcast.publish(channel, "one")
                await take(sub, 1)
                proxy.cut()

                async def down() -> bool:
                    return not broadcast.transport_connected

                await eventually(down)
            proxy.is_cut = False

            async def up() -> bool:
                return broadcast.transport_connected

            await eventually(up, timeout=10)
            assert (await broadcast.publish(channel, "two")).offset == 2
    finally:
        await proxy.stop()


async def test_a_stream_transport_that_only_publishes_tells_of_an_outage() -> None:
    """With no subscription, the reader waited for one and never looked at Redis:
    ``connected`` stayed true through an outage, and ``reconnects`` at 0 after it
    (found by a transport probe)."""
    host, port = HOST_PORT.split("/", 1)[0].split(":")
    proxy = CuttableProxy(host, int(port))
    proxy_port = await proxy.start()
    db = HOST_PORT.split("/", 1)[1] if "/" in HOST_PORT else "0"
    backend = make_backend("stream", f"127.0.0.1:{proxy_port}/{db}")
    await backend.connect()
    try:
        assert backend.connected
        proxy.cut()

        async def down() -> bool:
            return not backend.connected

        await eventually(down, timeout=10)
        proxy.is_cut = False

        async def up() -> bool:
            return bool(backend.connected)

        await eventually(up, timeout=10)
        assert backend.reconnects == 1
    finally:
        await backend.disconnect()
        await proxy.stop()


async def test_a_subscription_cancelled_while_it_is_entered_ends_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """A task cancelled while entering ``subscribe`` on Redis, at any moment: it ends
    (redis-py 8 and Python 3.11's wait_for each swallowed such a cancellation, and
    the task hung in its subscription), and no subscriber is left registered (one
    cancelled while another channel's SUBSCRIBE held the lock stayed, fed for ever)."""
    require_redis()
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    async with Broadcast(backend=make_backend("pubsub"), log=log) as broadcast:

        async def enter(channel: str) -> None:
            async with broadcast.subscribe(channel) as sub:
                async for _ in sub:
                    pass

        for delay in [0, 0.0001, 0.0003, 0.0005, 0.001, 0.002, 0.005] * 4:
            tasks = [asyncio.create_task(enter(unique())) for _ in range(2)]
            await asyncio.sleep(delay)
            for task in tasks:
                task.cancel()
            done, _ = await asyncio.wait(tasks, timeout=3)
            assert len(done) == 2, f"still entering 3 s after cancel (delay {delay})"
            assert broadcast.subscriber_modes() == {"replay": 0, "live": 0}
