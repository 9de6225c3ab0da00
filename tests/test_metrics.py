"""Prometheus metrics: each one provoked by the event it counts.

Every test uses a registry of its own. Faults come from a transport that drops or
fails on purpose (fault injection over the in-process transport) and, for the
reconnect metrics, from a Redis connection killed on the server.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from broadcast_history import Broadcast, InvalidMessage, MessageTooLarge, _envelope  # noqa: E402
from broadcast_history._wire import Objects  # noqa: E402
from broadcast_history.admin import create_app  # noqa: E402
from broadcast_history.backends.memory import MemoryBackend  # noqa: E402
from tests.conftest import REDIS_URL, require_redis, unique  # noqa: E402
from tests.support.helpers import settled, take  # noqa: E402

PREFIX = "broadcast_history_"


class Faulty(MemoryBackend):
    """The in-process transport, with faults: drop chosen offsets, or fail sends.

    With ``text=True`` it carries envelopes as a network transport does, to every
    backend on the same ``bus`` (two broadcasts then behave as two processes). A
    lone broadcast's own subscribers get its events at commit, so a drop shows only
    to another broadcast on the bus.
    """

    def __init__(
        self, *, text: bool = False, limit: int | None = None, bus: list[Faulty] | None = None
    ) -> None:
        super().__init__()
        self.drop: set[int] = set()
        self.fail = False
        self.carries_objects = not text
        self.max_message_size = limit
        self.bus = bus if bus is not None else [self]
        if self not in self.bus:
            self.bus.append(self)

    async def publish_many(self, messages: Sequence[tuple[str, Any]]) -> None:
        if self.fail:
            raise OSError("the transport is down")
        for channel, message in messages:
            for kept in self._without_dropped(channel, message):
                for backend in self.bus:
                    await MemoryBackend.publish(backend, channel, kept)

    def _without_dropped(self, channel: str, message: Any) -> list[Any]:
        """``message`` without the events whose offsets are in ``drop``."""
        if not self.drop:
            return [message]
        if isinstance(message, Objects):
            kept = tuple(event for event in message.events if event.offset not in self.drop)
            return [message._replace(events=kept)] if kept else []
        _, log_id, sender, _ = message.split(":", 3)  # bh2:<log id>:<sender>:<body>
        events = _envelope.decode(channel, message, log_id)
        left = [event for event in events if event.offset not in self.drop]
        return _envelope.encode(left, log_id, self.max_message_size, sender)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(PREFIX + name, labels)
    return 0.0 if found is None else found


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def faulty(registry: CollectorRegistry) -> AsyncIterator[tuple[Broadcast, Faulty]]:
    backend = Faulty()
    broadcast = Broadcast(backend=backend, metrics=registry, idle_check=0.1, reorder_window=0.01)
    async with broadcast:
        yield broadcast, backend


async def test_publishes_batches_commits_and_failures(
    faulty: tuple[Broadcast, Faulty], registry: CollectorRegistry
) -> None:
    broadcast, _ = faulty
    await asyncio.gather(*[broadcast.publish("c", f"m{i}") for i in range(50)])
    assert value(registry, "publishes_total") == 50
    assert 1 <= value(registry, "batch_size_count") <= 50
    assert value(registry, "batch_size_sum") == 50
    assert value(registry, "commit_seconds_count") == value(registry, "batch_size_count")
    with pytest.raises(InvalidMessage):
        await broadcast.publish("c", "\ud800")
    with pytest.raises(MessageTooLarge):
        await broadcast.publish("c", b"x" * (broadcast.max_message_size + 1))
    assert value(registry, "publish_failures_total", reason="invalid") == 1
    assert value(registry, "publish_failures_total", reason="too_large") == 1


async def test_gap_idle_and_delivery_sources(
    registry: CollectorRegistry, sqlite_file_url: str
) -> None:
    # Two broadcasts on one text bus, as two processes: a broadcast's own subscribers
    # get its events at commit, so only another's can miss what the transport drops.
    bus: list[Faulty] = []
    sender, receiver = Faulty(text=True, bus=bus), Faulty(text=True, bus=bus)
    channel = unique()
    sender.drop = {2, 5}  # 2: a hole the next event shows; 5: the last, only idle finds it
    async with (
        Broadcast(backend=sender, log=sqlite_file_url) as publisher,
        Broadcast(
            backend=receiver,
            log=sqlite_file_url,
            metrics=registry,
            idle_check=0.1,
            reorder_window=0.01,
        ) as broadcast,
    ):
        async with broadcast.subscribe(channel) as sub:
            assert value(registry, "subscribers", mode="live") == 1
            published = [await publisher.publish(channel, f"m{i}") for i in range(4)]
            assert await take(sub, 4) == published
            last = await publisher.publish(channel, "never sent live")
            assert await take(sub, 1) == [last]
        assert value(registry, "subscribers", mode="live") == 0
    assert value(registry, "subscriber_fallbacks_total", reason="gap") >= 1
    assert value(registry, "subscriber_fallbacks_total", reason="idle") >= 1
    live, log = (
        value(registry, "delivered_total", source="live"),
        value(registry, "delivered_total", source="log"),
    )
    assert live + log == 5 and live >= 1 and log >= 2


async def test_overflow_of_a_stalled_subscriber(registry: CollectorRegistry) -> None:
    async with Broadcast(metrics=registry, buffer_size=5) as broadcast:
        async with broadcast.subscribe("c") as sub:
            published = [await broadcast.publish("c", f"m{i}") for i in range(20)]
            assert await take(sub, 20) == published
    assert value(registry, "subscriber_fallbacks_total", reason="overflow") >= 1


async def test_notice_and_live_send_failures(
    registry: CollectorRegistry, sqlite_file_url: str
) -> None:
    bus: list[Faulty] = []
    sender, receiver = Faulty(text=True, limit=500, bus=bus), Faulty(text=True, bus=bus)
    async with (
        Broadcast(backend=sender, log=sqlite_file_url, idle_check=0.1) as publisher,
        Broadcast(backend=receiver, log=sqlite_file_url, metrics=registry) as broadcast,
        broadcast.subscribe("c") as sub,
    ):
        big = await publisher.publish("c", "x" * 2000)  # over the transport's limit
        assert await take(sub, 1) == [big]
        sender.fail = True
        lost = await publisher.publish("c", "sent into the void")
        assert await take(sub, 1) == [lost]  # from the log, by the idle check
    assert value(registry, "subscriber_fallbacks_total", reason="notice") == 1
    assert publisher.stats.live_send_failures == 1


@pytest.mark.alone  # kills every worker's connections of a kind on the shared Redis
async def test_foreign_messages_and_reconnects_on_redis(
    registry: CollectorRegistry, sqlite_file_url: str
) -> None:
    require_redis()
    import redis.asyncio as aioredis

    from broadcast_history.backends.redis import RedisBackend

    admin = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    backend = RedisBackend(REDIS_URL, max_reconnect_delay=0.2)
    channel = unique()
    try:
        async with Broadcast(backend=backend, log=sqlite_file_url, metrics=registry) as b:
            async with b.subscribe(channel) as sub:
                await admin.publish(channel, "from redis-cli")  # not an envelope
                event = await b.publish(channel, "ours")
                assert await take(sub, 1) == [event]
                # Ours came at commit; the message before it, once Redis's reader got there.
                ignored = await settled(
                    lambda: value(registry, "foreign_messages_total", kind="not_envelope"), 1
                )
                assert ignored == 1
                assert value(registry, "transport_up") == 1
                await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                seen_down = False
                for _ in range(200):
                    seen_down = seen_down or value(registry, "transport_up") == 0
                    if value(registry, "transport_reconnects_total") >= 1:
                        break
                    await asyncio.sleep(0.01)
                assert value(registry, "transport_reconnects_total") >= 1
                assert value(registry, "transport_up") == 1
                after = await b.publish(channel, "after the reconnect")
                assert await take(sub, 1) == [after]
    finally:
        await admin.aclose()
    assert seen_down or backend.reconnects >= 1


async def test_metrics_route_of_the_admin_app(faulty: tuple[Broadcast, Faulty]) -> None:
    broadcast, _ = faulty
    await broadcast.publish("c", "x")
    app = create_app(broadcast, token="t")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
        assert (await client.get("/metrics")).status_code == 401
        response = await client.get("/metrics", headers={"Authorization": "Bearer t"})
    assert response.status_code == 200
    assert "broadcast_history_publishes_total 1.0" in response.text
    assert "# TYPE broadcast_history_commit_seconds histogram" in response.text


async def test_many_broadcasts_share_a_registry(registry: CollectorRegistry) -> None:
    async with Broadcast(metrics=registry) as one, Broadcast(metrics=registry) as two:
        await one.publish("c", "a")
        await two.publish("c", "b")
        assert value(registry, "publishes_total") == 2
    del one, two
    assert value(registry, "publishes_total") == 2  # a counter never goes back


def test_reconnects_stay_counted_when_the_transport_is_made_anew(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """A broadcast left connected by an event loop that ended makes its transport anew
    at the next connect(): transport_reconnects_total went back to the new one's 0."""

    async def left_connected(broadcast: Broadcast) -> None:
        await broadcast.connect()
        broadcast.backend.reconnects = 3  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)  # lets the broadcast's own tasks start
        # And the first read of the lags end (slow in a loaded run): a log call left
        # pending in a closed loop fails when it is collected, which pytest reports.
        for _ in range(500):
            if not broadcast.log._running:
                break
            await asyncio.sleep(0.01)

    async def used_again(broadcast: Broadcast) -> None:
        async with broadcast:
            assert value(registry, "transport_reconnects_total") == 3

    broadcast = Broadcast(
        "memory://", log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", metrics=registry
    )
    loop = asyncio.new_event_loop()  # closed without disconnect()
    loop.run_until_complete(left_connected(broadcast))
    loop.close()
    assert value(registry, "transport_reconnects_total") == 3
    asyncio.run(used_again(broadcast))
    first = broadcast.backend
    asyncio.run(used_again(broadcast))
    assert broadcast.backend is first  # disconnected cleanly: kept
    del broadcast, first
    gc.collect()
    assert value(registry, "transport_reconnects_total") == 3  # a counter never goes back


LAG_LINE = 'broadcast_history_consumer_lag{channel="orders",consumer="mailer"} 3.0'


async def _lagging_by_3(broadcast: Broadcast) -> None:
    """Consumer "mailer" of "orders" committed 2 of 5 events."""
    for i in range(5):
        await broadcast.publish("orders", f"o{i}")
    async with broadcast.subscribe("orders", consumer="mailer", since=0) as sub:
        await take(sub, 2)
        await sub.commit()


async def test_consumer_lag_at_scrape_time(sqlite_file_url: str) -> None:
    registry = CollectorRegistry()
    async with Broadcast(log=sqlite_file_url, metrics=registry) as broadcast:
        await _lagging_by_3(broadcast)
        app = create_app(broadcast, token="t")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            response = await client.get("/metrics", headers={"Authorization": "Bearer t"})
    assert LAG_LINE in response.text


async def test_a_scrape_does_not_wait_for_a_silent_log(
    sqlite_file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin app's /metrics waited for the consumer lags as long as the log did
    not answer (90 s in a probe's stall): past Prometheus' scrape timeout every metric
    of the target was gone, log_unavailable included."""
    from broadcast_history import _metrics

    monkeypatch.setattr(_metrics, "SCRAPE_WAIT", 0.3)
    registry = CollectorRegistry()
    async with Broadcast(log=sqlite_file_url, metrics=registry) as broadcast:
        await _lagging_by_3(broadcast)
        app = create_app(broadcast, token="t")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            response = await client.get("/metrics", headers={"Authorization": "Bearer t"})
            assert LAG_LINE in response.text

            async def silent(*args: Any) -> Any:
                await asyncio.sleep(3600)

            monkeypatch.setattr(broadcast.log, "consumer_lags", silent)
            response = await asyncio.wait_for(
                client.get("/metrics", headers={"Authorization": "Bearer t"}), 5
            )
    assert response.status_code == 200
    assert LAG_LINE in response.text  # the last lags read
    assert "broadcast_history_publishes_total" in response.text


async def test_costly_lags_are_read_again_when_their_cost_allows(
    sqlite_file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the lags orders every committed consumer (250,000: 0.25-0.4 s of the
    database's time) for each scrape and every 15 s in each process: a read of many
    answers the scrapes within 20 times as long as it took."""
    from broadcast_history import _metrics

    monkeypatch.setattr(_metrics, "LAGS_MANY", 1)
    registry = CollectorRegistry()
    async with Broadcast(log=sqlite_file_url, metrics=registry) as broadcast:
        await _lagging_by_3(broadcast)
        lags = broadcast.log.consumer_lags
        reads = 0

        async def costly(limit: int) -> Any:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.1)  # a log of very many consumers
            return await lags(limit)

        monkeypatch.setattr(broadcast.log, "consumer_lags", costly)
        for _ in range(3):
            text = (await asyncio.to_thread(generate_latest, registry)).decode()
            assert LAG_LINE in text
        assert reads == 1
        await broadcast.log.set_consumer("orders", "mailer", 5)
        await asyncio.sleep(1.5)  # less than 20 times the read
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        assert LAG_LINE in text and reads == 1
        for _ in range(50):  # at 20 times the read (and the log's own time)
            await asyncio.sleep(0.1)
            text = (await asyncio.to_thread(generate_latest, registry)).decode()
            if reads == 2:
                break
        assert LAG_LINE.replace("3.0", "0.0") in text and reads == 2


async def test_a_consumer_stuck_on_a_reset_channel_keeps_its_lag(sqlite_file_url: str) -> None:
    """A consumer whose position belongs to an earlier epoch of its channel (deleted,
    then published to again) raises StreamReset each time its worker starts: its
    series went missing, so the lag alert could not fire."""
    registry = CollectorRegistry()
    async with Broadcast(log=sqlite_file_url, metrics=registry) as broadcast:
        await _lagging_by_3(broadcast)
        await broadcast.log.delete_channel("orders")
        for i in range(4):
            await broadcast.publish("orders", f"again {i}")
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        assert 'broadcast_history_consumer_lag{channel="orders",consumer="mailer"} 4.0' in text
        await broadcast.log.delete_channel("orders")
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        assert "consumer_lag{" not in text  # nothing to do: the channel is gone


async def test_consumer_lag_has_a_series_for_the_largest_lags_only(
    log_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer's row outlives its worker (a consumer name per session leaves one
    each): the collector held, and every scrape sent, a series for each consumer
    ever committed (45,000 per-session consumers: RSS 71 -> 112 MB, scrapes of
    megabytes). The series are the largest lags; a gauge counts them all."""
    from broadcast_history import _metrics

    monkeypatch.setattr(_metrics, "LAG_SERIES", 3, raising=False)
    registry = CollectorRegistry()
    async with Broadcast(log=log_url, metrics=registry) as broadcast:
        log = broadcast.log
        for i in range(6):
            await broadcast.publish("orders", f"o{i}")
        for position in range(1, 6):  # lags 5, 4, 3, 2, 1
            await log.set_consumer("orders", f"c{position}", position)
        # A position of an earlier epoch lags by every event of the channel now.
        for channel in ("old", "gone"):
            await broadcast.publish(channel, "first")
            await log.set_consumer(channel, "x", 1)
            await log.delete_channel(channel)
        for i in range(4):
            await broadcast.publish("old", f"again {i}")
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
    lines = [line for line in text.splitlines() if line.startswith(_PREFIX_LAG)]
    assert lines == [
        _PREFIX_LAG + '{channel="old",consumer="x"} 4.0',
        _PREFIX_LAG + '{channel="orders",consumer="c1"} 5.0',
        _PREFIX_LAG + '{channel="orders",consumer="c2"} 4.0',
    ]
    # The one of a channel that is gone has nothing to do: not counted.
    assert "\nbroadcast_history_consumers 6.0\n" in text


_PREFIX_LAG = "broadcast_history_consumer_lag"


async def test_a_consumer_name_in_two_logs_has_the_larger_lag(tmp_path: Path) -> None:
    """Broadcasts of two logs in one registry, one consumer name in both: its series
    showed whichever lag came last, which hid the larger one from the alert."""
    for behind in (True, False):
        registry = CollectorRegistry()
        logs = [f"sqlite+aiosqlite:///{tmp_path / f'{name}{behind}.db'}" for name in "ab"]
        async with Broadcast(log=logs[0], metrics=registry) as lagging:
            async with Broadcast(log=logs[1], metrics=registry) as current:
                for broadcast in (current, lagging) if behind else (lagging, current):
                    await _lagging_by_3(broadcast)
                await current.log.set_consumer("orders", "mailer", 5)
                text = (await asyncio.to_thread(generate_latest, registry)).decode()
        assert LAG_LINE in text, behind
        assert "\nbroadcast_history_consumers 2.0\n" in text


async def test_consumer_lag_read_for_a_scrape_from_another_thread(sqlite_file_url: str) -> None:
    """prometheus-client's own HTTP server scrapes in a thread of its own: the lag
    is read for that scrape, not up to 15 s later. A scrape on the loop's thread
    cannot wait for the loop: it gets the last values, without blocking."""
    registry = CollectorRegistry()
    async with Broadcast(log=sqlite_file_url, metrics=registry) as broadcast:
        await _lagging_by_3(broadcast)
        generate_latest(registry)  # on the loop's thread: the last values, at once
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        assert LAG_LINE in text
