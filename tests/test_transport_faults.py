"""A user transport that drops, duplicates and reorders: subscribers still get it all.

The fake here is a transport only (fault injection); the log is a real database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from broadcast_history import Broadcast, BroadcastBackend, Event, TransportError
from broadcast_history._heads import HeadProbe
from tests.conftest import unique
from tests.support.helpers import assert_contiguous, take


class UnreliableBackend(BroadcastBackend):
    """In-process transport written as a broadcaster user would, plus faults.

    It does not call ``BroadcastBackend.__init__`` (broadcaster's raises), to prove
    the broadcast does not depend on it.
    """

    def __init__(
        self, *, drop: float = 0.0, duplicate: float = 0.0, reorder: float = 0.0, seed: int = 1
    ) -> None:
        self.rng = random.Random(seed)
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        self.drop_all = False
        self.fail_with: BaseException | None = None
        self.channels: set[str] = set()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.held: Event | None = None
        self.sent = 0
        self.stalled: asyncio.Event | None = None  # set: publish hangs (a stuck socket)
        self.publish_error: BaseException | None = None  # set: publish raises it

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def subscribe(self, channel: str) -> None:
        self.channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)

    async def publish(self, channel: str, message: Any) -> None:
        assert isinstance(message, str)  # envelopes travel as text
        if self.stalled is not None:
            self.stalled.set()
            await asyncio.Event().wait()
        if self.publish_error is not None:
            raise self.publish_error
        self.sent += 1
        if self.drop_all or self.rng.random() < self.drop:
            return
        event = Event(channel=channel, message=message)
        if self.held is None and self.rng.random() < self.reorder:
            self.held = event
            return
        self.queue.put_nowait(event)
        if self.rng.random() < self.duplicate:
            self.queue.put_nowait(event)
        if self.held is not None:
            self.queue.put_nowait(self.held)
            self.held = None

    async def next_published(self) -> Event:
        if self.fail_with is not None:
            raise self.fail_with
        event = await self.queue.get()
        if self.fail_with is not None:
            raise self.fail_with
        return event


@pytest.fixture(params=["log:sqlite-memory", "log:sqlite-file"])
def log(request: pytest.FixtureRequest, sqlite_file_url: str) -> str | None:
    return None if request.param == "log:sqlite-memory" else sqlite_file_url


async def test_drops_duplicates_and_reorders(log: str | None) -> None:
    backend = UnreliableBackend(drop=0.15, duplicate=0.15, reorder=0.2)
    async with Broadcast(backend=backend, log=log, idle_check=0.1, reorder_window=0.01) as bc:
        channel = unique()
        async with bc.subscribe(channel, since=0) as sub:

            async def publisher() -> None:
                for i in range(300):
                    await bc.publish(channel, f"m{i}")
                    if i % 7 == 0:
                        await asyncio.sleep(0)

            task = asyncio.create_task(publisher())
            events = await take(sub, 300)
            await task
    assert_contiguous(events, 1, 300)
    assert [e.message for e in events] == [f"m{i}" for i in range(300)]


async def test_dropped_last_message_still_arrives(log: str | None) -> None:
    backend = UnreliableBackend()
    async with Broadcast(backend=backend, log=log, idle_check=0.1) as bc:
        channel = unique()
        async with bc.subscribe(channel) as sub:
            await bc.publish(channel, "delivered")
            assert (await take(sub, 1))[0].message == "delivered"
            backend.drop_all = True
            await bc.publish(channel, "dropped")
            [event] = await take(sub, 1, timeout=5)
    assert (event.offset, event.message) == (2, "dropped")


async def test_a_caller_polling_with_short_timeouts_still_gets_a_lost_event(
    sqlite_file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get() under wait_for with a timeout below idle_check, again and again: the idle
    check still runs idle_check after the last arrival (each get() restarted it, so an
    event whose live copy was lost never arrived on a quiet channel), and a log slower
    to answer than the timeout still answers it (each get() asked again, and was cut
    short again)."""
    deaf = UnreliableBackend()
    deaf.drop_all = True  # this broadcast hears nothing live
    async with (
        Broadcast(backend=UnreliableBackend(), log=sqlite_file_url) as publisher,
        Broadcast(backend=deaf, log=sqlite_file_url, idle_check=0.5) as subscriber,
    ):
        read_head = subscriber.log.channel

        async def slow_head(name: str) -> Any:
            await asyncio.sleep(0.3)  # longer than each get() waits
            return await read_head(name)

        monkeypatch.setattr(subscriber.log, "channel", slow_head)
        channel = unique()
        async with subscriber.subscribe(channel) as sub:
            await publisher.publish(channel, "lost live")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            event = None
            while event is None and loop.time() < deadline:
                with contextlib.suppress(asyncio.TimeoutError):
                    event = await asyncio.wait_for(sub.get(), 0.1)
    assert event is not None and (event.offset, event.message) == (1, "lost live")


async def test_transport_down_subscriber_reads_log(log: str | None) -> None:
    backend = UnreliableBackend()
    backend.drop_all = True
    async with Broadcast(backend=backend, log=log, idle_check=0.05) as bc:
        channel = unique()
        async with bc.subscribe(channel) as sub:
            for i in range(50):
                await bc.publish(channel, str(i))
            assert_contiguous(await take(sub, 50, timeout=10), 1, 50)


async def test_listener_failure_reaches_every_subscriber(log: str | None) -> None:
    backend = UnreliableBackend()
    async with Broadcast(backend=backend, log=log) as bc:
        async with bc.subscribe("a") as first, bc.subscribe("b") as second:
            backend.fail_with = ConnectionResetError("broker went away")
            backend.queue.put_nowait(Event("a", "wake"))
            for sub in (first, second):
                with pytest.raises(TransportError) as info:
                    await asyncio.wait_for(sub.get(), 5)
                assert isinstance(info.value.__cause__, ConnectionResetError)
        assert not bc.transport_connected
        with pytest.raises(TransportError):
            async with bc.subscribe("c") as third:
                await asyncio.wait_for(third.get(), 5)


async def test_foreign_messages_are_ignored(log: str | None) -> None:
    backend = UnreliableBackend()
    async with Broadcast(backend=backend, log=log) as bc:
        channel = unique()
        async with bc.subscribe(channel) as sub:
            backend.queue.put_nowait(Event(channel, "not an envelope"))
            await bc.publish(channel, "real")
            assert (await take(sub, 1))[0].message == "real"


async def test_idle_checks_are_shared_between_subscribers(log: str | None) -> None:
    """Many idle subscribers of a channel cost about one head lookup per check."""
    backend = UnreliableBackend()
    async with Broadcast(backend=backend, log=log, idle_check=0.1) as bc:
        lookups = 0
        channel_lookup = bc.log.channel

        async def counting(name: str) -> object:
            nonlocal lookups
            lookups += 1
            return await channel_lookup(name)

        bc.log.channel = counting  # type: ignore[method-assign,assignment]
        channel = unique()

        async def idle_subscriber() -> None:
            async with bc.subscribe(channel) as sub:
                await sub.get()

        tasks = [asyncio.create_task(idle_subscriber()) for _ in range(200)]
        await asyncio.sleep(0.3)
        lookups = 0
        await asyncio.sleep(1.0)
        # 200 subscribers x 10 checks each would be 2000 lookups unshared.
        assert lookups < 100
        backend.drop_all = True  # the event arrives through the idle check alone
        await bc.publish(channel, "wake")
        await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_idle_checks_of_quiet_channels_go_to_the_log_together(log: str | None) -> None:
    """Each quiet channel's idle check went to the log alone: a transaction per
    channel per idle_check (234 a second for 200 channels on Postgres, past the pool
    so new connections each second; found by two consumer probes). One that goes to
    the log takes every channel looked up over half its age ago along."""
    backend = UnreliableBackend()
    async with Broadcast(backend=backend, log=log, idle_check=0.2) as bc:
        queries = names = 0
        one, many = bc.log.channel, bc.log.channels_named

        async def channel(name: str) -> object:
            nonlocal queries, names
            queries, names = queries + 1, names + 1
            return await one(name)

        async def channels_named(wanted: list[str]) -> object:
            nonlocal queries, names
            queries, names = queries + 1, names + len(wanted)
            return await many(wanted)

        bc.log.channel = channel  # type: ignore[method-assign,assignment]
        bc.log.channels_named = channels_named  # type: ignore[method-assign,assignment]
        channels = [unique() for _ in range(100)]

        async def idle_subscriber(channel: str) -> Event:
            async with bc.subscribe(channel) as sub:
                # Started apart, as subscribers are: their checks fall due apart too.
                return await sub.get()

        tasks = []
        for channel in channels:
            tasks.append(asyncio.create_task(idle_subscriber(channel)))
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.5)
        queries = names = 0
        await asyncio.sleep(2.0)
        # Each channel is still looked up about once per check (10 in 2 s: 1,000
        # names), but alone that was 1,000 queries.
        assert names >= 500 and queries < 100, (queries, names)
        backend.drop_all = True  # the events arrive through the idle checks alone
        sent = [await bc.publish(channel, "wake") for channel in channels]
        assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == sent


async def test_channels_that_stopped_idle_checks_are_not_taken_along(
    log: str | None,
) -> None:
    """Every subscribed channel that once had an idle check was taken along by every
    later one: a quiet channel among 3,000 busy ones asked for 3,000 names at each of
    its checks (found by a review). Only channels whose idle checks go on are."""
    async with Broadcast(backend=UnreliableBackend(), log=log) as bc:
        channels = [f"busy{i}" for i in range(300)] + ["quiet"]
        probe = HeadProbe(bc.log, {channel: {object()} for channel in channels})
        names = 0
        one, many = bc.log.channel, bc.log.channels_named

        async def channel(name: str) -> object:
            nonlocal names
            names += 1
            return await one(name)

        async def channels_named(wanted: list[str]) -> object:
            nonlocal names
            names += len(wanted)
            return await many(wanted)

        bc.log.channel = channel  # type: ignore[method-assign,assignment]
        bc.log.channels_named = channels_named  # type: ignore[method-assign,assignment]
        # Each had a quiet moment once; from then on only "quiet" checks.
        await asyncio.gather(*(probe.channel(c, 0.05) for c in channels))
        names = 0
        for _ in range(10):
            await asyncio.sleep(0.1)
            await probe.channel("quiet", 0.05)
        assert names < 700, names  # taken along at most twice (10 checks: 3,010 before)


async def test_idle_checks_failing_in_an_outage_log_now_and_then(
    log: str | None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each idle subscriber logged its failed idle check every idle_check: 300
    subscribers wrote ~3,000 lines in a 10 s log outage (found by a probe)."""
    from broadcast_history import LogUnavailable, _subscriber

    monkeypatch.setattr(_subscriber._idle_check_failures, "_last", -1000.0)
    caplog.set_level(logging.WARNING, logger="broadcast_history")
    async with Broadcast(backend=UnreliableBackend(), log=log, idle_check=0.1) as bc:

        async def down(names: object) -> object:
            raise LogUnavailable("the log is away")

        async def idle_subscriber(channel: str) -> None:
            async with bc.subscribe(channel) as sub:
                await sub.get()

        tasks = [asyncio.create_task(idle_subscriber(unique())) for _ in range(50)]
        try:
            await asyncio.sleep(0.2)
            bc.log.channel = down  # type: ignore[method-assign,assignment]
            bc.log.channels_named = down  # type: ignore[method-assign,assignment]
            await asyncio.sleep(1.0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    failed = [r for r in caplog.records if "idle check failed" in r.getMessage()]
    assert len(failed) == 1, len(failed)


async def test_stalled_transport_bounds_memory_and_delays_nobody(
    log: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A transport whose publish never returns (a peer that stopped reading): publishes
    # still return, this process's subscribers still get every event at once, the
    # events waiting for the transport stay bounded, and disconnect does not hang.
    from broadcast_history import _appender

    monkeypatch.setattr(_appender, "SEND_TIMEOUT", 0.5)
    monkeypatch.setattr(_appender, "MAX_OUTBOX", 50)
    backend = UnreliableBackend()
    backend.stalled = asyncio.Event()
    channel = unique()
    # Idle checks far apart: the events must come at once, not from the log later.
    broadcast = Broadcast(backend=backend, log=log, idle_check=60)
    await broadcast.connect()
    try:
        async with broadcast.subscribe(channel) as subscriber:
            first = await broadcast.publish(channel, "first")
            await asyncio.wait_for(backend.stalled.wait(), 5)
            published = [first] + [await broadcast.publish(channel, f"m{i}") for i in range(300)]
            received = await asyncio.wait_for(take(subscriber, len(published)), 5)
            assert received == published
            assert len(broadcast._appender._outbox) <= 50
            await asyncio.sleep(0.7)  # the stuck send is abandoned
            assert broadcast.stats.live_send_failures >= 2
    finally:
        await asyncio.wait_for(broadcast.disconnect(), 5)


async def test_failing_sends_say_the_transport_is_down_and_log_once(
    log: str | None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that only publishes has no subscription to notice an outage: its
    failing sends do, without a traceback per batch."""
    from broadcast_history import _appender

    caplog.set_level(logging.INFO, logger="broadcast_history")
    backend = UnreliableBackend()
    backend.reconnects = 0
    backend.publish_error = ConnectionError("refused")
    async with Broadcast(backend=backend, log=log) as bc:
        assert bc.transport_connected
        for i in range(20):
            await bc.publish("c", str(i))
            await asyncio.sleep(0.01)  # each one its own send
        assert bc.stats.live_send_failures >= 10
        assert not bc.transport_connected
        # Metrics scrapes read it from another thread (no running loop there).
        assert not await asyncio.to_thread(lambda: bc.transport_connected)
        tracebacks = [r for r in caplog.records if r.exc_info and "live send" in r.message]
        assert len(tracebacks) == 1
        # A reconnection says it works again; failing after it is another outage.
        backend.reconnects += 1
        assert bc.transport_connected
        await bc.publish("c", "again")
        for _ in range(100):
            if not bc.transport_connected:
                break
            await asyncio.sleep(0.01)
        assert not bc.transport_connected
        tracebacks = [r for r in caplog.records if r.exc_info and "live send" in r.message]
        assert len(tracebacks) == 2
        # A process that publishes no more is not reported down for ever.
        monkeypatch.setattr(_appender, "FAILURE_MEMORY", 0.2)
        await asyncio.sleep(0.3)
        assert bc.transport_connected
        backend.publish_error = None
        await bc.publish("c", "back")

        def works_again() -> bool:
            return any("live sends work again" in r.message for r in caplog.records)

        for _ in range(100):
            if works_again():
                break
            await asyncio.sleep(0.01)
        assert works_again() and bc.transport_connected


def _fail_sends(backend: UnreliableBackend, fails: Callable[[int], bool]) -> None:
    """``backend``'s sends fail where ``fails(n)`` for the n-th (from 1): a Redis
    cluster with a master down, whose channels fail while the others' work."""
    publish = backend.publish
    calls = 0

    async def some_failing(channel: str, message: Any) -> None:
        nonlocal calls
        calls += 1
        if fails(calls):
            raise ConnectionError("shard down")
        await publish(channel, message)

    backend.publish = some_failing  # type: ignore[method-assign]


async def test_sends_failing_on_and_off_say_down_steadily_and_log_little(
    log: str | None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends that fail every other batch (a Redis cluster with one master down: its
    channels fail, the others' work) logged a traceback and a recovery per batch,
    and transport_connected said up and down by turns."""
    from broadcast_history import _appender

    caplog.set_level(logging.INFO, logger="broadcast_history")
    backend = UnreliableBackend()
    backend.reconnects = 0
    publish = backend.publish
    _fail_sends(backend, lambda call: call % 2 == 1)  # every other
    async with Broadcast(backend=backend, log=log) as bc:
        seen = set()
        for i in range(40):
            await bc.publish("c", str(i))
            await asyncio.sleep(0.01)  # each one its own send
            if i >= 4:
                seen.add(bc.transport_connected)
        assert bc.stats.live_send_failures >= 15
        assert seen == {False}
        live = [r for r in caplog.records if "live send" in r.message]
        assert len(live) <= 3, [r.message for r in live]
        # Working for FAILURE_MEMORY ends it, and says so.
        monkeypatch.setattr(_appender, "FAILURE_MEMORY", 0.2)
        backend.publish = publish  # type: ignore[method-assign]
        await bc.publish("c", "fine")
        await asyncio.sleep(0.3)
        assert bc.transport_connected
        await bc.publish("c", "fine again")
        await asyncio.sleep(0.05)
        assert any("failed on and off" in r.getMessage() for r in caplog.records)
        # A failure after that is another outage, told with its traceback.
        backend.publish_error = ConnectionError("down again")
        await bc.publish("c", "lost")
        for _ in range(100):
            if not bc.transport_connected:
                break
            await asyncio.sleep(0.01)
        tracebacks = [r for r in caplog.records if r.exc_info and "live send" in r.message]
        assert len(tracebacks) == 2 and not bc.transport_connected


async def test_a_third_of_sends_failing_says_down_steadily(log: str | None) -> None:
    """One cluster master of three down: a third of the sends fail. Judged over the
    last 8 sends alone, transport_connected switched up and down hundreds of times
    in 3,000 sends (found by a review); it stays down."""
    backend = UnreliableBackend()
    backend.reconnects = 0
    _fail_sends(backend, lambda call: call % 3 == 0)  # every third
    async with Broadcast(backend=backend, log=log) as bc:
        said = []
        for i in range(150):
            await bc.publish("c", str(i))
            await asyncio.sleep(0.002)  # each one its own send
            said.append(bc.transport_connected)
        settled = said[20:]
        assert not any(settled), said


async def test_a_send_failing_now_and_then_is_no_outage(log: str | None) -> None:
    """After a run of failures ended with a send that worked, one failure now and
    then among many sends kept transport_connected false for good (found by a
    review): only sends failing at least half the time count as down."""
    backend = UnreliableBackend()
    backend.reconnects = 0
    async with Broadcast(backend=backend, log=log) as bc:
        backend.publish_error = ConnectionError("refused")
        await bc.publish("c", "lost")
        await asyncio.sleep(0.05)
        assert not bc.transport_connected
        backend.publish_error = None
        for round_ in range(3):
            for i in range(10):
                await bc.publish("c", f"{round_}.{i}")
                await asyncio.sleep(0.005)
            backend.publish_error = TimeoutError("one slow batch")
            await bc.publish("c", f"{round_} lost")
            await asyncio.sleep(0.02)
            backend.publish_error = None
            assert bc.transport_connected, round_


async def test_an_outage_soon_after_a_blip_is_told_within_a_few_sends(log: str | None) -> None:
    """A blip, many sends that worked, then every send failing: transport_connected
    stayed true until failures made up half of all the sends since the blip (found
    by a probe: 99 failures in a row after 200 that worked)."""
    backend = UnreliableBackend()
    backend.reconnects = 0
    async with Broadcast(backend=backend, log=log) as bc:
        backend.publish_error = ConnectionError("blip")
        for i in range(3):
            await bc.publish("c", f"blip {i}")
            await asyncio.sleep(0.005)
        backend.publish_error = None
        for i in range(200):
            await bc.publish("c", str(i))
        await asyncio.sleep(0.02)
        assert bc.transport_connected
        backend.publish_error = ConnectionError("down")
        for i in range(8):
            await bc.publish("c", f"lost {i}")
            await asyncio.sleep(0.005)  # each one its own send
        assert not bc.transport_connected


async def test_a_stall_soon_after_a_blip_is_told_at_its_first_failure(
    log: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled transport fails one send per SEND_TIMEOUT (10 s): after a blip, the
    last 8 sends needed 4 of those to say down (25 s in a probe, against 10 s for
    the same stall without the blip). None working for a while says it at once."""
    from broadcast_history import _appender

    monkeypatch.setattr(_appender, "_NONE_WORKED", 0.2)
    backend = UnreliableBackend()
    backend.reconnects = 0
    async with Broadcast(backend=backend, log=log) as bc:
        backend.publish_error = ConnectionError("blip")
        await bc.publish("c", "blip")
        await asyncio.sleep(0.02)
        backend.publish_error = None
        for i in range(10):
            await bc.publish("c", str(i))
            await asyncio.sleep(0.005)
        assert bc.transport_connected
        await asyncio.sleep(0.3)  # nothing sent: the stalled send is waiting
        backend.publish_error = TimeoutError("stalled")
        await bc.publish("c", "lost")
        for _ in range(100):
            if not bc.transport_connected:
                break
            await asyncio.sleep(0.01)
        assert not bc.transport_connected


async def test_disconnect_waits_briefly_for_a_stalled_send(log: str | None) -> None:
    """A transport that stopped answering (a frozen Redis) held disconnect for a whole
    live-send timeout (10 s); what was not sent is in the log."""
    backend = UnreliableBackend()
    backend.stalled = asyncio.Event()
    broadcast = Broadcast(backend=backend, log=log)
    await broadcast.connect()
    await broadcast.publish("c", "m")
    await asyncio.wait_for(backend.stalled.wait(), 5)
    await asyncio.wait_for(broadcast.disconnect(), 8.5)  # SEND_TIMEOUT is 10 s


async def test_an_idle_check_answered_late_says_nothing_of_what_came_since() -> None:
    """The idle check's head query outlives a get() cut short; if events were
    delivered before its answer came, the answer is about an older state (here: no
    channel yet) and must not raise StreamReset ("deleted") on the next get()."""
    async with Broadcast(idle_check=0.2) as broadcast:
        read_head = broadcast.log.channel
        answer = asyncio.Event()

        async def late_head(name: str) -> Any:
            info = await read_head(name)  # read now, answered later
            await answer.wait()
            return info

        async with broadcast.subscribe("new") as sub:
            broadcast.log.channel = late_head  # type: ignore[method-assign]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sub.get(), 0.3)  # the idle check starts
            broadcast.log.channel = read_head  # type: ignore[method-assign]
            await broadcast.publish("new", "first")
            assert (await asyncio.wait_for(sub.get(), 5)).offset == 1
            answer.set()  # the stale answer: no channel "new"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sub.get(), 0.6)  # nothing more, no reset
