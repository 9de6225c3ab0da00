"""The Kafka broker process killed and restarted while a publisher runs.

The broker (tansu) keeps its data in memory, so a restart also loses every topic and
offset: harsher than a real Kafka restart. The subscriber must still see every event
once, in order, and live delivery must come back (its idle log check is set far
beyond the test's deadlines, so only the transport can bring the tail in).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broadcast_history import Broadcast, Event
from broadcast_history.backends.kafka import KafkaBackend
from tests.conftest import unique
from tests.support.helpers import assert_contiguous, take
from tests.support.kafka_broker import TansuBroker
from tests.support.ports import free_port
from tests.support.proxy import CuttableProxy


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    """A broker of this module's own, since the tests kill it."""
    with TansuBroker() as broker:
        yield broker


def fast_backend(broker: TansuBroker) -> KafkaBackend:
    return KafkaBackend(
        f"kafka://{broker.bootstrap}", ping_interval=0.2, max_reconnect_delay=0.5, timeout=2
    )


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("outage", [0.0, 1.0], ids=["instant-restart", "1s-outage"])
async def test_broker_restart_mid_stream(
    broker: TansuBroker, tmp_path: Path, outage: float
) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    channel = unique("faults")
    publisher = Broadcast(backend=fast_backend(broker), log=log)
    subscriber = Broadcast(backend=fast_backend(broker), log=log, idle_check=600)
    published: list[Event] = []
    stop = asyncio.Event()

    async def publish() -> None:
        while not stop.is_set():
            published.append(await publisher.publish(channel, f"m{len(published)}"))
            await asyncio.sleep(0.005)

    async with publisher, subscriber, subscriber.subscribe(channel) as sub:
        task = asyncio.create_task(publish())
        try:
            # Consumer positions reach ~150 before the crash, and only 30 events follow
            # the recovery: the tail comes live only if the positions left past the
            # end of the re-created topics were rewound.
            await wait_until(lambda: len(published) >= 150, 20)
            await asyncio.to_thread(broker.stop)
            if outage:
                await wait_until(lambda: not subscriber.transport_connected, 10)
                await asyncio.sleep(outage)
            await asyncio.to_thread(broker.start)
            await wait_until(
                lambda: publisher.transport_connected and subscriber.transport_connected, 20
            )
            mark = len(published)
            await wait_until(lambda: len(published) >= mark + 30, 20)
        finally:
            stop.set()
            await task
        # One more after a pause. A live send right after the restart can fail (tansu
        # answers a produce into a topic it just re-created with UnknownError; the
        # appender abandons that send, as designed): a lost tail has no later live
        # event to reveal it, and the idle check is off here. Live delivery is back if
        # this one arrives; it also reveals any hole before it, read from the log.
        await asyncio.sleep(0.5)
        published.append(await publisher.publish(channel, f"m{len(published)}"))
        events = await take(sub, len(published), timeout=30)
    assert_contiguous(events, 1, len(published))
    assert [e.message for e in events] == [e.message for e in published]


@pytest.mark.parametrize(("wait", "cut_short"), [(0.2, False), (1.0, False), (0.2, True)])
async def test_disconnect_after_the_broker_died_closes_everything(
    broker: TansuBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wait: float,
    cut_short: bool,
) -> None:
    """aiokafka's consumer, stopped after the broker died, raises the cancellation of
    its own fetch task: disconnect() raised CancelledError nobody asked for, and the
    producer and the other clients were left open. Each client's close is bounded
    (CLOSE_WAIT): a producer still flushing to the dead broker was cut off before it
    closed its network client, whose metadata task went on retrying after disconnect
    (seen in a loaded run); a close cut short closes that client (cut_short)."""
    from broadcast_history.backends import kafka

    monkeypatch.setattr(kafka, "CLOSE_WAIT", 0.2 if cut_short else kafka.CLOSE_WAIT)
    backend = fast_backend(broker)
    channel = unique("faults")
    broadcast = Broadcast(backend=backend, log=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}")
    await broadcast.connect()
    try:
        async with broadcast.subscribe(channel) as sub:
            event = await broadcast.publish(channel, "before")
            assert await take(sub, 1) == [event]
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(wait)
            clients = [backend._producer, backend._consumer, backend._lookup]
            if cut_short:

                async def flushing_forever() -> None:  # batches for a broker that is gone
                    await asyncio.sleep(3600)

                monkeypatch.setattr(backend._producer, "stop", flushing_forever)
            closing = asyncio.ensure_future(broadcast.disconnect())
            await asyncio.wait_for(asyncio.shield(closing), 20)
        # Each client closed to its end (its metadata task stopped), the producer too.
        kafka_clients = [getattr(c, "client", None) or getattr(c, "_client", None) for c in clients]
        assert [k is not None and k._sync_task is None for k in kafka_clients] == [True] * 3
    finally:
        await asyncio.wait_for(broadcast.disconnect(), 20)
        await asyncio.to_thread(broker.start)


async def test_subscribes_while_the_broker_is_away_return_at_once(
    broker: TansuBroker, tmp_path: Path
) -> None:
    """Each subscribe and unsubscribe tried the broker for the whole timeout under one
    lock: with the broker known to be away, the k-th of many subscribers entered after
    k timeouts (100 reconnecting clients: minutes with nothing, though the log had
    their events). Now they are assigned when the broker comes back."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    channels = [unique("away") for _ in range(4)]
    async with (
        Broadcast(backend=fast_backend(broker), log=log) as publisher,
        Broadcast(backend=fast_backend(broker), log=log, idle_check=600) as subscriber,
    ):
        await asyncio.to_thread(broker.stop)
        try:
            await wait_until(lambda: not subscriber.transport_connected, 10)
            stored = [await publisher.publish(c, "stored") for c in channels]

            async def enter(channel: str) -> Event:
                async with subscriber.subscribe(channel, since=0) as sub:
                    (event,) = await take(sub, 1)
                return event

            # Bounded below the 4 timeouts of 2 s they took one after another.
            got = await asyncio.wait_for(asyncio.gather(*map(enter, channels)), 6)
            assert got == stored
        finally:
            await asyncio.to_thread(broker.start)
        async with subscriber.subscribe(channels[0]) as sub:
            await wait_until(lambda: subscriber.transport_connected, 20)
            event = await publisher.publish(channels[0], "live")
            assert await take(sub, 1, timeout=10) == [event]


async def test_connections_gone_silent_are_replaced(tmp_path: Path) -> None:
    """Connections that go silent without a reset (a NAT or firewall that forgot them,
    a frozen host) kept the transport down for good: its ping, cancelled at
    ``timeout``, left its request waiting in the dead connection, which only aiokafka's
    own request timeout closes, and a cancelled request never times out."""
    proxy = CuttableProxy("127.0.0.1", free_port())
    port = await proxy.start()
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    channel = unique("silent")

    def backend() -> KafkaBackend:
        return KafkaBackend(
            f"kafka://127.0.0.1:{port}",
            ping_interval=0.2,
            max_reconnect_delay=0.5,
            timeout=1,
            client_options={"request_timeout_ms": 3000},
        )

    publisher = Broadcast(backend=backend(), log=log)
    subscriber = Broadcast(backend=backend(), log=log, idle_check=600)
    with TansuBroker(proxy.port, advertised=port):
        try:
            async with publisher, subscriber, subscriber.subscribe(channel) as sub:
                first = await publisher.publish(channel, "before")
                assert await take(sub, 1) == [first]
                proxy.stall()  # every connection open now carries nothing, for good
                await wait_until(lambda: not subscriber.transport_connected, 10)
                await wait_until(
                    lambda: publisher.transport_connected and subscriber.transport_connected,
                    30,
                )
                # Live again: with the idle check off, only the transport brings
                # events in. The publisher's own connections go silent as well: its
                # sends fail until aiokafka's request timeout replaces them too, and
                # the first live event that arrives brings those before from the log.
                published: list[Event] = []

                async def publish() -> None:
                    while True:
                        published.append(await publisher.publish(channel, "after"))
                        await asyncio.sleep(0.3)

                task = asyncio.create_task(publish())
                try:
                    arrived = await asyncio.wait_for(sub.get(), 15)
                finally:
                    task.cancel()
                assert arrived == published[0]
        finally:
            await proxy.stop()


async def test_sends_while_the_broker_is_away_count_as_failed(
    broker: TansuBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Known away, the transport skipped sends quietly: each counted as one that worked,
    so the first of an outage logged "live sends work again" at once, and
    live_send_failures stayed at 1 whatever the outage's length."""
    publisher = Broadcast(
        backend=fast_backend(broker), log=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"
    )
    channel = unique("away")
    async with publisher:
        async with publisher.subscribe(channel) as sub:
            await publisher.publish(channel, "before")
            # Received live: its send is over and its topic made. A send still under
            # way when the broker died (creating the topic) fails only at its timeout,
            # and the sends below waited behind it, counted as one batch.
            assert (await asyncio.wait_for(sub.get(), 10)).message == "before"
            assert publisher.stats.delivered_live == 1
        await asyncio.to_thread(broker.stop)
        try:
            await wait_until(lambda: not publisher.transport_connected, 10)
            await publisher.publish(channel, "away")
            await wait_until(lambda: publisher.stats.live_send_failures > 0, 10)
            caplog.clear()
            failed = publisher.stats.live_send_failures
            for i in range(5):
                await publisher.publish(channel, f"away {i}")
                await asyncio.sleep(0.1)  # a live send each (a batch counts once)
            await wait_until(lambda: publisher.stats.live_send_failures >= failed + 5, 10)
            assert "work again" not in caplog.text
        finally:
            await asyncio.to_thread(broker.start)
