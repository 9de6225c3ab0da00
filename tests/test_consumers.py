"""Durable consumers in one process: positions, leases, fencing, reset and trimmed
channels, auto_commit, and 1,000 consumers on 100 channels (SQLite file, Postgres,
MySQL/MariaDB).

The failover of a killed or paused holder process is in test_consumer_failover.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

from broadcast_history import (
    Broadcast,
    ConsumerBusy,
    HistoryTruncated,
    InvalidArgument,
    LogError,
    LogUnavailable,
    StreamReset,
    Subscriber,
    Unsubscribed,
)
from broadcast_history._leases import IN_FLIGHT
from tests.conftest import MakeBroadcast, unique
from tests.support.helpers import take

SHARED_LOGS = pytest.mark.parametrize(
    "log_url", ["log:sqlite-file", "log:postgres", "log:mysql"], indirect=True
)
pytestmark = [SHARED_LOGS, pytest.mark.parametrize("transport", ["memory"], indirect=True)]


async def positions(broadcast: Broadcast, channel: str) -> dict[str, int | None]:
    return {c.name: c.position for c in await broadcast.log.consumers(channel)}


async def test_position_is_stored_and_wins(broadcast: Broadcast) -> None:
    for i in range(1, 6):
        await broadcast.publish("orders", f"o{i}")
    # Nothing stored yet: since= applies, and leaving without a commit stores nothing.
    async with broadcast.subscribe("orders", consumer="mailer", since=0) as sub:
        assert [e.offset for e in await take(sub, 2)] == [1, 2]
    assert await broadcast.log.consumers() == []

    async with broadcast.subscribe("orders", consumer="mailer", since=0) as sub:
        first, _ = await take(sub, 2)
        await sub.commit(first)
        assert await positions(broadcast, "orders") == {"mailer": 1}
        await sub.commit()
        assert await positions(broadcast, "orders") == {"mailer": 2}
        await sub.commit(first)  # never backwards
        [info] = await broadcast.log.consumers("orders")
        assert (info.position, info.epoch, info.lag) == (2, first.epoch, 3)
        assert info.holder is not None and info.updated_at is not None

    # The stored position wins over since= and history=.
    async with broadcast.subscribe("orders", consumer="mailer", since=4) as sub:
        assert [e.offset for e in await take(sub, 3)] == [3, 4, 5]
    async with broadcast.subscribe("orders", consumer="mailer", history=1) as sub:
        assert sub.position == 2
    # Another name is another position.
    async with broadcast.subscribe("orders", consumer="indexer") as sub:
        assert sub.position == 5


async def test_commit_checks_its_arguments(broadcast: Broadcast) -> None:
    await broadcast.publish("c", "m")
    async with broadcast.subscribe("c", since=0) as plain:
        with pytest.raises(InvalidArgument, match="consumer"):
            await plain.commit()
    async with broadcast.subscribe("c", consumer="w") as sub:
        event = await broadcast.publish("c", "not yet delivered")
        with pytest.raises(InvalidArgument, match="not delivered"):
            await sub.commit(event)
    async with broadcast.subscribe("c", consumer="w", since=0) as sub:
        await sub.get()
        with pytest.raises(InvalidArgument, match="takes an Event"):
            await sub.commit("1")  # type: ignore[arg-type]
    # An event from before the subscription's start was not delivered by it either
    # (committing it made the next holder redo what since= skipped on purpose).
    await broadcast.publish("c", "m2")
    async with broadcast.subscribe("c", consumer="later", since=2) as sub:
        first = (await broadcast.log.read("c", limit=1))[0]
        with pytest.raises(InvalidArgument, match="not delivered"):
            await sub.commit(first)
    leases = (0, 1e-9, 0.05, 7 * 86_400 + 1, 1e15)
    bad_options = [{"consumer": ""}, {"auto_commit": 1.0}]
    bad_options += [{"consumer": "w", "lease": lease} for lease in leases]
    # A period so short that its task would spin.
    bad_options += [{"consumer": "w", "auto_commit": period} for period in (1e-9, 0.001)]
    for bad in bad_options:
        with pytest.raises(InvalidArgument):
            async with broadcast.subscribe("c", **bad):  # type: ignore[arg-type]
                pass
    # The log's own lease methods check the same range: no driver overflow.
    for lease in (1e-9, 1e15):
        with pytest.raises(InvalidArgument, match="lease must be"):
            await broadcast.log.acquire_lease("c", "w", "h", lease)
        with pytest.raises(InvalidArgument, match="lease must be"):
            await broadcast.log.renew_leases([("c", "w", "h")], lease)
    async with broadcast.subscribe("c", consumer="week", lease=7 * 86_400, since=0) as sub:
        assert (await sub.get()).offset == 1


async def test_leases_taken_together_run_statements_of_a_few_shapes(broadcast: Broadcast) -> None:
    """Standbys' leases were taken with one multi-row upsert of as many rows as were
    free: a statement text per count, each kept prepared per connection (128 by
    SQLite's driver, 100 by asyncpg, and the Postgres server with them)."""
    texts: set[str] = set()

    def ran(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "broadcast_consumers" in statement and statement.lstrip().upper().startswith("INSERT"):
            texts.add(statement)

    sa_event.listen(Engine, "before_cursor_execute", ran)
    try:
        for size in range(1, 41):
            claims = [(f"shapes-{size}", f"c{i}", f"h{size}-{i}") for i in range(size)]
            got = await broadcast.log.acquire_leases(claims, 30.0)
            assert sorted(got.taken) == sorted(holder for _, _, holder in claims)
            again = await broadcast.log.acquire_leases([(c, n, "other") for c, n, _ in claims], 30)
            assert again.taken == {} and again.next_expiry is not None
    finally:
        sa_event.remove(Engine, "before_cursor_execute", ran)
    assert 0 < len(texts) <= 6, len(texts)  # rows in runs of 1, 2, 4, 8, 16 and 32


async def test_a_lease_runs_from_its_statement_not_from_a_queue(broadcast: Broadcast) -> None:
    """A burst of subscribes waits for the few lease writes a broadcast runs at once;
    a lease shorter than that wait was handed out as already run out."""
    slots = broadcast._leases.gate._slots
    for _ in range(IN_FLIGHT):
        await slots.acquire()

    async def open_later() -> None:
        await asyncio.sleep(1.5)  # longer than the lease below
        for _ in range(IN_FLIGHT):
            slots.release()

    opener = asyncio.create_task(open_later())
    async with broadcast.subscribe("burst", consumer="w", lease=1.0) as sub:
        await opener
        await broadcast.publish("burst", "m")
        assert (await asyncio.wait_for(sub.get(), 5)).message == "m"
        await sub.commit()


async def test_commits_racing_from_two_tasks(broadcast: Broadcast) -> None:
    for i in range(50):
        await broadcast.publish("race", str(i))
    async with broadcast.subscribe("race", consumer="w", since=0) as sub:
        events = await take(sub, 50)

        async def committer(seed: int) -> None:
            shuffled = events[:]
            random.Random(seed).shuffle(shuffled)
            for event in shuffled:
                await sub.commit(event)

        await asyncio.gather(committer(1), committer(2))
        assert await positions(broadcast, "race") == {"w": 50}
        await asyncio.gather(sub.commit(events[3]), sub.commit(events[9]))
        assert await positions(broadcast, "race") == {"w": 50}


async def test_one_holder_at_a_time(make_broadcast: MakeBroadcast) -> None:
    first, second = await make_broadcast(), await make_broadcast()  # two "processes"
    for i in range(10):
        await first.publish("jobs", str(i))
    # Leases of 2 s: renewed every 0.67 s, which a loaded machine keeps up with.
    async with first.subscribe("jobs", consumer="w", since=0, lease=2.0) as holder:
        await take(holder, 4)
        await holder.commit()
        with pytest.raises(ConsumerBusy, match="held by"):
            async with second.subscribe("jobs", consumer="w", wait=False):
                pass
        with pytest.raises(ConsumerBusy):  # the same broadcast counts as another holder
            async with first.subscribe("jobs", consumer="w", wait=False):
                pass

        async def standby(broadcast: Broadcast) -> list[int]:
            async with broadcast.subscribe("jobs", consumer="w", lease=2.0) as sub:
                return [e.offset for e in await take(sub, 6)]

        waiting = [asyncio.create_task(standby(b)) for b in (first, second)]
        await asyncio.sleep(2.5)  # more than a lease: renewals keep it held
        assert not any(task.done() for task in waiting)
        await take(holder, 1)  # offset 5, handled but not committed
    # One standby takes over and starts after the last commit; the other waits.
    done, pending = await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert [task.result() for task in done] == [[5, 6, 7, 8, 9, 10]]
    assert len(pending) == 1
    # The winner left without committing: the last one starts at 5 again.
    assert await asyncio.wait_for(pending.pop(), 10) == [5, 6, 7, 8, 9, 10]


async def test_a_standby_that_gives_up_leaves_no_lease(make_broadcast: MakeBroadcast) -> None:
    first, second = await make_broadcast(), await make_broadcast()
    await first.publish("jobs", "j")
    async with first.subscribe("jobs", consumer="w", since=0, lease=1.0) as holder:
        await holder.get()
        await holder.commit()

        async def enter(broadcast: Broadcast) -> None:
            async with broadcast.subscribe("jobs", consumer="w", lease=1.0):
                pass

        for broadcast in (first, second):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(enter(broadcast), 0.5)
    [info] = await second.log.consumers()
    assert (info.position, info.holder) == (1, None)
    async with second.subscribe("jobs", consumer="w", wait=False) as sub:
        assert sub.position == 1


async def test_a_holder_cancelled_again_as_it_leaves_gives_its_lease_back(
    make_broadcast: MakeBroadcast,
) -> None:
    """One cancel of an anyio cancel scope (Starlette, FastAPI) is delivered again at
    each await of the clean-up: a holder with auto_commit, cut short while it
    stopped its auto-commits, kept its lease renewed for as long as the process ran,
    and the standby waited as long (found by an audit)."""
    import anyio

    broadcast = await make_broadcast()
    await broadcast.publish("jobs", "j")

    async def worker() -> None:
        async with broadcast.subscribe(
            "jobs", consumer="w", since=0, lease=0.6, auto_commit=0.05
        ) as sub:
            async for _ in sub:
                pass

    async with anyio.create_task_group() as group:
        group.start_soon(worker)
        await anyio.sleep(0.2)
        group.cancel_scope.cancel()
    assert not any(broadcast._leases._held.values())

    async def standby() -> int | None:
        async with broadcast.subscribe("jobs", consumer="w", lease=0.6) as sub:
            return sub.position

    assert await asyncio.wait_for(standby(), 3) == 1  # auto-committed before the cut


async def test_lease_writes_given_up_on_keep_their_slots(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscribe(consumer=) cancelled while its acquisition ran gave its slot back at
    once, though the statement went on: callers giving up on a slow log piled lease
    writes past IN_FLIGHT (38 at once in the audit's run), renewals behind them."""
    running = peak = 0
    acquire_lease = broadcast.log.acquire_lease

    async def slow(*args: Any, **kwargs: Any) -> Any:  # a slow log (fault injection)
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.3)
            return await acquire_lease(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(broadcast.log, "acquire_lease", slow)

    async def client(index: int) -> None:
        async with broadcast.subscribe(f"c{index}", consumer="c", since=0):
            pass

    for index in range(3 * IN_FLIGHT):
        task = asyncio.create_task(client(index))
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    gate = broadcast._leases.gate
    deadline = time.monotonic() + 30
    # Every statement ended (its slot free again) and each lease taken given back.
    while running or broadcast._leases._background or gate._slots._value < IN_FLIGHT:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert 0 < peak <= IN_FLIGHT
    assert await broadcast.log.consumers() == []  # each taken lease given back


async def test_a_holder_that_lost_its_lease_is_fenced(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused, other = await make_broadcast(), await make_broadcast()
    for i in range(5):
        await paused.publish("jobs", str(i))
    async with paused.subscribe("jobs", consumer="w", since=0, lease=1.0) as sub:
        events = await take(sub, 5)
        await sub.commit(events[1])

        # The holder's renewals stop reaching the log (as if it were paused).
        async def unreachable(*_args: object) -> set[str]:
            raise LogUnavailable("injected")

        monkeypatch.setattr(paused.log, "renew_leases", unreachable)
        getting = asyncio.create_task(sub.get())  # nothing new: it waits
        async with other.subscribe("jobs", consumer="w", lease=1.0) as standby:
            assert standby.position == 2
            with pytest.raises(ConsumerBusy, match="lost its lease"):
                await asyncio.wait_for(getting, 5)
            with pytest.raises(ConsumerBusy):
                await sub.commit()
            with pytest.raises(ConsumerBusy):
                await sub.get()
            assert [e.offset for e in await take(standby, 3)] == [3, 4, 5]
            await standby.commit()
    assert await positions(other, "jobs") == {"w": 5}


async def test_a_get_waiting_as_the_lease_runs_out_hands_out_nothing(
    log_url: str, transport: object
) -> None:
    """A holder paused while its get() waited (SIGSTOP, a debugger, a long GC pause):
    the standby took over and handled the next event, and the paused holder's get()
    then returned that event too, two workers handling it."""
    del transport  # the broadcasts here each have their own memory transport
    lease = 0.6
    channel = unique()
    handled = threading.Event()

    def standby() -> None:  # another process, as far as the paused one can tell
        async def run() -> None:
            async with (
                Broadcast("memory://", log=log_url) as other,
                other.subscribe(channel, consumer="w", lease=lease) as sub,
            ):
                await other.publish(channel, "second")
                assert (await take(sub, 1))[0].message == "second"
                await sub.commit()
                handled.set()

        asyncio.run(run())

    async with Broadcast("memory://", log=log_url, idle_check=0.1) as paused:
        await paused.publish(channel, "first")
        async with paused.subscribe(channel, consumer="w", since=0, lease=lease) as sub:
            await sub.get()
            await sub.commit()
            getting = asyncio.ensure_future(sub.get())
            await asyncio.sleep(0.1)
            thread = threading.Thread(target=standby)
            thread.start()
            try:
                assert handled.wait(20)  # this loop stands still meanwhile: paused
                with pytest.raises(ConsumerBusy, match="lost its lease"):
                    await asyncio.wait_for(getting, 10)
            finally:
                await asyncio.to_thread(thread.join)


async def test_a_consumer_taken_and_given_back_in_a_loop(make_broadcast: MakeBroadcast) -> None:
    """Broadcasts taking and giving back a consumer that never committed (its row is
    deleted with each give-back): a try that found it held but its holder gone by the
    next statement raised ConsumerBusy naming a holder "None", and MySQL's deadlocks
    between the take and the delete came out of subscribe() as LogUnavailable."""
    first, second = await make_broadcast(), await make_broadcast()
    busy: list[str] = []
    taken = 0
    stop = False

    async def attempt(broadcast: Broadcast) -> None:
        nonlocal taken
        try:
            async with broadcast.subscribe("jobs", consumer="w", wait=False):
                taken += 1
        except ConsumerBusy as exc:
            busy.append(str(exc))

    async def churn() -> None:
        while not stop:
            await attempt(first)

    churning = [asyncio.create_task(churn()) for _ in range(2)]
    try:
        for _ in range(120):
            await attempt(second)
    finally:
        stop = True
        await asyncio.gather(*churning)
    assert taken and busy
    assert not [text for text in busy if "held by None" in text]


async def test_a_standby_with_a_longer_lease_takes_over_when_the_holders_runs_out(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby asked once per third of its own lease: with 30 s against the
    holder's 0.5 s, it took over up to 10 s after the holder's lease ran out."""
    dying, other = await make_broadcast(), await make_broadcast()
    await dying.publish("jobs", "0")
    async with dying.subscribe("jobs", consumer="w", since=0, lease=0.5) as sub:
        await sub.get()

        async def unreachable(*_args: object) -> set[str]:
            raise LogUnavailable("injected")  # as if the holder died

        monkeypatch.setattr(dying.log, "renew_leases", unreachable)
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with other.subscribe("jobs", consumer="w", since=0, lease=30) as standby:
            assert loop.time() - began < 3
            assert (await take(standby, 1))[0].message == "0"


async def test_commit_is_fenced_in_the_statement(broadcast: Broadcast) -> None:
    """The log refuses a commit of a holder whose lease ran out, even if the holder
    believes it still holds it (its own clock is not consulted)."""
    event = await broadcast.publish("c", "m")
    log = broadcast.log
    assert (await log.acquire_lease("c", "w", "old", 0.2)).acquired
    assert await log.commit_position("c", "w", "old", event.epoch, 1, 0.2) == 1
    await asyncio.sleep(0.3)
    # Ran out: the holder's commit is refused, though nobody took the consumer yet...
    assert await log.commit_position("c", "w", "old", event.epoch, 1, 0.2) is None
    # ...and its renewal, arriving late, still renews it (nobody held it meanwhile).
    assert await log.renew_leases([("c", "w", "old")], 0.2) == {"old"}
    await asyncio.sleep(0.3)
    taken = await log.acquire_lease("c", "w", "new", 5)
    assert (taken.acquired, taken.epoch, taken.position) == (True, event.epoch, 1)
    assert await log.commit_position("c", "w", "old", event.epoch, 1, 0.2) is None
    assert await log.renew_leases([("c", "w", "old"), ("c", "w", "new")], 5) == {"new"}
    assert not (await log.acquire_lease("c", "w", "old", 5)).acquired


async def test_a_slow_commit_under_a_renewed_lease_loses_nothing(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit answered after the lease's length took the lease for lost, and failed
    the subscription with ConsumerBusy, while renewals had kept it all along (300
    consumers on one SQLite log: commits took over a second)."""
    log = broadcast.log
    commit_position = log.commit_position
    slow = True

    async def late(*args: Any) -> Any:
        if slow:
            await asyncio.sleep(1.6)  # longer than the lease
        return await commit_position(*args)

    monkeypatch.setattr(log, "commit_position", late)
    await broadcast.publish("c", "one")
    # A lease of 1 s: renewals of a 0.5 s one (every 0.17 s) came late on MySQL
    # under the full suite, and the lease was lost for that.
    async with broadcast.subscribe("c", consumer="w", since=0, lease=1.0) as sub:
        await take(sub, 1)
        with pytest.raises(LogUnavailable, match="still held"):
            await sub.commit()
        slow = False
        await broadcast.publish("c", "two")
        assert [e.offset for e in await take(sub, 1)] == [2]  # not failed
        await sub.commit()
    [info] = await log.consumers("c")
    assert info.position == 2


async def test_renewals_keep_their_pace_when_each_takes_long(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next renewal was a third of the lease after the last one ended: renewals
    of hundreds of leases, each taking a good part of that third, left each lease
    unrenewed for a moment before its next renewal answered."""
    log = broadcast.log
    renew_leases = log.renew_leases

    async def slow(*args: Any) -> Any:
        await asyncio.sleep(1.1)
        return await renew_leases(*args)

    monkeypatch.setattr(log, "renew_leases", slow)
    # Renewals every second, each answered 1.1 s after it went out: each lease is
    # renewed 0.9 s before it would lapse (a loaded machine's loop may lag that much
    # less); paced from their ends, the second renewal came 0.2 s too late.
    async with broadcast.subscribe("c", consumer="w", lease=3.0) as sub:
        for _ in range(100):  # 5 s, several renewals; each get checks the lease
            await broadcast.publish("c", "m")
            await take(sub, 1)
            await asyncio.sleep(0.05)


async def test_lost_leases_leave_the_renewer_idle(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every lease of a duration was lost, the renewer slept 0 s a turn (its
    pace counted from a renewal that no longer came): a core spun until the
    subscription ended."""

    async def down(*args: Any) -> Any:
        raise LogUnavailable("the log is down")

    monkeypatch.setattr(broadcast.log, "renew_leases", down)
    async with broadcast.subscribe("c", consumer="w", lease=0.3):
        await asyncio.sleep(0.5)  # lost by now
        started = time.process_time()
        await asyncio.sleep(1.5)
        assert time.process_time() - started < 0.5


async def test_reset_channel_raises_stream_reset(broadcast: Broadcast) -> None:
    for i in range(3):
        await broadcast.publish("room", str(i))
    async with broadcast.subscribe("room", consumer="w", since=0) as sub:
        await take(sub, 3)
        await sub.commit()
    await broadcast.log.delete_channel("room")
    await broadcast.publish("room", "new room")
    [info] = await broadcast.log.consumers("room")
    assert (info.position, info.lag) == (3, None)  # a position of an earlier epoch
    for _ in range(2):  # the lease is given back after the error
        with pytest.raises(StreamReset):
            async with broadcast.subscribe("room", consumer="w", wait=False):
                pass
    assert await broadcast.log.delete_consumer("room", "w")
    async with broadcast.subscribe("room", consumer="w", since=0) as sub:
        assert (await sub.get()).message == "new room"


async def test_trimmed_position_raises_history_truncated(broadcast: Broadcast) -> None:
    for i in range(10):
        await broadcast.publish("log", str(i))
    async with broadcast.subscribe("log", consumer="w", since=0) as sub:
        await take(sub, 2)
        await sub.commit()
    await broadcast.log.trim("log", before=6)
    with pytest.raises(HistoryTruncated):
        async with broadcast.subscribe("log", consumer="w"):
            pass
    with pytest.raises(HistoryTruncated):
        await broadcast.log.set_consumer("log", "w", 4)
    await broadcast.log.set_consumer("log", "w", 5)
    async with broadcast.subscribe("log", consumer="w") as sub:
        assert (await sub.get()).offset == 6


async def test_consumer_of_a_channel_that_does_not_exist_yet(broadcast: Broadcast) -> None:
    async with broadcast.subscribe("later", consumer="w") as sub:
        await sub.commit()  # nothing delivered, no epoch yet: nothing to store
        assert await positions(broadcast, "later") == {"w": None}  # held, no position
        for i in range(3):
            await broadcast.publish("later", str(i))
        assert [e.offset for e in await take(sub, 3)] == [1, 2, 3]
        await sub.commit()
    for i in range(2):
        await broadcast.publish("later", str(i))
    async with broadcast.subscribe("later", consumer="w") as sub:
        assert [e.offset for e in await take(sub, 2)] == [4, 5]


async def test_auto_commit_stores_only_what_was_handled(broadcast: Broadcast) -> None:
    for i in range(6):
        await broadcast.publish("mail", str(i))
    async with broadcast.subscribe("mail", consumer="w", since=0, auto_commit=0.05) as sub:
        await take(sub, 2)  # asking for 2 means 1 is handled; 2 may still be in work
        await asyncio.sleep(0.3)
        assert await positions(broadcast, "mail") == {"w": 1}
    assert await positions(broadcast, "mail") == {"w": 2}  # a normal end: all of it

    with pytest.raises(RuntimeError):
        async with broadcast.subscribe("mail", consumer="w", auto_commit=60) as sub:
            await take(sub, 3)
            raise RuntimeError("the handler failed")
    assert await positions(broadcast, "mail") == {"w": 2}  # not after an error

    # A disconnect stores what was handled before it.
    async with broadcast.subscribe("mail", consumer="w", auto_commit=60) as sub:
        await take(sub, 3)
        await broadcast.disconnect()
    await broadcast.connect()
    assert await positions(broadcast, "mail") == {"w": 4}


async def test_worker_tasks_end_cleanly_when_their_broadcast_disconnects(
    broadcast: Broadcast,
) -> None:
    """The workers' loops end when the broadcast disconnects; the disconnect stores
    what each handled and gives the leases back. A worker's own exit must neither
    commit on a lease the disconnect just gave back (it raised ConsumerBusy) nor give
    its lease back before the disconnect stored its position (only the first of
    several consumers was stored)."""
    channels = [f"jobs{i}" for i in range(4)]
    for channel in channels:
        for i in range(5):
            await broadcast.publish(channel, str(i))
    held: list[Subscriber] = []

    async def worker(channel: str) -> None:
        async with broadcast.subscribe(channel, consumer="w", since=0, auto_commit=60) as sub:
            held.append(sub)
            async for _ in sub:
                pass

    tasks = [asyncio.create_task(worker(channel)) for channel in channels]
    while len(held) < 4 or any(sub.position < 5 for sub in held):
        await asyncio.sleep(0.01)
    await broadcast.disconnect()
    for task in tasks:
        await asyncio.wait_for(task, 10)  # raises nothing
    with pytest.raises(Unsubscribed, match="gave its lease back"):
        await held[0].commit()
    await broadcast.connect()
    infos = await broadcast.log.consumers()
    assert sorted((c.channel, c.position, c.holder) for c in infos) == [
        (channel, 5, None) for channel in channels
    ]


async def test_a_thousand_consumers_on_a_hundred_channels(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewal does not grow with the consumers held: one statement per period.

    Its cost is measured in bench/consumers.py; here only that every lease outlives
    its duration through renewals, each renewing all 1,000 at once.
    """
    channels = [f"ch{i}" for i in range(100)]
    for channel in channels:
        await broadcast.publish(channel, "first")
    renewals: list[int] = []
    renew = broadcast.log.renew_leases

    async def counting(leases: list[tuple[str, str, str]], lease: float) -> set[str]:
        renewals.append(len(leases))
        return await renew(leases, lease)

    monkeypatch.setattr(broadcast.log, "renew_leases", counting)
    held: list[Subscriber] = []
    done = asyncio.Event()

    async def worker(channel: str, name: str) -> None:
        # Not shorter: 1,000 subscriptions entering at once keep a loaded 2-core
        # machine's event loop busy for seconds, and a lease must outlast that.
        async with broadcast.subscribe(channel, consumer=name, lease=2.0) as sub:
            held.append(sub)
            await done.wait()

    workers = [asyncio.create_task(worker(c, f"c{n}")) for c in channels for n in range(10)]
    while len(held) < 1000:
        await asyncio.sleep(0.05)
    renewals.clear()
    await asyncio.sleep(2.3)  # beyond a lease: only renewals keep them
    infos = await broadcast.log.consumers()
    assert len(infos) == 1000
    assert all(info.holder is not None for info in infos)
    assert 2 <= len(renewals) <= 6 and set(renewals) == {1000}  # every 2/3 s
    for sub in held:
        sub._consumer.check()  # type: ignore[union-attr]  # none lost its lease
    done.set()
    await asyncio.gather(*workers)
    assert await broadcast.log.consumers() == []  # never committed: nothing kept


async def test_a_commit_the_blocks_end_overtakes_raises_unsubscribed(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit still in flight when its block ended found the lease given back and
    said another holder took the consumer over (ConsumerBusy), where the subscription
    had only ended (found by a review; the commit is slowed down by hand)."""
    broadcast = await make_broadcast()
    await broadcast.publish("jobs", "j")
    real = broadcast.log.commit_position

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)  # the release goes first
        return await real(*args, **kwargs)

    async with broadcast.subscribe("jobs", consumer="w", since=0) as sub:
        await sub.get()
        monkeypatch.setattr(broadcast.log, "commit_position", slow)
        committing = asyncio.create_task(sub.commit())
        await asyncio.sleep(0.05)
    with pytest.raises(Unsubscribed, match="has ended"):
        await committing
    assert await broadcast.log.consumers() == []  # given back before any position


async def test_standbys_get_an_error_that_stops_their_asking(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error other than the log's (a bug, a log closed under it) ended the task
    that asks for the standbys' leases, and every standby of that lease length waited
    for ever (found by a review; the error is injected)."""
    broadcast = await make_broadcast()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected")

    async with broadcast.subscribe("jobs", consumer="w", lease=0.6):
        monkeypatch.setattr(broadcast.log, "acquire_leases", broken)
        with pytest.raises(LogError, match="injected"):
            async with asyncio.timeout(10):
                async with broadcast.subscribe("jobs", consumer="w", lease=0.6):
                    pass
        monkeypatch.undo()
    # A later standby of that lease length asks afresh, and gets it once free.
    async with broadcast.subscribe("jobs", consumer="w", lease=0.6) as sub:
        assert sub.position == 0


async def test_a_holder_resumed_after_a_suspension_past_its_lease_stops(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder counted its lease on the loop's monotonic clock, which stands still
    while the host is suspended: resumed after longer than the lease (the log's clock
    went on, a standby may have taken over) it went on handing out events until its
    next renewal (found by a review; the suspension is a clock moved by hand)."""
    from broadcast_history import _clock

    broadcast = await make_broadcast()
    for message in ("a", "b"):
        await broadcast.publish("jobs", message)
    clock = _clock.lease_clock
    async with broadcast.subscribe("jobs", consumer="w", since=0, lease=30.0) as sub:
        assert (await sub.get()).message == "a"
        monkeypatch.setattr(_clock, "lease_clock", lambda: clock() + 31.0)
        with pytest.raises(ConsumerBusy, match="not renewed in time"):
            await sub.get()


async def test_a_suspension_while_a_renewal_is_answered_counts_against_the_lease(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal counts from when it was sent: a host suspended while its answer was
    on the way (the log's clock went on) must not take the answer for a fresh lease
    (found by a review of the change that counted the suspension from the answer)."""
    from broadcast_history import _clock

    broadcast = await make_broadcast()
    for message in ("a", "b"):
        await broadcast.publish("jobs", message)
    clock = _clock.lease_clock
    slept = 0.0
    monkeypatch.setattr(_clock, "lease_clock", lambda: clock() + slept)
    renew = broadcast.log.renew_leases
    renewed = asyncio.Event()

    async def asleep_meanwhile(*args: Any) -> Any:
        nonlocal slept
        kept = await renew(*args)
        slept = 2.0  # the host slept while the answer came back
        renewed.set()
        return kept

    async with broadcast.subscribe("jobs", consumer="w", since=0, lease=1.5) as sub:
        assert (await sub.get()).message == "a"
        monkeypatch.setattr(broadcast.log, "renew_leases", asleep_meanwhile)
        await asyncio.wait_for(renewed.wait(), 5)
        with pytest.raises(ConsumerBusy, match="not renewed in time"):
            await sub.get()


async def test_a_commit_that_never_got_a_slot_says_nothing_was_stored(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that timed out waiting behind lease writes the log did not answer
    said it "may still be stored", though its statement was never sent (found by a
    review; the writes ahead of it are held up by hand)."""
    broadcast = await make_broadcast()
    await broadcast.publish("jobs", "j")
    stuck = asyncio.Event()
    real = broadcast.log.commit_position

    async def held_up(*args: Any, **kwargs: Any) -> Any:
        await stuck.wait()
        return await real(*args, **kwargs)

    async with broadcast.subscribe("jobs", consumer="w", since=0, lease=0.5) as sub:
        await sub.get()
        monkeypatch.setattr(broadcast.log, "commit_position", held_up)
        ahead = [asyncio.create_task(sub.commit()) for _ in range(IN_FLIGHT)]
        await asyncio.sleep(0.05)
        with pytest.raises(LogUnavailable, match=r"queued before a commit.*nothing was stored"):
            await sub.commit()
        for outcome in await asyncio.gather(*ahead, return_exceptions=True):
            assert isinstance(outcome, LogUnavailable)
            assert "may still be stored" in str(outcome)
        stuck.set()


async def test_an_acquire_whose_answer_was_lost_gives_the_lease_back(
    make_broadcast: MakeBroadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An acquisition the log did not answer in time may have taken the lease all the
    same: it stayed with a holder id nobody renewed, and every subscription waited a
    whole lease for it (found by a review; the lost answer is injected)."""
    broadcast = await make_broadcast()
    real = broadcast.log.acquire_lease

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)  # taken, but the answer never came
        raise LogUnavailable("the log did not answer a lease statement within 30 s")

    monkeypatch.setattr(broadcast.log, "acquire_lease", answer_lost)
    with pytest.raises(LogUnavailable):
        async with broadcast.subscribe("jobs", consumer="w", lease=30.0, wait=False):
            pass
    monkeypatch.undo()
    for _ in range(50):
        try:
            async with broadcast.subscribe("jobs", consumer="w", lease=30.0, wait=False):
                break
        except ConsumerBusy:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the lease taken without an answer was kept for its whole 30 s")
