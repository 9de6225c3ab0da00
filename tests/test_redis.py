"""Behaviour specific to the Redis transports, against a real Redis server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from broadcast_history import (
    Broadcast,
    BroadcastBackend,
    Event,
    InvalidArgument,
    NotConnected,
    TransportError,
)
from broadcast_history.backends import backend_from_url
from tests.conftest import REDIS_URL, require_redis, unique
from tests.support.helpers import assert_contiguous, settled, take

pytest.importorskip("redis")
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from broadcast_history.backends import _redis_common as shared
from broadcast_history.backends.redis import RedisBackend
from broadcast_history.backends.redis_stream import RedisStreamBackend

STREAM_URL = REDIS_URL.replace("redis://", "redis-stream://")


@pytest.fixture
async def admin() -> AsyncIterator[aioredis.Redis]:
    """A plain client for inspecting the server; the test's stream keys are deleted."""
    require_redis()
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    prefix = f"bh-test-{uuid.uuid4().hex[:8]}:"
    client.test_prefix = prefix  # type: ignore[attr-defined]
    yield client
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _backends(admin: aioredis.Redis) -> dict[str, Callable[..., BroadcastBackend]]:
    prefix = admin.test_prefix  # type: ignore[attr-defined]
    return {
        "pubsub": lambda **kw: RedisBackend(REDIS_URL, **kw),
        "stream": lambda **kw: RedisStreamBackend(STREAM_URL, prefix=prefix, **kw),
    }


@pytest.fixture(params=["pubsub", "stream"])
async def backend(
    request: pytest.FixtureRequest, admin: aioredis.Redis
) -> AsyncIterator[BroadcastBackend]:
    """A connected raw transport of each kind (no Broadcast around it)."""
    made = _backends(admin)[request.param]()
    await made.connect()
    yield made
    await made.disconnect()


async def _next(backend: BroadcastBackend, timeout: float = 10.0) -> Event:
    return await asyncio.wait_for(backend.next_published(), timeout)


# -- construction and URLs -----------------------------------------------------------


def test_schemes_select_the_redis_backends() -> None:
    assert isinstance(backend_from_url("redis://localhost:6379/0"), RedisBackend)
    assert isinstance(backend_from_url("rediss://user:secret@localhost:6380/2"), RedisBackend)
    for url in ("redis-stream://h/0", "redis-streams://h/0", "rediss-stream://h/0"):
        assert isinstance(backend_from_url(url), RedisStreamBackend)


def test_url_or_conn_exactly_one() -> None:
    # broadcaster's own test matches this text and type (an assert there).
    with pytest.raises(AssertionError, match="conn must be provided if url is not"):
        RedisBackend()
    with pytest.raises(ValueError, match="conn must be provided"):
        RedisBackend()
    with pytest.raises(ValueError, match="not both"):
        RedisBackend("redis://localhost", conn=aioredis.Redis())


async def test_rediss_url_speaks_tls() -> None:
    """The local server speaks plain text, so a TLS client must fail to connect."""
    require_redis()
    host_port = REDIS_URL.split("://", 1)[1].split("?", 1)[0]
    query = "?socket_connect_timeout=0.5"  # URL options reach redis-py
    for backend in (
        RedisBackend(f"rediss://{host_port}{query}"),
        RedisStreamBackend(f"rediss-stream://{host_port}{query}"),
    ):
        with pytest.raises(TransportError, match="cannot connect"):
            await asyncio.wait_for(backend.connect(), 20)
        assert not backend.connected


async def test_unreachable_server_fails_at_connect() -> None:
    backend = RedisBackend("redis://127.0.0.1:1/0")
    with pytest.raises(TransportError, match="cannot connect"):
        await backend.connect()
    with pytest.raises(NotConnected):
        await backend.next_published()


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "bytes"])
async def test_conn_constructor(decode: bool, sqlite_file_url: str) -> None:
    """broadcaster 0.3's ``RedisBackend(conn=...)``; the client stays the caller's."""
    require_redis()
    conn = aioredis.Redis.from_url(REDIS_URL, decode_responses=decode)
    channel = unique()
    async with Broadcast(backend=RedisBackend(conn=conn), log=sqlite_file_url) as publisher:
        async with publisher.subscribe(channel) as sub:
            await publisher.publish(channel, "text")
            await publisher.publish(channel, b"\x00raw")
            events = await take(sub, 2)
    assert [e.message for e in events] == ["text", b"\x00raw"]
    assert_contiguous(events, 1, 2)
    assert await conn.ping()  # disconnect did not close it
    await conn.aclose()


@pytest.mark.parametrize("kind", ["pubsub", "stream", "given-strict-client"])
async def test_a_message_that_is_not_utf8_fails_alone(
    admin: aioredis.Redis, kind: str, sqlite_file_url: str
) -> None:
    """Another program's bytes that are not UTF-8 are a message that is not an
    envelope: ignored and counted, while every channel goes on live. (redis-py's
    UnicodeDecodeError ended the transport's reader: every subscriber got
    TransportError.) A client the application gave, decoding strictly, reconnects."""
    prefix = admin.test_prefix  # type: ignore[attr-defined]
    given = None
    if kind == "given-strict-client":
        given = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        backend: BroadcastBackend = RedisBackend(conn=given, max_reconnect_delay=0.1)
    else:
        backend = _backends(admin)[kind]()
    raw = aioredis.Redis.from_url(REDIS_URL)  # sends bytes as they are
    junk, other = unique(), unique()
    try:
        async with Broadcast(backend=backend, log=sqlite_file_url, idle_check=0.2) as broadcast:
            async with broadcast.subscribe(junk) as sub, broadcast.subscribe(other) as sub2:
                if kind == "stream":
                    await raw.xadd(prefix + junk, {"m": b"\xff\xfe not text"})
                else:
                    await raw.publish(junk, b"\xff\xfe not text")
                for i in range(3):
                    await broadcast.publish(junk, f"j{i}")
                    await broadcast.publish(other, f"o{i}")
                assert_contiguous(await take(sub, 3), 1, 3)
                assert_contiguous(await take(sub2, 3), 1, 3)
                if kind != "given-strict-client":  # seen, not lost with the connection
                    ignored = broadcast.foreign_messages
                    assert await settled(lambda: ignored["not_envelope"], 1) == 1
                await broadcast.publish(other, "after")
                assert [e.message for e in await take(sub2, 1)] == ["after"]
    finally:
        await raw.aclose()
        if given is not None:
            await given.aclose()


# -- lifecycle ---------------------------------------------------------------------


async def test_connect_and_disconnect_twice(backend: BroadcastBackend) -> None:
    await backend.connect()
    assert backend.connected
    await backend.disconnect()
    await backend.disconnect()
    assert not backend.connected
    await backend.connect()  # usable again after a disconnect
    channel = unique()
    await backend.subscribe(channel)
    await backend.publish(channel, "again")
    assert (await _next(backend)).message == "again"


async def test_disconnect_wakes_a_pending_next_published(backend: BroadcastBackend) -> None:
    await backend.subscribe(unique())
    waiting = asyncio.create_task(backend.next_published())
    await asyncio.sleep(0.1)
    await backend.disconnect()
    with pytest.raises(NotConnected):
        await asyncio.wait_for(waiting, 5)


async def test_reading_before_the_first_subscribe(backend: BroadcastBackend) -> None:
    """redis-py 8 regression: a listener started before any SUBSCRIBE must not end."""
    waiting = asyncio.create_task(backend.next_published())
    await asyncio.sleep(0.3)  # the reader is up and has nothing to read yet
    assert not waiting.done()
    channel = unique()
    await backend.subscribe(channel)
    await backend.publish(channel, "first")
    event = await asyncio.wait_for(waiting, 10)
    assert (event.channel, event.message) == (channel, "first")


async def test_resubscribe_after_unsubscribing_everything(backend: BroadcastBackend) -> None:
    first, second = unique(), unique()
    await backend.subscribe(first)
    await backend.unsubscribe(first)
    await asyncio.sleep(0.2)
    await backend.subscribe(second)
    await backend.publish(first, "not heard")
    await backend.publish(second, "heard")
    assert (await _next(backend)).message == "heard"


# -- channels and batches ------------------------------------------------------------


async def test_publish_many_keeps_order_per_channel(backend: BroadcastBackend) -> None:
    a, b = unique(), unique()
    await backend.subscribe(a)
    await backend.subscribe(b)
    batch = [(a if i % 2 else b, f"m{i}") for i in range(200)]
    await backend.publish_many(batch)
    received = [await _next(backend) for _ in batch]
    for channel in (a, b):
        sent = [m for c, m in batch if c == channel]
        assert [e.message for e in received if e.channel == channel] == sent


def _url(user: str | None = None, query: str = "") -> str:
    """REDIS_URL as ``user`` (password ``secret``), with ``query`` instead of its own."""
    parts = urlsplit(REDIS_URL)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{user}:secret@{host}" if user else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


@asynccontextmanager
async def _acl_user(admin: aioredis.Redis, **rules: Any) -> AsyncIterator[str]:
    """A temporary ACL user (password ``secret``), deleted afterwards."""
    user = f"bh-test-{uuid.uuid4().hex[:8]}"
    await admin.acl_setuser(user, enabled=True, passwords=["+secret"], keys=["*"], **rules)
    try:
        yield user
    finally:
        await admin.acl_deluser(user)


@pytest.mark.parametrize("query", ["", "protocol=2", "protocol=3"])
async def test_resp2_unless_the_url_says_otherwise(query: str) -> None:
    """RESP2 by default; ``?protocol=3`` gets RESP3, whose messages arrive as pushes."""
    require_redis()
    backend = RedisBackend(_url(query=query))
    await backend.connect()
    try:
        assert backend._client is not None
        info = await backend._client.client_info()
        assert int(info["resp"]) == (3 if query == "protocol=3" else 2)
        channel = unique()
        await backend.subscribe(channel)
        await backend.publish_many([(channel, "one"), (channel, "two")])
        await backend.publish(channel, "three")
        assert [(await _next(backend)).message for _ in range(3)] == ["one", "two", "three"]
    finally:
        await backend.disconnect()


def test_script_calls_are_cut_by_count_and_size() -> None:
    many = [("c", "m")] * (2 * shared.SCRIPT_PAIRS + 1)
    assert [len(args) // 2 for args in shared.script_calls(many)] == [
        shared.SCRIPT_PAIRS,
        shared.SCRIPT_PAIRS,
        1,
    ]
    half = "x" * (shared.SCRIPT_CHARS // 2)
    big = [("a", half), ("b", half), ("c", half), ("d", "x" * (shared.SCRIPT_CHARS + 1))]
    calls = shared.script_calls(big)
    assert [args[::2] for args in calls] == [["a", "b"], ["c"], ["d"]]


class _Spy:
    """Counts the calls of redis-py's script objects (whatever else uses the server)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = AsyncScript.__call__

        async def call(script: AsyncScript, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(script, *args, **kwargs)

        monkeypatch.setattr(AsyncScript, "__call__", call)


async def test_a_pubsub_batch_is_one_script_call(
    admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Several messages go as calls of one Lua script (SCRIPT_PAIRS at most each), in
    order per channel; a flushed script cache is loaded again on the way."""
    spy = _Spy(monkeypatch)
    backend = RedisBackend(REDIS_URL)
    await backend.connect()
    try:
        a, b = unique(), unique()
        await backend.subscribe(a)
        await backend.subscribe(b)
        batch = [(a if i % 3 else b, f"m{i}") for i in range(2 * shared.SCRIPT_PAIRS + 10)]
        await backend.publish_many(batch)
        received = [await _next(backend) for _ in batch]
        for channel in (a, b):
            sent = [m for c, m in batch if c == channel]
            assert [e.message for e in received if e.channel == channel] == sent
        assert spy.calls == 3
        await backend.publish(a, "alone")  # one message: a plain PUBLISH
        assert (await _next(backend)).message == "alone"
        assert spy.calls == 3
        await admin.script_flush()
        with caplog.at_level("WARNING", logger="broadcast_history"):
            await backend.publish_many([(a, "after flush 1"), (b, "after flush 2")])
        assert {(await _next(backend)).message for _ in range(2)} == {
            "after flush 1",
            "after flush 2",
        }
        assert spy.calls == 4 and not backend._scripts_refused and not caplog.records
        assert backend._script is not None
        assert await admin.script_exists(backend._script.sha) == [True]  # loaded again
    finally:
        await backend.disconnect()


async def test_lone_messages_go_on_one_kept_connection(admin: aioredis.Redis) -> None:
    """A batch of one is a PUBLISH on a connection kept for it, not a pipeline; a
    connection the server killed is replaced and the message still goes once."""
    backend = RedisBackend(REDIS_URL)
    await backend.connect()
    try:
        channel = unique()
        await backend.subscribe(channel)
        for i in range(5):
            await backend.publish(channel, f"m{i}")
        assert [(await _next(backend)).message for _ in range(5)] == [f"m{i}" for i in range(5)]
        killed = await _held_id(backend)
        assert await admin.execute_command("CLIENT", "KILL", "ID", killed) == 1
        await backend.publish(channel, "after the kill")
        assert (await _next(backend)).message == "after the kill"
        assert await _held_id(backend) != killed
    finally:
        await backend.disconnect()
    assert backend._held is None


async def _held_id(backend: RedisBackend) -> int:
    """The server's id of the connection ``backend`` keeps for lone messages."""
    assert backend._held is not None
    held, _ = backend._held
    await held.send_command("CLIENT", "ID")
    return int(await held.read_response())


@pytest.mark.alone  # CLIENT PAUSE holds every worker's writes on the shared Redis
async def test_a_cancelled_lone_publish_gives_its_connection_up(admin: aioredis.Redis) -> None:
    """Cancelled while waiting for the reply (Redis paused), the kept connection may
    hold that reply unread: it is closed, and the next message takes a fresh one."""
    backend = RedisBackend(REDIS_URL)
    await backend.connect()
    try:
        channel = unique()
        await backend.subscribe(channel)
        await backend.publish(channel, "first")
        assert (await _next(backend)).message == "first"
        assert backend._held is not None
        held, _ = backend._held
        await admin.execute_command("CLIENT", "PAUSE", 500, "WRITE")
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(backend.publish(channel, "cut off"), 0.1)
            assert backend._held is None
            assert not held.is_connected
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        await backend.publish(channel, "next")
        seen: list[str] = []
        while "next" not in seen:
            seen.append((await _next(backend)).message)
        # Whether the server still ran the cut-off PUBLISH is its business.
        assert seen in (["next"], ["cut off", "next"])
    finally:
        await backend.disconnect()


@pytest.mark.alone  # CLIENT PAUSE holds every worker's writes on the shared Redis
async def test_disconnect_during_a_lone_publish_ends_it_and_keeps_nothing(
    admin: aioredis.Redis,
) -> None:
    """A disconnect while a lone publish waits for its reply (Redis paused) ends that
    publish with TransportError instead of a retry on a connection nobody gives back;
    the transport connects and publishes again afterwards."""
    backend = RedisBackend(REDIS_URL)
    await backend.connect()
    channel = unique()
    try:
        await backend.publish(channel, "warm")
        await admin.execute_command("CLIENT", "PAUSE", 600, "WRITE")
        try:
            stuck = asyncio.create_task(backend.publish(channel, "stuck"))
            await asyncio.sleep(0.1)
            await backend.disconnect()
            with pytest.raises(TransportError):
                await stuck
            assert backend._held is None
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        await backend.connect()
        await backend.subscribe(channel)
        await backend.publish(channel, "after")
        assert (await _next(backend)).message == "after"
    finally:
        await backend.disconnect()
    assert backend._held is None


async def test_a_given_client_keeps_no_connection_of_its_pool() -> None:
    """With the application's own client (``conn=``), whose pool may be small, lone
    messages go as before and hold no connection of it."""
    require_redis()
    pool = aioredis.ConnectionPool.from_url(REDIS_URL, max_connections=2)
    client = aioredis.Redis(connection_pool=pool)
    backend = RedisBackend(conn=client)
    await backend.connect()
    try:
        channel = unique()
        await backend.subscribe(channel)
        await backend.publish(channel, "one")
        await backend.publish_many([(channel, "two"), (channel, "three")])
        assert [(await _next(backend)).message for _ in range(3)] == ["one", "two", "three"]
        assert backend._held is None
        assert await client.ping()
    finally:
        await backend.disconnect()
        await client.aclose()


async def test_a_refused_channel_fails_the_batch_once(admin: aioredis.Redis) -> None:
    """A PUBLISH the server refuses (an ACL on its channel) raises TransportError, as a
    pipeline would; the batch's other messages go once, and scripts stay on. A lone
    refused message leaves its kept connection in use."""
    allowed = unique()
    async with _acl_user(admin, channels=[allowed], commands=["+@all"]) as user:
        backend = RedisBackend(_url(user))
        await backend.connect()
        try:
            await backend.subscribe(allowed)
            with pytest.raises(TransportError, match="PUBLISH failed"):
                await backend.publish_many([(allowed, "1"), (unique(), "x"), (allowed, "2")])
            assert [(await _next(backend)).message for _ in range(2)] == ["1", "2"]
            await backend.publish(allowed, "sentinel")  # nothing else was queued
            assert (await _next(backend)).message == "sentinel"
            assert not backend._scripts_refused
            kept = await _held_id(backend)
            with pytest.raises(TransportError, match="PUBLISH failed"):
                await backend.publish(unique(), "alone")
            await backend.publish(allowed, "after")
            assert (await _next(backend)).message == "after"
            assert await _held_id(backend) == kept
        finally:
            await backend.disconnect()


async def test_a_server_refusing_scripts_gets_pipelines(
    admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the right to run scripts (an ACL, a server without Lua) the batch still
    arrives, by pipeline, and scripts are tried again only on a new connection."""
    async with _acl_user(admin, channels=["*"], commands=["+@all", "-@scripting"]) as user:
        backend = RedisBackend(_url(user))
        await backend.connect()
        try:
            channel = unique()
            await backend.subscribe(channel)
            with caplog.at_level("WARNING", logger="broadcast_history"):
                await backend.publish_many([(channel, "one"), (channel, "two")])
                assert [(await _next(backend)).message for _ in range(2)] == ["one", "two"]
                assert "refused the publishing script" in caplog.text
                caplog.clear()
                await backend.publish_many([(channel, "three"), (channel, "four")])
                assert [(await _next(backend)).message for _ in range(2)] == ["three", "four"]
                assert not caplog.records  # pipelines straight away now
            await backend.disconnect()
            await backend.connect()
            assert not backend._scripts_refused
        finally:
            await backend.disconnect()


async def test_unsubscribe_one_channel_among_many(
    backend: BroadcastBackend, admin: aioredis.Redis
) -> None:
    channels = [unique() for _ in range(4)]
    for channel in channels:
        await backend.subscribe(channel)
    dropped = channels[1]
    await backend.unsubscribe(dropped)
    if isinstance(backend, RedisBackend):
        await asyncio.sleep(0.2)  # the server confirms UNSUBSCRIBE asynchronously
        counts = dict(await admin.pubsub_numsub(*channels))
        assert counts == {c: 0 if c == dropped else 1 for c in channels}
    await backend.publish_many([(c, f"to {c}") for c in channels])
    kept = [c for c in channels if c != dropped]
    received = [await _next(backend) for _ in kept]
    assert sorted(e.channel for e in received) == sorted(kept)
    # Nothing of the dropped channel is queued behind them.
    await backend.publish(kept[0], "sentinel")
    assert (await _next(backend)).message == "sentinel"


async def test_stream_subscribe_during_a_blocking_read(admin: aioredis.Redis) -> None:
    """A subscribe ends the XREAD in flight instead of waiting out its long block."""
    backend = _backends(admin)["stream"](block=60.0)
    await backend.connect()
    try:
        first, second = unique(), unique()
        await backend.subscribe(first)
        await asyncio.sleep(0.3)  # the reader is now blocked on `first` alone
        await backend.subscribe(second)
        await backend.publish(second, "prompt")
        assert (await _next(backend, timeout=10)).message == "prompt"
    finally:
        await backend.disconnect()


async def test_stream_length_is_bounded(admin: aioredis.Redis) -> None:
    backend = _backends(admin)["stream"](maxlen=100)
    await backend.connect()
    try:
        channel = unique()
        for start in range(0, 2000, 200):
            await backend.publish_many([(channel, f"m{i}") for i in range(start, start + 200)])
        prefix = admin.test_prefix  # type: ignore[attr-defined]
        length = await admin.xlen(prefix + channel)
        # MAXLEN ~ trims whole radix-tree nodes (100 entries each by default).
        assert 100 <= length < 300
        newest = await admin.xrevrange(prefix + channel, count=1)
        assert newest[0][1] == {"m": "m1999"}
    finally:
        await backend.disconnect()


def test_stream_options_are_checked() -> None:
    for bad in ({"maxlen": 0}, {"maxlen": 1.5}, {"ttl": 0}, {"ttl": -1.0}, {"ttl": True}):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            RedisStreamBackend(STREAM_URL, **bad)  # type: ignore[arg-type]


async def test_stream_expiry_follows_the_last_publish(admin: aioredis.Redis) -> None:
    """Each publish sets the stream's time to live; ``ttl=None`` keeps it forever."""
    prefix = admin.test_prefix  # type: ignore[attr-defined]
    kept, default = unique(), unique()
    for backend, channel in (
        (_backends(admin)["stream"](ttl=None), kept),
        (_backends(admin)["stream"](), default),
    ):
        await backend.connect()
        try:
            await backend.publish_many([(channel, "a"), (channel, "b")])
        finally:
            await backend.disconnect()
    assert await admin.pttl(prefix + kept) == -1
    assert 3_590_000 < await admin.pttl(prefix + default) <= 3_600_000


async def test_stream_expiry_is_restarted_once_per_tenth_of_the_ttl(
    admin: aioredis.Redis,
) -> None:
    """Not a PEXPIRE per channel per batch: one per stream per tenth of the ttl, and
    again after a reconnection (a restarted Redis lost its expiries)."""
    backend = _backends(admin)["stream"](ttl=2.0)
    key = admin.test_prefix + (channel := unique())  # type: ignore[attr-defined]
    await backend.connect()
    try:
        await backend.publish(channel, "a")
        assert await admin.pttl(key) > 0
        await admin.persist(key)  # stands for an expiry this process cannot see
        await backend.publish(channel, "b")
        assert await admin.pttl(key) == -1  # sent 0.2 s ago at most: not again
        await asyncio.sleep(0.25)
        await backend.publish(channel, "c")
        assert 1_500 < await admin.pttl(key) <= 2_000
        await admin.persist(key)
        await backend.disconnect()
        await backend.connect()
        await backend.publish(channel, "d")
        assert await admin.pttl(key) > 0
    finally:
        await backend.disconnect()


async def test_an_expired_stream_is_read_again_once_published(admin: aioredis.Redis) -> None:
    backend = _backends(admin)["stream"](ttl=0.3, block=0.2)
    key = admin.test_prefix + (channel := unique())  # type: ignore[attr-defined]
    await backend.connect()
    try:
        await backend.subscribe(channel)
        await backend.publish(channel, "before")
        assert (await _next(backend)).message == "before"
        for _ in range(100):  # Redis deletes expired keys lazily or within ~100 ms
            if not await admin.exists(key):
                break
            await asyncio.sleep(0.05)
        assert not await admin.exists(key)
        await backend.publish(channel, "after")
        assert (await _next(backend)).message == "after"
    finally:
        await backend.disconnect()


async def test_stream_subscribe_starts_at_the_current_end(admin: aioredis.Redis) -> None:
    backend = _backends(admin)["stream"]()
    await backend.connect()
    try:
        channel = unique()
        await backend.publish(channel, "before")
        await backend.subscribe(channel)
        await backend.publish(channel, "after")
        assert (await _next(backend)).message == "after"
    finally:
        await backend.disconnect()


# -- permanent failures --------------------------------------------------------------


@pytest.mark.parametrize(("kind", "denied"), [("pubsub", "subscribe"), ("stream", "xread")])
async def test_a_permanent_failure_raises(admin: aioredis.Redis, kind: str, denied: str) -> None:
    """A subscription the server refuses raises from next_published, never hangs."""
    async with _acl_user(admin, channels=["*"], commands=["+@all", f"-{denied}"]) as user:
        url = _url(user)
        backend: BroadcastBackend = (
            RedisBackend(url)
            if kind == "pubsub"
            else RedisStreamBackend(url.replace("redis://", "redis-stream://", 1))
        )
        await backend.connect()
        try:
            await asyncio.wait_for(backend.subscribe(unique()), 10)
            with pytest.raises(TransportError):
                await _next(backend)
            with pytest.raises(TransportError):  # and again: it stays failed
                await _next(backend)
            assert not backend.connected
        finally:
            await backend.disconnect()


@pytest.mark.parametrize("client", ["url", "given-bytes-client"])
async def test_channels_come_and_go_without_growing_redis_py_tables(
    sqlite_file_url: str, client: str
) -> None:
    """The transport reads replies itself, so redis-py never saw an UNSUBSCRIBE
    confirmed and kept every channel ever subscribed in its PubSub's tables (keyed
    by bytes in a client without decode_responses)."""
    require_redis()
    given = aioredis.Redis.from_url(REDIS_URL) if client != "url" else None
    backend = RedisBackend(REDIS_URL) if given is None else RedisBackend(conn=given)
    async with Broadcast(backend=backend, log=sqlite_file_url) as broadcast:
        async with broadcast.subscribe(unique()):  # held: one channel stays
            for _ in range(200):
                async with broadcast.subscribe(unique()):
                    pass
            pubsub = backend._pubsub
            assert pubsub is not None
            assert (len(pubsub.channels), len(pubsub.pending_unsubscribe_channels)) == (1, 0)
    if given is not None:
        await given.aclose()


async def test_subscribes_cut_short_leave_no_channel_on_the_server(
    admin: aioredis.Redis, sqlite_file_url: str
) -> None:
    """A subscribe cancelled while the transport ran SUBSCRIBE left the channel
    subscribed on the server, with nobody to read it (33 of 139 in a probe)."""
    prefix = admin.test_prefix  # type: ignore[attr-defined]
    async with Broadcast(REDIS_URL, log=sqlite_file_url) as broadcast:

        async def enter(name: str) -> None:
            async with broadcast.subscribe(name):
                pass

        for i in range(150):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(enter(f"{prefix}{i}"), 0.0001 + (i % 30) * 0.0001)
        await asyncio.sleep(0.3)  # the undoing unsubscribes run
        assert await admin.pubsub_channels(f"{prefix}*") == []
        async with broadcast.subscribe(f"{prefix}x") as sub:
            sent = await broadcast.publish(f"{prefix}x", "live")
            assert await take(sub, 1) == [sent]


async def test_a_stream_key_taken_by_something_else_stops_only_its_channel(
    admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """One XREAD reads every subscribed stream: a key of the prefix that turned into a
    string (another app's) failed it with WRONGTYPE, and the reader stopped for good,
    every channel's subscribers getting TransportError (found by a transport probe)."""
    prefix = admin.test_prefix  # type: ignore[attr-defined]
    backend = RedisStreamBackend(STREAM_URL, prefix=prefix)
    await backend.connect()
    try:
        await backend.subscribe("good")
        await backend.subscribe("bad")
        await backend.publish("bad", "b1")
        assert (await _next(backend)).message == "b1"
        await admin.delete(prefix + "bad")
        await admin.set(prefix + "bad", "not a stream")
        await backend.publish("good", "g1")
        assert (await _next(backend)).message == "g1"
        await backend.publish("good", "g2")
        assert (await _next(backend)).message == "g2"
        assert backend.connected
        assert any("is a string, not a stream" in r.getMessage() for r in caplog.records)
        with pytest.raises(TransportError, match="WRONGTYPE"):  # subscribing again says so
            await backend.subscribe("bad")
        await backend.publish("good", "g3")
        assert (await _next(backend)).message == "g3"
    finally:
        await backend.disconnect()
