"""The contract (docs/concepts.md: guarantees, semantics), over every live transport x every log."""

from __future__ import annotations

import asyncio
import random
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone

import pytest

from broadcast_history import (
    Broadcast,
    HistoryTruncated,
    InvalidArgument,
    OffsetOutOfRange,
    StreamReset,
)
from tests.conftest import MakeBroadcast, unique
from tests.support.helpers import assert_contiguous, take


async def test_publish_returns_stored_event(broadcast: Broadcast) -> None:
    channel = unique()
    before = datetime.now(timezone.utc)
    text = await broadcast.publish(channel, "hello")
    raw = await broadcast.publish(channel, b"\x00\xffbytes")
    assert (text.channel, text.message, text.offset) == (channel, "hello", 1)
    assert (raw.message, raw.offset) == (b"\x00\xffbytes", 2)
    assert text.timestamp is not None and text.timestamp.tzinfo is not None
    assert before - timedelta(seconds=1) <= text.timestamp <= datetime.now(timezone.utc)
    assert text.epoch == raw.epoch > 0
    stored = await broadcast.log.read(channel, after=0)
    assert stored == [text, raw]
    assert isinstance(stored[0].message, str) and isinstance(stored[1].message, bytes)


async def test_offsets_gap_free_under_concurrent_publishers(broadcast: Broadcast) -> None:
    channel, other = unique(), unique()

    async def publisher(n: int) -> list[int]:
        offsets = []
        for i in range(10):
            event = await broadcast.publish(channel if i % 3 else other, f"{n}-{i}")
            offsets.append(event.offset)
        return offsets

    results = await asyncio.gather(*(publisher(n) for n in range(64)))
    stored = await broadcast.log.read(channel, after=0, limit=10_000)
    stored_other = await broadcast.log.read(other, after=0, limit=10_000)
    assert_contiguous(stored, 1, len(stored))
    assert_contiguous(stored_other, 1, len(stored_other))
    assert len(stored) + len(stored_other) == 640
    assert sorted(o for r in results for o in r) == sorted(
        [e.offset for e in stored] + [e.offset for e in stored_other]
    )
    stamps = [e.timestamp for e in stored]
    assert stamps == sorted(stamps)  # type: ignore[type-var]


@pytest.mark.two_hosts
async def test_offsets_gap_free_across_broadcasts_sharing_a_log(
    make_broadcast: MakeBroadcast,
) -> None:
    first, second = await make_broadcast(), await make_broadcast()
    channel = unique()

    async def publisher(broadcast: Broadcast, n: int) -> None:
        for i in range(5):
            await broadcast.publish(channel, f"{n}-{i}")

    await asyncio.gather(*(publisher(first if n % 2 else second, n) for n in range(50)))
    stored = await first.log.read(channel, after=0, limit=1000)
    assert_contiguous(stored, 1, 250)


async def test_live_only_subscriber_sees_new_events(broadcast: Broadcast) -> None:
    channel = unique()
    await broadcast.publish(channel, "old")
    async with broadcast.subscribe(channel) as sub:
        assert sub.live
        await broadcast.publish(channel, "new")
        [event] = await take(sub, 1)
    assert (event.offset, event.message) == (2, "new")


async def test_since_offset_replays_then_goes_live(broadcast: Broadcast) -> None:
    channel = unique()
    for i in range(1, 6):
        await broadcast.publish(channel, f"m{i}")
    async with broadcast.subscribe(channel, since=2) as sub:
        assert not sub.live
        replayed = await take(sub, 3)
        assert [e.message for e in replayed] == ["m3", "m4", "m5"]
        await broadcast.publish(channel, "m6")
        [live] = await take(sub, 1)
    assert live.offset == 6 and sub.position == 6


async def test_since_zero_is_whole_history(broadcast: Broadcast) -> None:
    channel = unique()
    async with broadcast.subscribe(channel, since=0) as sub:
        await broadcast.publish(channel, "first")
        [event] = await take(sub, 1)
    assert event.offset == 1
    async with broadcast.subscribe(channel, since=0) as sub:
        assert [e.message for e in await take(sub, 1)] == ["first"]


async def test_since_datetime_and_history(broadcast: Broadcast) -> None:
    channel = unique()
    early = [await broadcast.publish(channel, f"a{i}") for i in range(3)]
    await asyncio.sleep(0.01)
    cut = datetime.now(timezone.utc)
    late = [await broadcast.publish(channel, f"b{i}") for i in range(3)]
    assert early[-1].timestamp is not None and early[-1].timestamp < cut
    async with broadcast.subscribe(channel, since=cut) as sub:
        assert [e.offset for e in await take(sub, 3)] == [e.offset for e in late]
    async with broadcast.subscribe(
        channel, since=cut.astimezone(timezone(timedelta(hours=5)))
    ) as sub:
        assert (await take(sub, 1))[0].offset == 4
    future = datetime.now(timezone.utc) + timedelta(days=1)
    async with broadcast.subscribe(channel, since=future) as sub:
        assert sub.live
    async with broadcast.subscribe(channel, history=2) as sub:
        assert [e.message for e in await take(sub, 2)] == ["b1", "b2"]
        await broadcast.publish(channel, "c")
        assert [e.message for e in await take(sub, 1)] == ["c"]
    async with broadcast.subscribe(channel, history=100) as sub:
        assert_contiguous(await take(sub, 7), 1, 7)
    async with broadcast.subscribe(channel, history=0) as sub:
        assert sub.live


async def test_position_errors_raised_on_enter(broadcast: Broadcast) -> None:
    channel = unique()
    await broadcast.publish(channel, "x")
    with pytest.raises(OffsetOutOfRange):
        async with broadcast.subscribe(channel, since=-1):
            pass
    with pytest.raises(OffsetOutOfRange):
        async with broadcast.subscribe(channel, since=2):
            pass
    with pytest.raises(OffsetOutOfRange):
        async with broadcast.subscribe(unique(), since=1):
            pass
    with pytest.raises(InvalidArgument):
        async with broadcast.subscribe(channel, since=0, history=1):
            pass
    with pytest.raises(InvalidArgument):
        async with broadcast.subscribe(channel, since=datetime(2020, 1, 1)):
            pass
    with pytest.raises(InvalidArgument):
        async with broadcast.subscribe(channel, since="1"):  # type: ignore[arg-type]
            pass
    with pytest.raises(InvalidArgument):
        async with broadcast.subscribe(channel, history=-1):
            pass


async def test_trimmed_history_raises(broadcast: Broadcast) -> None:
    channel = unique()
    for i in range(10):
        await broadcast.publish(channel, str(i))
    assert await broadcast.log.trim(channel, before=6) == 5
    with pytest.raises(HistoryTruncated):
        async with broadcast.subscribe(channel, since=0):
            pass
    with pytest.raises(HistoryTruncated):
        async with broadcast.subscribe(channel, since=4):
            pass
    stored = await broadcast.log.read(channel, after=0)
    with pytest.raises(HistoryTruncated):
        assert stored[0].timestamp is not None
        async with broadcast.subscribe(channel, since=stored[0].timestamp - timedelta(days=1)):
            pass
    async with broadcast.subscribe(channel, since=5) as sub:
        assert_contiguous(await take(sub, 5), 6, 10)
    async with broadcast.subscribe(channel, history=100) as sub:
        assert_contiguous(await take(sub, 5), 6, 10)


async def test_epoch_check_and_reset(broadcast: Broadcast) -> None:
    channel = unique()
    first = await broadcast.publish(channel, "a")
    async with broadcast.subscribe(channel, since=0, epoch=first.epoch) as sub:
        assert (await take(sub, 1))[0] == first
    with pytest.raises(StreamReset):
        async with broadcast.subscribe(channel, since=0, epoch=first.epoch + 1):
            pass
    assert await broadcast.log.delete_channel(channel)
    again = await broadcast.publish(channel, "b")
    assert again.offset == 1 and again.epoch != first.epoch
    with pytest.raises(StreamReset):
        async with broadcast.subscribe(channel, since=1, epoch=first.epoch):
            pass


async def test_live_subscriber_learns_of_reset(broadcast: Broadcast) -> None:
    channel = unique()
    await broadcast.publish(channel, "a")
    async with broadcast.subscribe(channel, since=0) as sub:
        await take(sub, 1)
        await broadcast.log.delete_channel(channel)
        await broadcast.publish(channel, "b")
        await broadcast.publish(channel, "c")
        with pytest.raises(StreamReset):
            await take(sub, 2)


async def test_reset_is_noticed_while_the_new_epoch_is_below_the_old_position(
    broadcast: Broadcast,
) -> None:
    """The new incarnation's events, offsets below the subscriber's position, were
    dropped as duplicates, and each one put off the idle check: while they came, the
    subscriber heard nothing until their offsets passed its position."""
    channel = unique()
    await asyncio.gather(*(broadcast.publish(channel, str(i)) for i in range(100)))
    async with broadcast.subscribe(channel, since=0) as sub:
        await take(sub, 100)
        await broadcast.log.delete_channel(channel)

        async def steadily() -> None:
            while True:
                await broadcast.publish(channel, "new")
                await asyncio.sleep(0.05)

        publishing = asyncio.create_task(steadily())
        try:
            with pytest.raises(StreamReset):
                await take(sub, 1, timeout=3)  # the offsets pass 100 after 5 s
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)


async def test_idempotent_keys(broadcast: Broadcast) -> None:
    channel = unique()
    first = await broadcast.publish(channel, "once", key="k1")
    again = await broadcast.publish(channel, "different", key="k1")
    assert again == first
    same_batch = await asyncio.gather(
        *(broadcast.publish(channel, f"x{i}", key="k2") for i in range(5))
    )
    assert len({e.offset for e in same_batch}) == 1
    other = await broadcast.publish(unique(), "once", key="k1")
    assert other.offset == 1
    assert len(await broadcast.log.read(channel, after=0)) == 2


async def test_handoff_many_subscribers_random_offsets(broadcast: Broadcast) -> None:
    """Subscribers join at random offsets while a publisher runs: contiguous, no duplicate."""
    channel = unique()
    total = 400
    rng = random.Random(7)
    published: list[int] = []
    for i in range(50):
        published.append((await broadcast.publish(channel, f"m{i}")).offset)

    async def publisher() -> None:
        for i in range(50, total):
            published.append((await broadcast.publish(channel, f"m{i}")).offset)
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def subscriber() -> tuple[int, list[int]]:
        await asyncio.sleep(rng.random() * 0.05)
        since = rng.randint(0, published[-1])
        async with broadcast.subscribe(channel, since=since) as sub:
            events = await take(sub, total - since, timeout=60)
        return since, [e.offset for e in events]

    task = asyncio.create_task(publisher())
    results = await asyncio.gather(*(subscriber() for _ in range(20)))
    await task
    for since, offsets in results:
        assert offsets == list(range(since + 1, total + 1))


@pytest.mark.two_hosts
async def test_many_subscribers_across_broadcasts(make_broadcast: MakeBroadcast) -> None:
    """A subscriber on another broadcast (another host) gets events via the transport."""
    publisher, listener = await make_broadcast(), await make_broadcast(idle_check=5.0)
    channel = unique()
    await publisher.publish(channel, "before")
    async with listener.subscribe(channel, since=0) as sub:
        assert (await take(sub, 1))[0].message == "before"
        for i in range(100):
            await publisher.publish(channel, f"m{i}")
        events = await take(sub, 100, timeout=4.0)  # faster than the idle check
    assert_contiguous(events, 2, 101)


async def test_subscriptions_opened_and_closed_together_stay_live(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Subscriptions to many channels opened at once, while the last ones of the same
    channels close: every channel left with a subscriber still gets its events live.
    A transport that takes several channels' subscribes at once gets them at once
    (one at a time, clients reconnecting to channels of their own waited in line)."""
    listener = await make_broadcast(idle_check=600)  # live sends only, no log polling
    crosses = listener.backend.crosses_processes
    publisher = await make_broadcast() if crosses else listener
    backend, subscribe = listener.backend, listener.backend.subscribe
    in_flight, most = 0, 0

    async def counted(channel: str) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.01)
            await subscribe(channel)
        finally:
            in_flight -= 1

    monkeypatch.setattr(backend, "subscribe", counted)
    channels = [unique() for _ in range(12)]
    async with AsyncExitStack() as first, AsyncExitStack() as second:
        await asyncio.gather(*(first.enter_async_context(listener.subscribe(c)) for c in channels))
        opening = asyncio.gather(
            *(second.enter_async_context(listener.subscribe(c)) for c in channels)
        )
        await first.aclose()  # the channels' unsubscribes meet the new subscribes
        subs = await opening
        for channel, sub in zip(channels, subs, strict=True):
            event = await publisher.publish(channel, "live")
            assert await asyncio.wait_for(sub.get(), 10) == event
    assert (most > 1) == backend.concurrent_subscribes, most


async def test_slow_subscriber_bounded_and_complete(
    request: pytest.FixtureRequest, make_broadcast: MakeBroadcast
) -> None:
    """A subscriber that does not read while many events arrive: bounded buffer, all delivered."""
    heavy = request.node.callspec.id.startswith("memory")
    total = 20_000 if heavy else 3_000
    broadcast = await make_broadcast(buffer_size=500)
    channel = unique()
    async with broadcast.subscribe(channel, since=0) as sub:
        await asyncio.gather(*(broadcast.publish(channel, f"m{i}") for i in range(total)))
        await asyncio.sleep(0.2)
        assert len(sub._buffer) <= 500 and len(sub._held) <= 500
        events = await take(sub, total, timeout=120)
    assert_contiguous(events, 1, total)


async def test_retention_keeps_live_subscriber_going(make_broadcast: MakeBroadcast) -> None:
    from broadcast_history import Retention

    broadcast = await make_broadcast(retention=Retention(max_events=5, interval=0.05))
    channel = unique()
    async with broadcast.subscribe(channel) as sub:
        for i in range(30):
            await broadcast.publish(channel, str(i))
        assert_contiguous(await take(sub, 30), 1, 30)
        await broadcast.log.apply_retention(Retention(max_events=5))
        info = await broadcast.log.channel(channel)
        assert info is not None and (info.first_offset, info.count) == (26, 5)
        await broadcast.publish(channel, "30")
        assert (await take(sub, 1))[0].offset == 31
    with pytest.raises(HistoryTruncated):
        async with broadcast.subscribe(channel, since=10):
            pass


async def test_retention_by_age(broadcast: Broadcast) -> None:
    from broadcast_history import Retention

    channel = unique()
    for i in range(3):
        await broadcast.publish(channel, str(i))
    # The old events are older than max_age once the sleep is over; the new one must
    # stay younger than max_age until retention runs, which takes a few round trips
    # on a loaded machine: a generous max_age keeps that from being a race (150 ms
    # was not, on Postgres under a full suite: the new event went too).
    await asyncio.sleep(0.6)
    await broadcast.publish(channel, "new")
    removed = await broadcast.log.apply_retention(Retention(max_age=timedelta(milliseconds=400)))
    # Retention runs over every channel: in a database the other tests share, old
    # events of theirs may go too.
    assert removed >= 3
    info = await broadcast.log.channel(channel)
    assert info is not None and (info.first_offset, info.count) == (4, 1)
    async with broadcast.subscribe(channel, history=10) as sub:
        assert [e.message for e in await take(sub, 1)] == ["new"]
