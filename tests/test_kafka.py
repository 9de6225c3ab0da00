"""The Kafka transport against a real Kafka-protocol broker (tansu, one per session)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broadcast_history import Broadcast, InvalidArgument, NotConnected, TransportError
from broadcast_history.backends import backend_from_url
from broadcast_history.backends.kafka import KafkaBackend, _servers, topic_for
from tests.conftest import unique
from tests.support.helpers import assert_contiguous, take

ODD_CHANNELS = [
    "chat/room 1",
    "chat_room_1",  # sanitizes like the one above: the hash keeps them apart
    "ünïcødé-😀",
    "..",
    "a" * 255,
    "é" * 255,
    "tab\there"[:3] + "-x:y@z#",
]


# -- topic names (no broker needed) ------------------------------------------------


@pytest.mark.parametrize("channel", ODD_CHANNELS)
def test_topic_names_are_valid_kafka_topics(channel: str) -> None:
    topic = topic_for(channel)
    assert re.fullmatch(r"[a-zA-Z0-9._-]{1,249}", topic)
    assert topic not in {".", ".."}
    assert topic == topic_for(channel)  # stable across processes


def test_topic_names_are_distinct() -> None:
    topics = {topic_for(channel) for channel in ODD_CHANNELS}
    assert len(topics) == len(ODD_CHANNELS)
    assert topic_for("a" * 255) != topic_for("a" * 254 + "b")  # differ past the cut


def test_topic_prefix() -> None:
    assert topic_for("orders", "app.").startswith("app.orders.")
    KafkaBackend("kafka://h:1", topic_prefix="p" * 128)
    for bad in ("bad prefix/", "p" * 129):  # Kafka refuses such topics (tansu does not)
        with pytest.raises(InvalidArgument, match="topic_prefix"):
            KafkaBackend("kafka://h:1", topic_prefix=bad)


def test_bootstrap_servers_from_urls() -> None:
    assert _servers("kafka://a:1,b:2") == ["a:1", "b:2"]
    assert _servers(["kafka://a:1", "kafka://b"]) == ["a:1", "b:9092"]
    assert _servers("a:1") == ["a:1"]
    with pytest.raises(ValueError, match="bootstrap"):
        _servers("kafka://")


def test_url_scheme_selects_kafka() -> None:
    backend = backend_from_url("kafka://localhost:9092")
    assert isinstance(backend, KafkaBackend)


# -- against the broker --------------------------------------------------------------


@pytest.fixture
async def backend(kafka_bootstrap: str) -> AsyncIterator[KafkaBackend]:
    backend = KafkaBackend(f"kafka://{kafka_bootstrap}")
    await backend.connect()
    yield backend
    await backend.disconnect()


async def received(backend: KafkaBackend, count: int) -> list[tuple[str, str]]:
    async def collect() -> list[tuple[str, str]]:
        events = [await backend.next_published() for _ in range(count)]
        return [(event.channel, event.message) for event in events]

    return await asyncio.wait_for(collect(), 20)


async def test_odd_channel_names_round_trip(backend: KafkaBackend) -> None:
    channels = [unique() + name for name in ("/a b", "ü😀", ":#@")] + ["é" * 255]
    for channel in channels:
        await backend.subscribe(channel)
    await backend.publish_many([(channel, f"to {channel}") for channel in channels])
    got = await received(backend, len(channels))
    assert sorted(got) == sorted((channel, f"to {channel}") for channel in channels)


async def test_starts_at_latest_offset(backend: KafkaBackend) -> None:
    channel = unique()
    await backend.publish(channel, "before")  # creates the topic
    await backend.subscribe(channel)
    await backend.publish(channel, "after")
    assert await received(backend, 1) == [(channel, "after")]


async def test_slow_topic_creation_holds_up_no_channel_in_use(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch touching many new channels waited for their topics to be created
    before sending anything: a slow creation timed the whole batch out, channels in
    use too, and every topic was forgotten, so the next batch created them all again
    (found by a probe: 800 new channels, tansu). The timeout was then taken for a
    broker outage, which paused every channel's live sends."""
    from broadcast_history.backends import kafka as kafka_module

    backend = KafkaBackend(f"kafka://{kafka_bootstrap}", timeout=1.0)
    await backend.connect()
    try:
        hot, cold, other = unique("hot"), unique("cold"), unique("other")
        await backend.subscribe(other)
        await backend.subscribe(hot)
        await backend.publish(hot, "h1")
        assert await received(backend, 1) == [(hot, "h1")]
        create = kafka_module.create_topics

        async def slow(admin: Any, topics: Any, known: set[str], **settings: Any) -> None:
            await asyncio.sleep(3)  # longer than the send's timeout
            await create(admin, topics, known, **settings)

        monkeypatch.setattr(kafka_module, "create_topics", slow)
        with pytest.raises(TransportError):
            await backend.publish_many([(hot, "h2"), (cold, "c1")])
        assert await received(backend, 1) == [(hot, "h2")]  # sent all the same
        assert backend.topic(other) in backend._known  # not in the batch: kept
        # Nor is it taken for an outage: that skipped the live sends of every
        # channel until the watch's next ping.
        monkeypatch.setattr(kafka_module, "create_topics", create)
        await backend.publish(hot, "h3")
        assert await received(backend, 1) == [(hot, "h3")]
    finally:
        await backend.disconnect()


async def test_unsubscribe_one_among_many(backend: KafkaBackend) -> None:
    a, b, c = unique("a"), unique("b"), unique("c")
    for channel in (a, b, c):
        await backend.subscribe(channel)
    await backend.publish_many([(a, "a1"), (b, "b1"), (c, "c1")])
    assert sorted(await received(backend, 3)) == [(a, "a1"), (b, "b1"), (c, "c1")]

    # Traffic on a and c while b is dropped: their positions survive the change.
    await backend.publish_many([(a, f"a{i}") for i in range(2, 50)])
    await backend.unsubscribe(b)
    await backend.publish_many([(b, "b2"), (c, "c2"), (a, "a50")])
    got = await received(backend, 50)
    assert [m for ch, m in got if ch == a] == [f"a{i}" for i in range(2, 51)]
    assert [m for ch, m in got if ch == c] == ["c2"]
    assert all(ch != b for ch, _ in got)

    # Re-subscribing starts at the end again, and the others keep going.
    await backend.subscribe(b)
    await backend.publish_many([(b, "b3"), (a, "a51")])
    assert sorted(await received(backend, 2)) == [(a, "a51"), (b, "b3")]


async def test_disconnect_wakes_a_pending_receive(kafka_bootstrap: str) -> None:
    backend = KafkaBackend(f"kafka://{kafka_bootstrap}")
    await backend.connect()
    await backend.subscribe(unique())
    pending = asyncio.create_task(backend.next_published())
    await asyncio.sleep(0.1)
    await backend.disconnect()
    with pytest.raises(NotConnected):
        await asyncio.wait_for(pending, 5)
    await backend.disconnect()  # twice is fine


async def test_unreachable_broker_fails_connect() -> None:
    backend = KafkaBackend("kafka://127.0.0.1:1", timeout=2)
    with pytest.raises(TransportError):
        await backend.connect()


async def test_urls_list_constructor(kafka_bootstrap: str, sqlite_file_url: str) -> None:
    # As broadcaster's KafkaBackend(urls=[...]); the dead first server is skipped.
    backend = KafkaBackend(urls=["kafka://127.0.0.1:1", f"kafka://{kafka_bootstrap}"])
    async with Broadcast(backend=backend, log=sqlite_file_url) as broadcast:
        channel = unique()
        async with broadcast.subscribe(channel) as sub:
            await broadcast.publish(channel, "hello")
            [event] = await take(sub, 1)
        assert (event.channel, event.message, event.offset) == (channel, "hello", 1)
        assert broadcast.transport_connected


async def test_two_broadcasts_share_a_file_log(kafka_bootstrap: str, tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    url = f"kafka://{kafka_bootstrap}"
    channel = unique("chat/ü ")
    async with Broadcast(url, log=log) as publisher, Broadcast(url, log=log) as subscriber:
        await publisher.publish(channel, "earlier")
        async with subscriber.subscribe(channel, since=0) as sub:
            published = [await publisher.publish(channel, f"m{i}") for i in range(20)]
            published.append(await publisher.publish(channel, b"\x00bytes"))
            events = await take(sub, 22)
    assert_contiguous(events, 1, 22)
    assert [e.message for e in events] == ["earlier"] + [f"m{i}" for i in range(20)] + [
        b"\x00bytes"
    ]
    assert {e.channel for e in events} == {channel}
    assert [e.timestamp for e in events[1:]] == [e.timestamp for e in published]


async def test_events_over_the_producer_limit_travel_as_notices(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """aiokafka refuses a record over its 1 MiB max_request_size before sending: a
    1 MiB text (the default max_message_size) failed its live send, and so did every
    event queued after it in the batch, on any channel. Such an event now goes as a
    notice, read from the log, and the rest of the batch goes whole."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    url = f"kafka://{kafka_bootstrap}"
    big_channel, small_channel = unique("big"), unique("small")
    big = "x" * (1024 * 1024 - 64)
    async with (
        Broadcast(url, log=log) as publisher,
        Broadcast(url, log=log, idle_check=600) as subscriber,  # live only, in effect
    ):
        async with (
            subscriber.subscribe(big_channel) as big_sub,
            subscriber.subscribe(small_channel) as small_sub,
        ):
            # One batch: the big one first, then others behind it.
            await asyncio.gather(
                publisher.publish(big_channel, big),
                *(publisher.publish(small_channel, f"s{i}") for i in range(5)),
            )
            assert [e.message for e in await take(small_sub, 5, timeout=20)] == [
                f"s{i}" for i in range(5)
            ]
            [event] = await take(big_sub, 1, timeout=20)
            assert event.message == big
        assert publisher.stats.live_send_failures == 0


async def _create_topic(kafka_bootstrap: str, topic: str, partitions: int = 1) -> None:
    """Create ``topic`` as an operator would, with an admin client of its own."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def test_existing_topic_with_several_partitions(
    backend: KafkaBackend, kafka_bootstrap: str
) -> None:
    channel = unique()
    await _create_topic(kafka_bootstrap, backend.topic(channel), partitions=3)
    await backend.subscribe(channel)
    await backend.publish_many([(channel, f"m{i}") for i in range(30)])
    # One key per channel: one partition, so the order holds.
    assert await received(backend, 30) == [(channel, f"m{i}") for i in range(30)]


async def test_consumer_failure_reaches_next_published(backend: KafkaBackend) -> None:
    await backend.subscribe(unique())
    # Fault injection: the consumer stops under the transport, for good.
    assert backend._consumer is not None
    await backend._consumer.stop()
    with pytest.raises(TransportError, match="consumer"):
        await asyncio.wait_for(backend.next_published(), 10)
    with pytest.raises(TransportError):  # and it stays failed
        await asyncio.wait_for(backend.next_published(), 1)


async def test_a_subscribe_cancelled_as_it_gets_the_lock_leaves_it_free() -> None:
    """Cancelled in the step its wait for the lock succeeded, a subscribe kept the
    lock (wait_for returned it held, then raised the cancellation): every later
    recovery waited for it for ever (found by a review; no broker needed)."""
    backend = KafkaBackend("kafka://127.0.0.1:1", timeout=5)
    backend._lock = asyncio.Lock()
    backend._up = True

    async def assign() -> None:
        pass

    backend._assign = assign  # type: ignore[method-assign]
    await backend._lock.acquire()  # a recovery holds it
    subscribe = asyncio.create_task(backend._sync_assignment())
    await asyncio.sleep(0.01)
    backend._lock.release()  # the recovery ends in the step the subscribe is cancelled
    subscribe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await subscribe
    await asyncio.sleep(0)
    assert not backend._lock.locked()


async def test_a_recovery_ends_while_channels_keep_changing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recovery assigned again for as long as the subscribed channels changed: with
    subscribes coming faster than one assignment, it never ended, the transport stayed
    down and the lock held (found by a review; no broker needed)."""
    backend = KafkaBackend("kafka://127.0.0.1:1", timeout=5)
    backend._consumer = object()  # type: ignore[assignment]
    backend._up = False
    passes = 0

    async def assign() -> None:
        nonlocal passes
        passes += 1
        backend._assigned_topics = set(backend._channels)
        backend._channels[f"t{passes}"] = f"c{passes}"  # a subscribe came meanwhile

    async def rewind() -> None:
        pass

    backend._assign = assign  # type: ignore[method-assign]
    backend._rewind_recreated = rewind  # type: ignore[method-assign]
    await asyncio.wait_for(backend._restore(set(), set()), 5)
    assert backend.connected and passes <= 4


class _Refused:
    """The answer of a broker whose ACLs deny this client the right to create."""

    def __init__(self, topics: list[Any]) -> None:
        self.topic_errors = [(topic.name, 29, "Authorization failed.") for topic in topics]


_UNKNOWN_TOPIC = 3  # what a metadata request answers for a topic that is not there


def _without_create_rights(backend: KafkaBackend, absent: str) -> None:
    """Fault injection: the broker refuses this client every topic creation (Kafka's
    ACLs), and the topic of channel ``absent`` is not there. Nor may such a client
    have it created by asking for its metadata, as tansu (and Kafka with
    auto.create.topics.enable, for a client allowed to create) would."""
    assert backend._admin is not None
    describe = backend._admin.describe_topics
    missing = {"topic": backend.topic(absent), "error_code": _UNKNOWN_TOPIC, "partitions": []}

    async def refuse(topics: list[Any], *args: Any, **kwargs: Any) -> _Refused:
        return _Refused(topics)

    async def describe_without_creating(topics: list[str]) -> list[Any]:
        there = [topic for topic in topics if topic != missing["topic"]]
        return [*(await describe(there) if there else []), *([missing] * (there != topics))]

    backend._admin.create_topics = refuse  # type: ignore[method-assign]
    backend._admin.describe_topics = describe_without_creating  # type: ignore[method-assign]


async def test_a_client_not_allowed_to_create_topics_uses_existing_ones(
    backend: KafkaBackend, kafka_bootstrap: str
) -> None:
    """Kafka checks the right to create before whether a topic exists: a client that
    may only read and write the topics an operator made is told "not authorized" for
    those too. Taken for a failure, it made every publish and subscribe fail on such
    a cluster (found by a review; the refusal is injected, the broker is real)."""
    made, absent = unique("made"), unique("absent")
    await _create_topic(kafka_bootstrap, backend.topic(made))
    _without_create_rights(backend, absent)
    await backend.subscribe(made)
    await backend.publish(made, "allowed")
    assert await received(backend, 1) == [(made, "allowed")]
    # Not there and not allowed to make it: said so, with the broker's reason.
    with pytest.raises(TransportError, match=r"Authorization failed.*create it beforehand"):
        await backend.subscribe(absent)
    await backend.unsubscribe(absent)  # as a broadcast undoes a failed subscribe
    assert backend.topic(absent) not in backend._known
    with pytest.raises(TransportError, match="create it beforehand"):
        await backend.publish(absent, "refused")
    # Neither failure is an outage: the channel in use goes on.
    await backend.publish(made, "still allowed")
    assert await received(backend, 1) == [(made, "still allowed")]
    assert backend.connected


async def test_topic_config_applies_to_created_topics(kafka_bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    config = {"retention.ms": "3600000"}
    backend = KafkaBackend(f"kafka://{kafka_bootstrap}", topic_config=config)
    await backend.connect()
    channel = unique()
    try:
        await backend.subscribe(channel)
    finally:
        await backend.disconnect()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, backend.topic(channel))
        [response] = await admin.describe_configs([resource])
    finally:
        await admin.close()
    [(_, _, _, _, entries)] = response.resources
    assert ("retention.ms", "3600000") in {(entry[0], entry[1]) for entry in entries}


async def test_compressed_records_are_delivered(
    backend: KafkaBackend, kafka_bootstrap: str
) -> None:
    """A broker hands records back compressed when another producer compressed them
    or a topic's compression.type says so: without the codecs (the kafka extra now
    pulls them in) aiokafka failed the fetch for good, ending live delivery."""
    from aiokafka import AIOKafkaProducer

    channel = unique()
    await backend.subscribe(channel)
    for codec in ("gzip", "snappy", "lz4", "zstd"):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type=codec)
        await producer.start()
        try:
            await producer.send_and_wait(
                backend.topic(channel), f"by {codec}".encode(), key=channel.encode()
            )
        finally:
            await producer.stop()
        assert await received(backend, 1) == [(channel, f"by {codec}")]


async def test_a_topic_gone_that_this_client_may_not_create_leaves_the_others_live(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscribed channel's topic deleted on a cluster where this client may not
    create topics: each ping failed to create it again, took that for an outage and
    stopped the live sends of every channel (found by a review; the refusal and the
    deleted topic are injected, the broker is real)."""
    backend = KafkaBackend(f"kafka://{kafka_bootstrap}", ping_interval=0.2)
    await backend.connect()
    try:
        gone, other = unique("gone"), unique("other")
        for channel in (gone, other):
            await backend.subscribe(channel)
        _without_create_rights(backend, gone)  # and its topic deleted
        with caplog.at_level("WARNING", logger="broadcast_history"):
            await asyncio.sleep(1.0)  # pings find it gone, and may not make it again
        assert backend.connected
        assert "kafka topic left out" in caplog.text and "create it beforehand" in caplog.text
        await backend.publish(other, "still live")
        assert await received(backend, 1) == [(other, "still live")]
    finally:
        await backend.disconnect()
