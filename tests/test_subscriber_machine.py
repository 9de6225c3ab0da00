"""The subscriber's state machine on its own, fed by hand instead of by a transport.

The log is a real one (the in-memory SQLite default); what a transport would deliver
is fed straight into the subscriber, dropped, repeated, reordered, turned into a
notice, overflowing or from another epoch. Whatever the feed, the subscriber must
deliver offsets 1..N once each, in order, or raise the typed error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from broadcast_history import Event, EventLog, LogUnavailable, StreamReset
from broadcast_history._budget import SubscriberOptions
from broadcast_history._event import NOTICE
from broadcast_history._heads import HeadProbe
from broadcast_history._stats import Stats
from broadcast_history._subscriber import Subscriber
from broadcast_history.log import Pending

N = 8
FAST = SubscriberOptions(idle_check=0.05, reorder_window=0.01)
Feed = Callable[[list[Event]], list[list[Event]]]


def in_order(events: list[Event]) -> list[list[Event]]:
    return [[e] for e in events]


def drop_third(events: list[Event]) -> list[list[Event]]:
    return [[e] for e in events if e.offset != 3]


def drop_last(events: list[Event]) -> list[list[Event]]:
    return [[e] for e in events[:-1]]


def drop_all(events: list[Event]) -> list[list[Event]]:
    return []


def duplicate(events: list[Event]) -> list[list[Event]]:
    return [[e, e] for e in events] + [events[:3]]


def reorder(events: list[Event]) -> list[list[Event]]:
    swapped = list(events)
    for i in range(0, len(swapped) - 1, 2):
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    return [[e] for e in swapped]


def notice(events: list[Event]) -> list[list[Event]]:
    return [[dataclasses.replace(e, message=NOTICE) if e.offset == 4 else e] for e in events]


def one_batch(events: list[Event]) -> list[list[Event]]:
    return [events]


CASES: list[tuple[str, Feed, SubscriberOptions]] = [
    ("in-order", in_order, FAST),
    ("drop", drop_third, FAST),
    ("drop-last", drop_last, FAST),
    ("drop-all", drop_all, FAST),
    ("duplicate", duplicate, FAST),
    ("reorder", reorder, FAST),
    ("notice", notice, FAST),
    ("overflow-count", one_batch, dataclasses.replace(FAST, buffer_size=3)),
    ("overflow-bytes", one_batch, dataclasses.replace(FAST, buffer_bytes=1000)),
    ("one-event-pages", one_batch, dataclasses.replace(FAST, page_size=1, buffer_size=1)),
]


@pytest.fixture
async def log() -> AsyncIterator[EventLog]:
    log = EventLog()
    await log.connect()
    yield log
    await log.disconnect()


async def _take(subscriber: Subscriber, count: int) -> list[Event]:
    async def collect() -> list[Event]:
        return [await subscriber.get() for _ in range(count)]

    return await asyncio.wait_for(collect(), 10)


@pytest.mark.parametrize(("name", "feed", "options"), CASES, ids=[c[0] for c in CASES])
async def test_every_feed_delivers_each_offset_once_in_order(
    log: EventLog, name: str, feed: Feed, options: SubscriberOptions
) -> None:
    subscriber = Subscriber("c", log, options, HeadProbe(log, {}), Stats())
    await subscriber._start(None, None, None)  # live only: the channel is empty
    stored = await log.append([Pending("c", f"m{i}", None) for i in range(1, N + 1)])
    for batch in feed(stored):
        subscriber._feed(batch)
    got = await _take(subscriber, N)
    assert got == stored  # the notice's message came from the log
    assert subscriber.position == N
    assert subscriber._live_bytes >= 0


async def test_replay_then_live_hands_over_without_a_duplicate(log: EventLog) -> None:
    first = await log.append([Pending("c", f"old{i}", None) for i in range(5)])
    subscriber = Subscriber("c", log, FAST, HeadProbe(log, {}), Stats())
    await subscriber._start(0, None, None)
    later = await log.append([Pending("c", f"new{i}", None) for i in range(3)])
    subscriber._feed(first[3:] + later)  # live buffered during replay, overlapping it
    assert await _take(subscriber, 8) == first + later


async def test_events_of_a_new_epoch_say_the_channel_was_reset(log: EventLog) -> None:
    subscriber = Subscriber("c", log, FAST, HeadProbe(log, {}), Stats())
    old = await log.append([Pending("c", "before", None)])
    await subscriber._start(0, None, None)
    assert await _take(subscriber, 1) == old
    await log.delete_channel("c")
    new = await log.append([Pending("c", "after", None), Pending("c", "again", None)])
    assert new[0].epoch != old[0].epoch
    subscriber._feed(new)
    with pytest.raises(StreamReset):
        await _take(subscriber, 1)


async def test_an_event_arriving_as_the_quiet_period_ends_goes_before_the_idle_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live event fed in the loop turn the idle timer fired waited for the idle
    check's answer (as long as the log took: here 5 s) although it was in hand."""
    from broadcast_history import Broadcast

    async with Broadcast("memory://", idle_check=0.2) as broadcast:
        async with broadcast.subscribe("c") as sub:
            first = await broadcast.publish("c", "first")
            assert (await sub.get()).offset == 1
            info = await broadcast.log.channel("c")

            async def silent(name: str) -> object:  # the log gone silent to this host
                await asyncio.sleep(5)
                return info

            monkeypatch.setattr(broadcast._heads, "_log", type("L", (), {"channel": silent}))
            bell, fed = sub._bell, []
            expire = bell._expire

            def expire_then_feed() -> None:
                expire()  # the quiet period ends: the timer rings False...
                if not fed:  # ...and an event arrives in the same loop turn
                    fed.append(Event("c", "live", offset=2, epoch=first.epoch))
                    sub._feed(fed)

            monkeypatch.setattr(bell, "_expire", expire_then_feed)
            event = await asyncio.wait_for(sub.get(), 2)
            assert (event.offset, event.message) == (2, "live")


class _SlowLog:
    """A log whose page reads take ``delay`` seconds each."""

    read_timeout = 0.5

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def read_from(self, *_args: object, **_kwargs: object) -> list[Event]:
        await asyncio.sleep(self.delay)
        return []


@pytest.mark.parametrize("answers", [True, False])
async def test_reads_wait_for_a_turn_while_the_reads_ahead_get_answers(
    answers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that waited for its turn longer than the read bound failed although the
    reads ahead were all answered (a busy log, many subscribers replaying): only a
    queue where no read ends for the bound fails, all of it at once."""
    monkeypatch.setattr(HeadProbe, "READS_AT_ONCE", 2)
    # Busy: 16 reads of 0.15 s, two at a time, 1.2 s of queue. Silent: the two
    # reads ahead take 3 s (a store bounds them; this fake does not).
    probe = HeadProbe(_SlowLog(0.15 if answers else 3.0), {})  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    began = loop.time()

    async def read(channel: str) -> tuple[str, float]:
        try:
            await probe.read_page(channel, 1, 10, 1 << 20, None)
            return "read", loop.time() - began
        except LogUnavailable:
            return "failed", loop.time() - began

    outcomes = await asyncio.wait_for(
        asyncio.gather(*(read(f"c{i}") for i in range(16 if answers else 4))), 10
    )
    if answers:
        assert [outcome for outcome, _ in outcomes] == ["read"] * 16
        assert max(took for _, took in outcomes) > 1.0
    else:
        failed = [took for outcome, took in outcomes if outcome == "failed"]
        assert len(failed) == 2 and max(failed) < 2.0, outcomes


async def test_subscriptions_opened_together_share_their_start_lookups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each subscription looked its channel's head up in a query of its own: 2,000
    clients reconnecting at once to channels of their own cost 2,000 queries, ~1 ms
    each on SQLite. Lookups asked together go to the log together now."""
    from broadcast_history import Broadcast

    async with Broadcast("memory://") as broadcast:
        log, queries = broadcast.log, []
        one, named = log.channel, log.channels_named

        async def channel(name: str) -> object:
            queries.append(1)
            return await one(name)

        async def channels_named(names: list[str]) -> object:
            queries.append(len(names))
            return await named(names)

        monkeypatch.setattr(log, "channel", channel)
        monkeypatch.setattr(log, "channels_named", channels_named)
        await broadcast.publish("c7", "earlier")
        async with contextlib.AsyncExitStack() as stack:
            subs = await asyncio.gather(
                *(stack.enter_async_context(broadcast.subscribe(f"c{i}")) for i in range(1000))
            )
            assert sum(queries) == 1000 and len(queries) <= 3  # 500 names a query
            event = await broadcast.publish("c7", "live")
            assert await asyncio.wait_for(subs[7].get(), 5) == event  # started at the head


async def test_a_start_lookup_does_not_share_one_begun_before_it_was_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Subscribing ``since`` an event just published must see that event, even while
    an idle check of the channel, begun before it was stored, waits for its answer:
    sharing that lookup would raise OffsetOutOfRange for an offset that exists."""
    from broadcast_history import Broadcast

    async with Broadcast("memory://") as broadcast:
        await broadcast.publish("c", "first")
        log, release = broadcast.log, asyncio.Event()
        real = log.channel

        async def held_once(name: str) -> object:
            info = await real(name)  # read now, answered when released
            if not release.is_set():
                await release.wait()
            return info

        monkeypatch.setattr(log, "channel", held_once)
        stale = asyncio.ensure_future(broadcast._heads.channel("c", 5.0))  # an idle check
        await asyncio.sleep(0.05)
        second = await broadcast.publish("c", "second")
        async with contextlib.AsyncExitStack() as stack:
            opening = asyncio.ensure_future(
                stack.enter_async_context(broadcast.subscribe("c", since=second.offset))
            )
            await asyncio.sleep(0.05)
            release.set()
            assert (await stale).last_offset == 1
            sub = await asyncio.wait_for(opening, 5)
            third = await broadcast.publish("c", "third")
            assert await asyncio.wait_for(sub.get(), 5) == third


async def test_a_lone_subscribe_does_not_wait_behind_a_round_of_idle_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscription's start lookup went into the idle checks' rounds: behind one
    that took long (many channels, a remote log) a lone subscribe waited for it
    (found by a review). Starts have rounds of their own."""
    from broadcast_history import Broadcast

    async with Broadcast("memory://", idle_check=0.2) as broadcast:
        async with contextlib.AsyncExitStack() as stack:
            subs = await asyncio.gather(
                *(stack.enter_async_context(broadcast.subscribe(f"idle{i}")) for i in range(20))
            )
            named, idle_rounds = broadcast.log.channels_named, []

            async def slow(names: list[str]) -> object:  # a big round on a remote log
                idle_rounds.append(len(names))
                await asyncio.sleep(2)
                return await named(names)

            monkeypatch.setattr(broadcast.log, "channels_named", slow)
            waiting = [asyncio.ensure_future(sub.get()) for sub in subs]
            while not idle_rounds:
                await asyncio.sleep(0.05)
            await asyncio.wait_for(stack.enter_async_context(broadcast.subscribe("new")), 1)
            for task in waiting:
                task.cancel()


async def test_start_lookups_failing_together_raise_errors_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Subscribes that shared a failed round of lookups all raised the one error
    object, whose traceback grew at each raise: 605 frames after 300 (found by a
    review). Each raises an error of its own, caused by the round's."""
    from broadcast_history import Broadcast

    async with Broadcast("memory://") as broadcast:

        async def failing(*_args: object) -> object:
            await asyncio.sleep(0.01)
            raise LogUnavailable("event log failure: boom")

        monkeypatch.setattr(broadcast.log, "channel", failing)
        monkeypatch.setattr(broadcast.log, "channels_named", failing)
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                async with broadcast.subscribe(f"c{i}"):
                    pass
            except LogUnavailable as exc:
                errors.append(exc)

        await asyncio.gather(*(one(i) for i in range(100)))
    assert len(errors) == 100 and len({id(e) for e in errors}) == 100
    assert all("boom" in str(e) for e in errors)
    assert max(len(traceback.extract_tb(e.__traceback__)) for e in errors) < 20


async def test_subscribes_under_way_as_the_broadcast_disconnects_end_quietly(
    tmp_path: Path,
) -> None:
    """Subscribes whose start lookups were queued when the broadcast disconnected
    raised NotConnected, which subscribe does not document (found by a review):
    they end as any subscription the disconnect closes."""
    from broadcast_history import Broadcast, Unsubscribed

    broadcast = Broadcast("memory://", log=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}")
    await broadcast.connect()
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            async with broadcast.subscribe(f"c{i}", since=0) as sub:
                with pytest.raises(Unsubscribed):
                    await asyncio.wait_for(sub.get(), 5)
                outcomes.append("ended")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    tasks = [asyncio.ensure_future(one(i)) for i in range(1000)]
    await asyncio.sleep(0)
    await broadcast.disconnect()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert set(outcomes) == {"ended"}, {o: outcomes.count(o) for o in set(outcomes)}
