"""The Redis Cluster transport: URLs, one shard per message, and a master killed.

The fault test has a cluster of its own (three masters, no replicas), kills one
master mid-stream and starts it again: its channels' sends fail meanwhile (and,
once the cluster notices, every shard's), subscribers read from the log, then the
transport subscribes again and live delivery resumes. Nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from broadcast_history import Broadcast, Event, InvalidArgument, NotConnected, TransportError
from tests.conftest import unique
from tests.support.helpers import assert_contiguous, take

pytest.importorskip("redis", reason="redis-py is not installed (the redis extra)")
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from broadcast_history.backends import backend_from_url
from broadcast_history.backends._redis_shards import cluster_options
from broadcast_history.backends.redis_cluster import CLIENT_NAME, RedisClusterBackend
from tests.support.redis_cluster import RedisClusterNodes, free_cluster_port


def test_urls() -> None:
    nodes, options = cluster_options("redis-cluster://u:p%40ss@h1,h2:7001/")
    assert [(n.host, int(n.port)) for n in nodes] == [("h1", 6379), ("h2", 7001)]
    assert (options["username"], options["password"], options["ssl"]) == ("u", "p@ss", False)
    assert cluster_options("rediss-cluster://h")[1]["ssl"] is True
    for bad in ("redis-cluster://", "redis-cluster://h:port", "redis://h"):
        with pytest.raises(InvalidArgument):
            cluster_options(bad)
    backend = backend_from_url("redis-cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert isinstance(backend, RedisClusterBackend) and backend.crosses_processes


def test_url_tls_options() -> None:
    """The query of a rediss-cluster:// URL was dropped without a word: a private
    CA or a node reached by its IP could not be set up (found by a review)."""
    url = "rediss-cluster://h:7001?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false"
    _, options = cluster_options(url)
    assert (options["ssl_ca_certs"], options["ssl_check_hostname"]) == ("/etc/ca.pem", False)
    with pytest.raises(InvalidArgument, match="'db'"):
        cluster_options("redis-cluster://h:7001?db=1")
    assert "db" not in cluster_options("redis-cluster://h:7001?db=0")[1]
    with pytest.raises(InvalidArgument, match="'ssl_ca_cert'"):  # misspelt
        cluster_options("rediss-cluster://h:7001?ssl_ca_cert=/etc/ca.pem")
    with pytest.raises(InvalidArgument, match="rediss-cluster"):  # no TLS to set up
        cluster_options("redis-cluster://h:7001?ssl_ca_certs=/etc/ca.pem")
    backend = RedisClusterBackend("rediss-cluster://h", connection_options={"ssl_ca_data": "x"})
    assert backend._options["ssl_ca_data"] == "x"


def test_a_refused_login_wrapped_by_redis_py_is_not_retried() -> None:
    """redis-py wraps what failed a slot map refresh in a RedisClusterException: a
    wrong password was retried for ever with only debug lines (found by a review)."""
    from redis import exceptions as rexc

    from broadcast_history.backends._redis_shards import is_cluster_transient

    wrapped = rexc.RedisClusterException("Redis Cluster cannot be connected")
    wrapped.__cause__ = rexc.AuthenticationError("invalid username-password pair")
    assert not is_cluster_transient(wrapped)
    wrapped.__cause__ = rexc.ConnectionError("Connection refused")
    assert is_cluster_transient(wrapped)
    # What redis-py makes of a refused CLUSTER SLOTS: raised while handling it.
    inner = rexc.RedisClusterException("Cluster mode is not enabled on this node")
    inner.__context__ = rexc.NoPermissionError("this user has no permissions")
    wrapped.__cause__ = inner
    assert not is_cluster_transient(wrapped)


def test_a_password_with_a_slash_is_not_quoted() -> None:
    """Cut at the first "/", a password holding one was read as a server and quoted
    in the error (found by a review). Percent-encoded, it is read."""
    with pytest.raises(InvalidArgument, match="percent-encode") as raised:
        cluster_options("redis-cluster://user:zq/xw@h1:7001")
    assert "zq" not in str(raised.value) and "xw" not in str(raised.value)
    _, options = cluster_options("redis-cluster://user:zq%2Fxw@h1:7001")
    assert options["password"] == "zq/xw"


async def test_unreachable_cluster_fails_at_connect() -> None:
    backend = RedisClusterBackend(f"redis-cluster://127.0.0.1:{free_cluster_port()}")
    with pytest.raises(TransportError):
        await backend.connect()
    assert not backend.connected


async def test_a_cancelled_connect_leaves_no_connection_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connect() cancelled while a second startup node held up its reply (a
    timeout around ``connect``, a server shutting down) left open the connection to
    the first, which had answered: nothing closed it for as long as the process ran
    (found by a review)."""
    accepted: list[asyncio.StreamReader] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)  # it reads what it is sent and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    node = RedisClusterNodes(masters=1)
    try:
        (port,) = node.ports
        node.start_node(port)
        # Part of the slots only: redis-py asks the next startup node for the rest.
        node.command(port, "CLUSTER", "ADDSLOTSRANGE", "0", "99")
        # It asks them in a random order: the real node first, then the silent one.
        monkeypatch.setattr(random, "shuffle", lambda nodes: None)
        silent_port = server.sockets[0].getsockname()[1]
        url = f"redis-cluster://127.0.0.1:{port},127.0.0.1:{silent_port}"
        backend = RedisClusterBackend(url)
        connecting = asyncio.ensure_future(backend.connect())
        await wait_until(lambda: bool(accepted), 5, "asked the silent node")
        assert f"name={CLIENT_NAME}" in node.command(port, "CLIENT", "LIST")
        await asyncio.sleep(0.2)  # its CLUSTER SLOTS is on the way
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        await wait_until(
            lambda: f"name={CLIENT_NAME}" not in node.command(port, "CLIENT", "LIST"), 5, "closed"
        )
        (reader,) = accepted
        while await asyncio.wait_for(reader.read(4096), 5):  # closed: its stream ends
            pass
        assert not backend.connected
    finally:
        server.close()
        node.stop()


async def test_connect_disconnect_twice_and_wake_a_pending_receive(
    redis_cluster_url: str,
) -> None:
    backend = RedisClusterBackend(redis_cluster_url)
    await backend.connect()
    await backend.connect()
    assert backend.connected
    pending = asyncio.create_task(backend.next_published())
    await asyncio.sleep(0.05)
    await backend.disconnect()
    await backend.disconnect()
    with pytest.raises(NotConnected):
        await asyncio.wait_for(pending, 5)
    assert not backend.connected
    with pytest.raises(NotConnected):
        await backend.subscribe("after")
    with pytest.raises(NotConnected):
        await backend.publish("after", "m")


@pytest.fixture
async def admin(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    nodes, _ = cluster_options(redis_cluster_url)
    client = RedisCluster(startup_nodes=nodes, decode_responses=True)
    await client.initialize()
    yield client
    await client.aclose()


async def spublish_calls(admin: RedisCluster) -> dict[str, int]:
    """How many SPUBLISH commands each master has run."""
    calls = {}
    for node in admin.get_primaries():
        stats = await admin.info("commandstats", target_nodes=node)
        calls[node.name] = int(stats.get("cmdstat_spublish", {}).get("calls", 0))
    return calls


async def test_a_message_goes_to_one_shard(
    redis_cluster_url: str, admin: RedisCluster, tmp_path: Path
) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    channel = unique()
    owner = admin.get_node_from_key(channel)
    assert owner is not None
    async with Broadcast(redis_cluster_url, log=log) as broadcast:
        async with broadcast.subscribe(channel) as sub:
            for node in admin.get_primaries():  # subscribed on the owner only
                reply = await admin.execute_command(
                    "PUBSUB", "SHARDNUMSUB", channel, target_nodes=node
                )
                assert list(reply) == [channel, 1 if node.name == owner.name else 0]
            # Our connections speak RESP2 (see cluster_options).
            clients = await admin.client_list(target_nodes=owner)
            ours = [c for c in clients if c.get("name") == CLIENT_NAME]
            assert ours and all(c["resp"] == "2" for c in ours)
            before = await spublish_calls(admin)
            for i in range(20):
                await broadcast.publish(channel, f"m{i}")
            assert_contiguous(await take(sub, 20, timeout=10), 1, 20)
    # Read after the broadcast closed: its subscriber had each event at commit, while
    # the SPUBLISHes may still have been on their way; closing waits for them.
    after = await spublish_calls(admin)
    sent = {name: after[name] - before[name] for name in after}
    assert sent[owner.name] >= 1 and sum(sent.values()) == sent[owner.name]


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RedisClusterNodes]:
    """A cluster of this module's own, since its tests move slots and kill masters."""
    with RedisClusterNodes() as cluster:
        yield cluster


@pytest.fixture
async def own_admin(own_cluster: RedisClusterNodes) -> AsyncIterator[RedisCluster]:
    nodes, _ = cluster_options(own_cluster.url)
    client = RedisCluster(startup_nodes=nodes, decode_responses=True)
    await client.initialize()
    yield client
    await client.aclose()


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout}s")
        await asyncio.sleep(0.02)


async def test_slot_moved_to_another_master(
    own_cluster: RedisClusterNodes, own_admin: RedisCluster, tmp_path: Path
) -> None:
    """The old owner drops the subscription (SUNSUBSCRIBE); the new owner gets it."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    admin = own_admin
    channel = unique("moving")
    slot = admin.keyslot(channel)
    source = admin.get_node_from_key(channel)
    assert source is not None
    target = next(n for n in admin.get_primaries() if n.name != source.name)
    ids = {n.name: await admin.cluster_myid(n) for n in admin.get_primaries()}
    async with (
        Broadcast(own_cluster.url, log=log, idle_check=600) as broadcast,
        broadcast.subscribe(channel) as sub,
    ):
        await broadcast.publish(channel, "before")
        await admin.cluster_setslot(target, ids[source.name], slot, "IMPORTING")
        await admin.cluster_setslot(source, ids[target.name], slot, "MIGRATING")
        for node in admin.get_primaries():
            await admin.cluster_setslot(node, ids[target.name], slot, "NODE")
        await wait_until(lambda: target.name in broadcast.backend._shards, 10, "moved")
        await wait_until(lambda: broadcast.transport_connected, 10, "reconnected")
        reply = await admin.execute_command("PUBSUB", "SHARDNUMSUB", channel, target_nodes=target)
        assert list(reply) == [channel, 1]
        await broadcast.publish(channel, "after")
        assert [e.message for e in await take(sub, 2, timeout=5)] == ["before", "after"]


def on_every_master(admin: RedisCluster, per_master: int) -> list[str]:
    """Channel names, ``per_master`` of them owned by each master (in turn)."""
    wanted = {node.name: per_master for node in admin.get_primaries()}
    channels: list[str] = []
    while any(wanted.values()):
        channel = unique("shard")
        node = admin.get_node_from_key(channel)
        assert node is not None
        if wanted[node.name]:
            wanted[node.name] -= 1
            channels.append(channel)
    return channels


async def test_master_killed_mid_stream(
    own_cluster: RedisClusterNodes, own_admin: RedisCluster, tmp_path: Path
) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    channels = on_every_master(own_admin, 2)

    def backend() -> RedisClusterBackend:
        return RedisClusterBackend(own_cluster.url, max_reconnect_delay=0.2)

    publisher = Broadcast(backend=backend(), log=log)
    subscriber = Broadcast(backend=backend(), log=log, idle_check=0.2)
    published: dict[str, list[Event]] = {channel: [] for channel in channels}
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            channel = channels[i % len(channels)]
            published[channel].append(await publisher.publish(channel, f"m{i}"))
            i += 1
            await asyncio.sleep(0.002)

    def count() -> int:
        return sum(len(events) for events in published.values())

    async with publisher, subscriber, AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(subscriber.subscribe(c)) for c in channels]
        task = asyncio.create_task(publish())
        try:
            await wait_until(lambda: count() >= 60, 10, "60 published")
            victim = own_cluster.ports[0]
            own_cluster.kill_node(victim)
            await wait_until(lambda: not subscriber.transport_connected, 10, "disconnected")
            await asyncio.sleep(1.5)  # the cluster marks the node failed: all sends fail
            own_cluster.start_node(victim)
            await asyncio.to_thread(own_cluster.wait_ok)
            await wait_until(lambda: subscriber.transport_connected, 20, "reconnected")
            before = count()
            await wait_until(lambda: count() >= before + 60, 10, "60 more published")
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
        for channel, sub in zip(channels, subs, strict=True):
            received = await take(sub, len(published[channel]), timeout=30)
            assert_contiguous(received, 1, len(published[channel]))
            assert [e.message for e in received] == [e.message for e in published[channel]]
        # Subscribed again on every shard, and live there (a fresh client: the admin's
        # pooled connection to the killed master is dead).
        nodes, _ = cluster_options(own_cluster.url)
        admin = RedisCluster(startup_nodes=nodes, decode_responses=True)
        try:
            await admin.initialize()
            for channel in channels:
                owner = admin.get_node_from_key(channel)
                reply = await admin.execute_command(
                    "PUBSUB", "SHARDNUMSUB", channel, target_nodes=owner
                )
                assert list(reply) == [channel, 1]
        finally:
            await admin.aclose()
        for channel, sub in zip(channels, subs, strict=True):
            event = await publisher.publish(channel, "after")
            (last,) = await take(sub, 1, timeout=5)
            assert (last.offset, last.message) == (event.offset, "after")


async def _owned(cluster: RedisClusterNodes, per_master: int) -> tuple[list[str], dict[str, int]]:
    """``per_master`` channels on every master of ``cluster``, and their masters' ports."""
    nodes, _ = cluster_options(cluster.url)
    admin = RedisCluster(startup_nodes=nodes, decode_responses=True)
    await admin.initialize()
    try:
        channels = on_every_master(admin, per_master)
        owners = {c: admin.get_node_from_key(c).port for c in channels}  # type: ignore[union-attr]
    finally:
        await admin.aclose()
    return channels, owners


async def test_a_frozen_master_delays_no_other_masters_channels(tmp_path: Path) -> None:
    """A master that stops answering (SIGSTOP: a frozen process, a partition) held up
    every later live send, for every master's channels, 10 s per batch. It is set
    aside now, and publishing to it resumes once it answers again."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    # Nobody declares the frozen master failed while the test runs.
    with RedisClusterNodes(node_timeout_ms=60_000) as cluster:
        channels, owners = await _owned(cluster, 1)
        victim = cluster.ports[0]
        frozen = next(c for c in channels if owners[c] == victim)
        healthy = [c for c in channels if c != frozen]
        # Subscribers hear only live sends (and the gaps they reveal), not idle checks.
        async with (
            Broadcast(cluster.url, log=log) as publisher,
            Broadcast(cluster.url, log=log, idle_check=600) as subscriber,
            AsyncExitStack() as stack,
        ):
            subs = {c: await stack.enter_async_context(subscriber.subscribe(c)) for c in channels}
            process = cluster.processes[victim]
            process.send_signal(signal.SIGSTOP)
            try:
                for i in range(10):
                    for channel in channels:
                        await publisher.publish(channel, f"m{i}")
                    await asyncio.sleep(0.1)
                for channel in healthy:
                    received = await take(subs[channel], 10, timeout=8)  # was 10 s a batch
                    assert [e.message for e in received] == [f"m{i}" for i in range(10)]
                # Its channels' events are not sent: that is said, not hidden.
                assert not publisher.transport_connected
            finally:
                process.send_signal(signal.SIGCONT)
            # Asked again, it answers: its channel is live again (the gap it reveals
            # brings the ten events it missed from the log).
            stalled = publisher.backend._publisher._stalled  # type: ignore[attr-defined]
            await wait_until(lambda: not stalled, 10, "asked again")
            last = await publisher.publish(frozen, "after")
            received = await take(subs[frozen], last.offset, timeout=5)
            await wait_until(lambda: publisher.transport_connected, 5, "sending again")
            assert_contiguous(received, 1, last.offset)


async def test_a_lost_master_stops_no_other_masters_subscriptions(tmp_path: Path) -> None:
    """When a subscriber's shard connection to one master failed (frozen, then
    killed), every shard was closed and all channels placed again in one pass, which
    the lost master failed: no channel of any master was live until it came back
    (found by a black-box probe). Now only its own shard is opened again."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    with RedisClusterNodes(node_timeout_ms=60_000) as cluster:
        channels, owners = await _owned(cluster, 2)
        victim = cluster.ports[0]
        healthy = [c for c in channels if owners[c] != victim]
        receiving = RedisClusterBackend(cluster.url, ping_interval=0.3, max_reconnect_delay=0.2)
        async with (
            Broadcast(cluster.url, log=log) as publisher,
            Broadcast(backend=receiving, log=log, idle_check=600) as subscriber,
            AsyncExitStack() as stack,
        ):
            subs = {c: await stack.enter_async_context(subscriber.subscribe(c)) for c in channels}
            process = cluster.processes[victim]
            process.send_signal(signal.SIGSTOP)
            try:
                await wait_until(lambda: not subscriber.transport_connected, 10, "noticed")
                for round_ in range(3):
                    await asyncio.sleep(1.0)  # resubscription attempts meanwhile
                    for channel in healthy:
                        event = await publisher.publish(channel, f"r{round_}")
                        (got,) = await take(subs[channel], 1, timeout=5)
                        assert got == event
                cluster.kill_node(victim)  # and now gone: refused at once
                for channel in healthy:
                    event = await publisher.publish(channel, "after the kill")
                    (got,) = await take(subs[channel], 1, timeout=5)
                    assert got == event
            finally:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)


async def test_a_process_starts_while_the_first_master_is_down(tmp_path: Path) -> None:
    """connect() asked the master of slot 0 for redis-py's command table, which this
    transport never uses: while that one master was down, no process could start,
    although the others served their channels (found by a black-box probe)."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    # Nobody declares the killed master failed while the test runs.
    with RedisClusterNodes(node_timeout_ms=60_000) as cluster:
        channels, owners = await _owned(cluster, 1)
        # One channel a master: the lowest slot's is on the master of slot 0.
        first = owners[min(channels, key=lambda c: key_slot(c.encode()))]
        healthy = next(c for c in channels if owners[c] != first)
        cluster.kill_node(first)
        async with Broadcast(cluster.url, log=log) as broadcast:
            async with broadcast.subscribe(healthy) as sub:
                event = await broadcast.publish(healthy, "live")
                assert await asyncio.wait_for(sub.get(), 5) == event
            assert broadcast.stats.delivered_live == 1


@pytest.mark.parametrize("connection", ["new", "open"])
async def test_a_subscribe_on_a_frozen_master_holds_up_no_other_subscribe(
    connection: str, tmp_path: Path
) -> None:
    """A subscribe places its channel on its master while holding the transport's
    lock: on a frozen master it waited for redis-py's 10 s socket timeout, and every
    subscribe to any other master's channel waited behind it, 19-29 s in a probe.
    On a connection already open to that master (its freeze not noticed yet) it waits
    5 s for a confirmation; every other subscribe waited behind it too, since a
    broadcast's subscribes went one at a time."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    with RedisClusterNodes(node_timeout_ms=60_000) as cluster:
        channels, owners = await _owned(cluster, 2)
        victim = cluster.ports[0]
        first, frozen = [c for c in channels if owners[c] == victim]
        healthy = next(c for c in channels if owners[c] != victim)
        async with Broadcast(cluster.url, log=log) as broadcast, AsyncExitStack() as stack:
            if connection == "open":
                await stack.enter_async_context(broadcast.subscribe(first))
            process = cluster.processes[victim]
            process.send_signal(signal.SIGSTOP)
            try:
                stuck = asyncio.ensure_future(
                    stack.enter_async_context(broadcast.subscribe(frozen))
                )
                await asyncio.sleep(0.3)  # its SSUBSCRIBE is under way
                # A new connection's SSUBSCRIBE holds the transport's lock up to 2 s.
                sub = await asyncio.wait_for(
                    stack.enter_async_context(broadcast.subscribe(healthy)),
                    4 if connection == "new" else 2,
                )
                event = await broadcast.publish(healthy, "m")
                assert await asyncio.wait_for(sub.get(), 5) == event
                await asyncio.wait_for(stuck, 15)  # bounded too
            finally:
                process.send_signal(signal.SIGCONT)


async def test_a_subscribe_whose_masters_connection_is_lost_returns_at_once(
    tmp_path: Path,
) -> None:
    """A subscribe whose SSUBSCRIBE went out on a master's connection that was then
    lost waited the whole 5 s for a confirmation that could not come."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    with RedisClusterNodes(node_timeout_ms=60_000) as cluster:
        channels, owners = await _owned(cluster, 2)
        victim = cluster.ports[0]
        first, second = [c for c in channels if owners[c] == victim]
        async with Broadcast(cluster.url, log=log) as broadcast, AsyncExitStack() as stack:
            await stack.enter_async_context(broadcast.subscribe(first))  # its connection
            cluster.processes[victim].send_signal(signal.SIGSTOP)
            waiting = asyncio.ensure_future(stack.enter_async_context(broadcast.subscribe(second)))
            await asyncio.sleep(0.3)  # its SSUBSCRIBE is out; no answer comes
            assert not waiting.done()
            cluster.kill_node(victim)  # and the connection is lost
            await asyncio.wait_for(waiting, 1.5)


async def test_a_subscribe_cancelled_while_its_master_is_frozen_leaves_nothing_subscribed(
    tmp_path: Path,
) -> None:
    """A subscribe cancelled while waiting for a frozen master's confirmation forgot
    where its SSUBSCRIBE went, so its undo sent no SUNSUBSCRIBE: the node kept the
    channel subscribed for good, its messages read and dropped (found by a review)."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    with RedisClusterNodes(node_timeout_ms=60_000) as cluster:
        channels, owners = await _owned(cluster, 2)
        victim = cluster.ports[0]
        first, second = [c for c in channels if owners[c] == victim]

        def subscribed(channel: str) -> int:
            return int(cluster.command(victim, "PUBSUB", "SHARDNUMSUB", channel).split()[-1])

        async with Broadcast(cluster.url, log=log) as broadcast, broadcast.subscribe(first):
            process = cluster.processes[victim]
            process.send_signal(signal.SIGSTOP)
            try:
                leaving = asyncio.ensure_future(broadcast.subscribe(second).__aenter__())
                await asyncio.sleep(0.5)  # its SSUBSCRIBE is sent; no answer comes
                leaving.cancel()  # the client went away
                with pytest.raises(asyncio.CancelledError):
                    await leaving
            finally:
                process.send_signal(signal.SIGCONT)
            await wait_until(lambda: subscribed(second) == 0, 5, "unsubscribed")
            assert subscribed(first) == 1


async def test_a_permanent_failure_reaches_the_receiver(
    redis_cluster_url: str, admin: RedisCluster
) -> None:
    """An ACL refusal of SSUBSCRIBE cannot be retried away: next_published raises."""
    for node in admin.get_primaries():
        await admin.execute_command(
            "ACL", "SETUSER", "bh-limited", "on", ">secret", "~*", "&allowed-*", "+@all",
            target_nodes=node,
        )  # fmt: skip
    url = redis_cluster_url.replace("://", "://bh-limited:secret@", 1)
    backend = RedisClusterBackend(url)
    await backend.connect()
    try:
        await backend.subscribe("allowed-1")
        pending = asyncio.create_task(backend.next_published())
        with contextlib.suppress(TransportError):
            await backend.subscribe(unique("denied"))
        with pytest.raises(TransportError):
            await asyncio.wait_for(pending, 10)
    finally:
        await backend.disconnect()
