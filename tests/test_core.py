"""Embedded default (memory + SQLite): API surface, validation, lifecycle, durability."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

import broadcast_history
from broadcast_history import (
    Broadcast,
    BroadcastError,
    Event,
    EventLog,
    InvalidArgument,
    InvalidMessage,
    LogUnavailable,
    MessageTooLarge,
    NotConnected,
    SchemaOutOfDate,
    Unsubscribed,
)
from broadcast_history._wire import Objects
from broadcast_history.backends.memory import MemoryBackend
from broadcast_history.log import Pending
from broadcast_history.log import _sqlite as sqlite_store
from tests.conftest import (
    MYSQL_URL,
    POSTGRES_URL,
    REDIS_URL,
    require_mysql,
    require_postgres,
    require_redis,
    reset_mysql_log,
    reset_postgres_log,
    unique,
)
from tests.support.helpers import assert_contiguous, take

ROOT = Path(__file__).resolve().parent.parent


def test_public_names_are_pinned() -> None:
    assert sorted(broadcast_history.__all__) == [
        "Broadcast",
        "BroadcastBackend",
        "BroadcastError",
        "ChannelInfo",
        "ConsumerBusy",
        "ConsumerInfo",
        "Event",
        "EventLog",
        "HistoryTruncated",
        "ImportConflict",
        "InvalidArgument",
        "InvalidMessage",
        "LogError",
        "LogTotals",
        "LogUnavailable",
        "MessageTooLarge",
        "NotConnected",
        "OffsetOutOfRange",
        "PositionError",
        "Retention",
        "SchemaOutOfDate",
        "StreamReset",
        "Subscriber",
        "TransportError",
        "Unsubscribed",
        "__version__",
    ]
    for name in broadcast_history.__all__:
        value = getattr(broadcast_history, name)
        if isinstance(value, type) and issubclass(value, Exception) and name != "BroadcastError":
            assert issubclass(value, BroadcastError), name


def test_broadcaster_compatibility_surface() -> None:
    event = Event(channel="chat", message="hi")
    assert (event.channel, event.message, event.offset, event.timestamp) == ("chat", "hi", 0, None)
    # broadcaster's own test matches this text.
    with pytest.raises(ValueError, match="Unsupported backend"):
        Broadcast("nope://localhost")
    assert Broadcast("memory://").backend.__class__.__name__ == "MemoryBackend"


async def test_broadcaster_style_usage() -> None:
    broadcast = Broadcast("memory://")
    await broadcast.connect()
    await broadcast.connect()  # twice is fine
    async with broadcast.subscribe("chatroom") as subscriber:
        await broadcast.publish(channel="chatroom", message="Hello")
        event = await subscriber.get()
        assert (event.channel, event.message) == ("chatroom", "Hello")
    await broadcast.disconnect()
    await broadcast.disconnect()


@pytest.mark.parametrize("size", [0, -1, 1.5, "10", True])
def test_a_message_size_limit_that_admits_nothing_is_refused(size: object) -> None:
    with pytest.raises(InvalidArgument, match="max_message_size"):
        Broadcast(max_message_size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_batch": 0}, "max_batch"),  # publish() and disconnect() hung
        ({"max_batch": -5}, "max_batch"),
        ({"retention": {"max_events": 1}}, "retention must be a Retention"),  # off silently
        ({"retention": 100}, "retention must be a Retention"),
    ],
)
def test_options_that_could_not_work_are_refused(options: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Broadcast(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("log", ["memory", "file"])
async def test_connects_at_once_open_one_broadcast(log: str, sqlite_file_url: str) -> None:
    """Two connect() calls in flight: on the in-memory log the second failed with a
    bare RuntimeError; on a file both started the background tasks, and one set
    outlived disconnect()."""

    def ours() -> list[str]:
        return sorted(
            name
            for task in asyncio.all_tasks()
            if (name := task.get_name()).startswith("broadcast-history-")
        )

    broadcast = Broadcast(log=None if log == "memory" else sqlite_file_url)
    await asyncio.gather(broadcast.connect(), broadcast.connect(), broadcast.log.connect())
    try:
        tasks = ours()
        assert len(tasks) == len(set(tasks)), tasks
        assert (await broadcast.publish("c", "m")).offset == 1
    finally:
        await broadcast.disconnect()
    await asyncio.sleep(0.05)
    assert ours() == []


async def test_a_connect_waiting_while_another_task_disconnects_opens_after(
    sqlite_file_url: str,
) -> None:
    """A connect() waiting for another task's connect, which then disconnected at once,
    opened while the closing went on: the closing then shut the log and listener it
    had opened, and the broadcast said connected but could not publish."""
    broadcast = Broadcast(log=sqlite_file_url)

    async def in_and_out() -> None:
        async with broadcast:
            pass

    await asyncio.gather(in_and_out(), broadcast.connect())
    try:
        assert broadcast.connected
        assert (await broadcast.publish("c", "m")).offset == 1
    finally:
        await broadcast.disconnect()


async def test_a_disconnect_between_two_waiting_connects_leaves_the_log_usable(
    sqlite_file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disconnect() arriving as the first of two waiting connects finished cleared
    the log's id at once, then waited: the second connect reopened the open store
    and the disconnect closed it, leaving a log that said connected but was not."""
    log = EventLog(sqlite_file_url)
    await log.connect()
    opened = EventLog._open
    later: list[asyncio.Task[None]] = []

    async def open_then_disconnect(self: EventLog) -> None:
        await opened(self)
        if not later:  # runs right after this connect lets go of the lock
            later.append(asyncio.create_task(self.disconnect()))

    monkeypatch.setattr(EventLog, "_open", open_then_disconnect)
    await asyncio.gather(log.disconnect(), log.connect(), log.connect())
    await asyncio.gather(*later)
    await log.connect()
    try:
        (event,) = await log.append([Pending("c", "m", None)])
        assert event.offset == 1
    finally:
        await log.disconnect()


async def test_awaiting_it_from_another_event_loop_is_refused() -> None:
    """A publish awaited from another thread's loop was stored and never returned."""
    async with Broadcast() as broadcast:

        async def elsewhere() -> None:
            with pytest.raises(NotConnected, match="another event loop"):
                await broadcast.publish("c", "m")
            with pytest.raises(NotConnected, match="another event loop"):
                async with broadcast.subscribe("c"):
                    pass

        await asyncio.wait_for(asyncio.to_thread(asyncio.run, elsewhere()), 10)
        assert await broadcast.log.channel("c") is None


@pytest.mark.parametrize("where", ["memory+sqlite", "redis+postgres", "postgres+mysql"])
# The connections the ended loop held are abandoned, as the test means: SQLAlchemy
# says so when they are collected.
@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
def test_a_loop_that_ended_without_disconnect_is_let_go(where: str, tmp_path: Path) -> None:
    """A test suite's loop per test: a broadcast connected in one that ended without
    disconnect() raised a bare RuntimeError from disconnect() ("Event loop is
    closed"), and connect() in the next loop did nothing, every publish then refused
    as "connected in another event loop" with no way to reconnect."""
    if where == "memory+sqlite":
        url, log_url = "memory://", f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    elif where == "redis+postgres":
        require_redis()
        require_postgres()
        url, log_url = REDIS_URL, POSTGRES_URL
        asyncio.run(reset_postgres_log())
    else:
        require_postgres()
        require_mysql()
        url, log_url = POSTGRES_URL.replace("+asyncpg", ""), MYSQL_URL
        asyncio.run(reset_mysql_log())
    channel = unique()
    broadcast = Broadcast(url, log=log_url)
    handled: list[int] = []
    left: list[asyncio.Task[None]] = []

    async def left_connected() -> None:
        before = len(handled)
        await broadcast.connect()
        await broadcast.publish(channel, "m")

        async def consume() -> None:
            async with broadcast.subscribe(channel, consumer="c", since=0) as sub:
                async for event in sub:
                    await sub.commit()
                    handled.append(event.offset)

        left.append(asyncio.create_task(consume()))  # still subscribed when the loop ends
        while len(handled) == before:
            await asyncio.sleep(0.01)

    async def used_again(offset: int, *, disconnect_first: bool) -> None:
        with pytest.raises(NotConnected, match=r"loop .* has ended: call connect"):
            await broadcast.publish(channel, "refused")
        if disconnect_first:
            await broadcast.disconnect()
            assert not broadcast.connected
        await broadcast.connect()
        try:
            # Live delivery works in this loop: the transport was made anew.
            async with broadcast.subscribe(channel) as live:
                event = await broadcast.publish(channel, "m")
                assert event.offset == offset
                assert [e.offset for e in await take(live, 1)] == [offset]
            # The position committed in the ended loop is there; its lease, this
            # broadcast's own, is taken at once.
            async with broadcast.subscribe(channel, consumer="c", wait=False) as sub:
                assert [e.offset for e in await take(sub, 1)] == [offset]
                await sub.commit()
        finally:
            await broadcast.disconnect()

    asyncio.run(left_connected())
    asyncio.run(used_again(2, disconnect_first=True))
    # Left connected again, then connect() with no disconnect() first.
    asyncio.run(left_connected())
    asyncio.run(used_again(4, disconnect_first=False))
    assert handled == [1, 3]


async def test_a_batch_outlasts_writers_racing_on_its_keys(
    sqlite_file_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes publishing the same keys: each conflict is one key another writer
    stored between this one's read and insert. Three attempts were soon used up, and
    the whole batch, publishes without a key too, failed as LogUnavailable."""
    from broadcast_history.log._calls import Conflict

    log = EventLog(sqlite_file_url)
    await log.connect()
    try:
        store = log._store
        append, lost = store.append, 0

        async def raced(items: Sequence[Pending]) -> list[Event]:
            nonlocal lost
            if lost < 5:  # another writer won one more of the keys this time
                lost += 1
                raise Conflict("duplicate key")
            return await append(items)

        monkeypatch.setattr(store, "append", raced)
        items = [Pending("c", f"m{i}", f"k{i}") for i in range(6)] + [Pending("c", "m", None)]
        events = await log.append(items)
        assert [e.offset for e in events] == list(range(1, 8)) and lost == 5
    finally:
        await log.disconnect()


def test_a_subscriber_of_a_loop_that_ended_is_ended(tmp_path: Path) -> None:
    """Left behind by a loop that ended without disconnect(), a subscriber went on
    reading the log, uncounted, in the next loop."""
    broadcast = Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    kept: list[Any] = []

    async def subscribe() -> None:
        await broadcast.connect()
        await broadcast.publish("c", "m")
        subscription = broadcast.subscribe("c", since=0)
        kept.extend([subscription, await subscription.__aenter__()])  # never left
        await kept[1].get()

    async def publish() -> None:
        await broadcast.connect()
        try:
            await broadcast.publish("c", "m")
            with pytest.raises(Unsubscribed):
                await asyncio.wait_for(kept[1].get(), 5)
        finally:
            await broadcast.disconnect()

    loop = asyncio.new_event_loop()  # closed as is: no clean-up of its generators
    loop.run_until_complete(subscribe())
    loop.close()
    asyncio.run(publish())


def test_replays_in_a_second_event_loop(tmp_path: Path) -> None:
    """The head lookups' semaphore stayed bound to the loop of the first connect():
    subscribers replaying at once in the next loop failed with RuntimeError."""
    broadcast = Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", page_size=10)
    channels = [f"c{i}" for i in range(8)]

    async def replay_at_once() -> None:
        async with broadcast:
            for channel in channels:
                await asyncio.gather(*(broadcast.publish(channel, "m") for _ in range(25)))

            async def replay(channel: str) -> None:
                async with broadcast.subscribe(channel, since=0) as sub:
                    await take(sub, 25)

            await asyncio.gather(*(replay(channel) for channel in channels))

    asyncio.run(replay_at_once())
    asyncio.run(replay_at_once())


async def test_validation_rejects_and_writes_nothing() -> None:
    async with Broadcast(max_message_size=10) as bc:
        for channel in ("", "x" * 256, "bad\nname", "tab\there", "\x7f", 5):
            with pytest.raises(InvalidArgument):
                await bc.publish(channel, "m")  # type: ignore[arg-type]
        with pytest.raises(InvalidMessage):
            await bc.publish("c", {"not": "text"})
        with pytest.raises(TypeError):
            await bc.publish("c", 42)
        with pytest.raises(MessageTooLarge):
            await bc.publish("c", "x" * 11)
        with pytest.raises(MessageTooLarge):
            await bc.publish("c", "é" * 6)  # 12 bytes in UTF-8
        with pytest.raises(MessageTooLarge):
            await bc.publish("c", b"x" * 11)
        with pytest.raises(InvalidArgument):
            await bc.publish("c", "m", key="")
        with pytest.raises(InvalidArgument):
            async with bc.subscribe("bad\x00"):
                pass
        assert await bc.log.channel("c") is None
        assert (await bc.publish("c", "x" * 10)).offset == 1
        assert (await bc.publish("c", bytearray(b"ab"))).message == b"ab"
        ok = "x" * 255
        assert (await bc.publish(ok, "✓")).offset == 1
        assert (await bc.publish("spaces / and ünïcode", "m")).offset == 1


async def test_not_connected_errors() -> None:
    bc = Broadcast()
    with pytest.raises(NotConnected):
        await bc.publish("c", "m")
    with pytest.raises(NotConnected):
        async with bc.subscribe("c"):
            pass


async def test_disconnect_ends_subscribers_and_flushes_publishes() -> None:
    bc = Broadcast()
    await bc.connect()
    async with bc.subscribe("c") as sub:
        pending = [asyncio.ensure_future(bc.publish("c", str(i))) for i in range(20)]
        await asyncio.sleep(0)
        await bc.disconnect()
        assert all(p.done() for p in pending)
        assert [p.result().offset for p in pending] == list(range(1, 21))
        with pytest.raises(Unsubscribed):
            await asyncio.wait_for(sub.get(), 2)
        assert [e async for e in sub] == []


async def test_nothing_is_sent_on_the_memory_transport() -> None:
    """Its one reader is the broadcast itself, whose subscribers get events at commit."""
    async with Broadcast() as bc:
        backend = bc.backend
        sent: list[tuple[str, Any]] = []

        async def recording(messages: Sequence[tuple[str, Any]]) -> None:
            sent.extend(messages)

        backend.publish_many = recording  # type: ignore[method-assign]
        async with bc.subscribe("c") as sub, bc.subscribe("d") as other:
            fed: list[int] = []  # offsets handed to the subscriber, from anywhere
            feed = sub._feed

            def counting(events: Sequence[Event], size: int | None = None) -> None:
                fed.extend(event.offset for event in events)
                feed(events, size)

            sub._feed = counting  # type: ignore[method-assign]
            published = await asyncio.gather(*(bc.publish("c", f"m{i}") for i in range(3)))
            published.append(await bc.publish("c", "alone"))
            elsewhere = await bc.publish("d", "other channel")
            assert await take(sub, 4) == published
            assert await take(other, 1) == [elsewhere]
            assert fed == [1, 2, 3, 4]
        assert sent == []
        assert bc.stats.live_send_failures == 0


async def test_a_shared_or_subclassed_memory_transport_is_sent_on(sqlite_file_url: str) -> None:
    """Private only while one broadcast reads it: once a second broadcast connects the
    same instance, events are sent on it again; a subclass may carry them elsewhere."""

    class Elsewhere(MemoryBackend):
        pass

    class Own(Elsewhere):
        private = True

    assert MemoryBackend().private and not Elsewhere().private and Own().private
    shared = MemoryBackend()
    sent: list[str] = []
    publish_many = shared.publish_many

    async def recording(messages: Sequence[tuple[str, Any]]) -> None:
        sent.extend(channel for channel, _ in messages)
        await publish_many(messages)

    shared.publish_many = recording  # type: ignore[method-assign]
    async with Broadcast(backend=shared, log=sqlite_file_url) as first:
        await first.publish("c", "alone")
        assert shared.private
        async with Broadcast(backend=shared, log=sqlite_file_url) as second:
            assert not shared.private
            async with second.subscribe("c", since=0) as sub:
                await first.publish("c", "shared")
                assert [e.message for e in await take(sub, 2)] == ["alone", "shared"]
    assert sent == ["c"]  # the second publish only


async def test_foreign_objects_on_the_memory_transport_are_ignored() -> None:
    async with Broadcast() as bc:
        queue = bc.backend._queue  # type: ignore[attr-defined]
        async with bc.subscribe("c") as sub:
            stray = Event("c", "m", offset=1, epoch=1)
            queue.put_nowait(Event("c", (stray,)))  # a tuple no broadcast sent
            queue.put_nowait(Event("c", Objects("another-log", "s", (stray,))))
            published = await bc.publish("c", "ours")
            assert await take(sub, 1) == [published]
            async with asyncio.timeout(10):
                while not queue.empty():
                    await asyncio.sleep(0.001)
            assert bc.foreign_messages == {"not_envelope": 1, "other_log": 1}
            assert bc.transport_connected


async def test_restart_on_file_log_continues(sqlite_file_url: str) -> None:
    async with Broadcast(log=sqlite_file_url) as bc:
        first = [await bc.publish("c", str(i)) for i in range(3)]
    async with Broadcast(log=sqlite_file_url) as bc:
        again = await bc.publish("c", "3")
        assert (again.offset, again.epoch) == (4, first[0].epoch)
        assert again.timestamp is not None and first[-1].timestamp is not None
        assert again.timestamp >= first[-1].timestamp
        async with bc.subscribe("c", since=0) as sub:
            assert [e.message for e in await take(sub, 4)] == ["0", "1", "2", "3"]


async def test_new_sqlite_file_takes_small_pages_and_old_files_keep_theirs(
    tmp_path: Path,
) -> None:
    """A new file gets 2 KiB pages (cheaper commits over many channels); a file made
    with SQLite's 4 KiB default keeps them and works as before."""
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as raw:
        raw.execute("CREATE TABLE unrelated (x INTEGER)")
    for path, size in ((tmp_path / "new.db", 2048), (old, 4096)):
        async with Broadcast(log=f"sqlite+aiosqlite:///{path}") as bc:
            await bc.publish("c", "one")
        async with Broadcast(log=f"sqlite+aiosqlite:///{path}") as bc:
            await bc.publish("c", "two")
            assert [e.message for e in await bc.log.read("c")] == ["one", "two"]
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA page_size").fetchone() == (size,)
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_keys_of_a_large_batch_find_their_events(sqlite_file_url: str) -> None:
    # 700 keys of one channel in one batch: the writer looks them up in chunks.
    async with Broadcast(log=sqlite_file_url) as bc:
        keys = [f"k{i}" for i in range(700)]
        first = await asyncio.gather(*(bc.publish("c", k, key=k) for k in keys))
        again = await asyncio.gather(*(bc.publish("c", "other", key=k) for k in keys))
        assert again == first
        assert sorted(e.offset for e in first) == list(range(1, 701))
        assert (await bc.log.channel("c")).last_offset == 700  # type: ignore[union-attr]


def _commit_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads the SQLite store commits its batches on, as they happen."""
    threads: list[str] = []
    commit = sqlite_store.commit

    def spy(conn: sqlite3.Connection, items: Any, *rest: Any) -> Any:
        threads.append(threading.current_thread().name)
        return commit(conn, items, *rest)

    monkeypatch.setattr(sqlite_store, "commit", spy)
    return threads


async def test_lone_and_moderate_batches_commit_on_the_loop_and_large_ones_on_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = _commit_threads(monkeypatch)
    loop_thread = threading.current_thread().name
    # A loaded machine makes an inline commit slow, which sends the next batches to the
    # writer thread for a while (by design): not what this test is about.
    monkeypatch.setattr(sqlite_store, "INLINE_SLOW_SECONDS", 60.0)
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    async with Broadcast(log=url) as bc:
        # The first commit may start a new WAL, which syncs: on the writer thread.
        assert (await bc.publish("c", "first")).offset == 1
        assert (await bc.publish("c", "lone")).offset == 2
        assert threads[0].startswith("broadcast-history-write")
        assert threads[1:] == [loop_thread]
        threads.clear()
        # 64 publishers at once: one batch, on the loop too.
        events = await asyncio.gather(*(bc.publish("c", str(i)) for i in range(64)))
        assert sorted(e.offset for e in events) == list(range(3, 67))
        assert threads == [loop_thread]
        threads.clear()
        # Past INLINE_MAX_EVENTS the commit would stall the loop: the writer thread.
        crowd = sqlite_store.INLINE_MAX_EVENTS + 1
        events = await asyncio.gather(*(bc.publish("c", str(i)) for i in range(crowd)))
        assert sorted(e.offset for e in events) == list(range(67, 67 + crowd))
        assert threads and all(name.startswith("broadcast-history-write") for name in threads)
    threads.clear()
    # A commit that syncs the disk never runs on the event loop.
    async with Broadcast(log=EventLog(url, sqlite_synchronous="FULL")) as bc:
        for offset in (67 + crowd, 68 + crowd):
            assert (await bc.publish("c", "synced")).offset == offset
        assert len(threads) == 2 and all(t.startswith("broadcast-history-write") for t in threads)


async def test_while_events_are_read_only_small_batches_commit_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reader threads turning pages into events hold the GIL the loop's commit would
    # keep waiting for: a batch of 64 then goes to the writer thread.
    threads = _commit_threads(monkeypatch)
    # Reads alone decide here: on a loaded machine the small commit below, made while
    # the held read lets go, could take over 5 ms and turn on the slow-commit limit
    # (the next test's) for the last batch.
    monkeypatch.setattr(sqlite_store, "INLINE_SLOW_SECONDS", 60.0)
    loop_thread = threading.current_thread().name
    reading, release = threading.Event(), threading.Event()
    to_events = sqlite_store.rows_to_events

    def held(channel: str, rows: Any) -> Any:
        reading.set()
        release.wait(10)
        return to_events(channel, rows)

    monkeypatch.setattr(sqlite_store, "rows_to_events", held)
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}") as bc:
        await bc.publish("c", "first")
        read = asyncio.ensure_future(bc.log.read("c"))
        try:
            assert await asyncio.to_thread(reading.wait, 10)
            threads.clear()
            await asyncio.gather(*(bc.publish("c", str(i)) for i in range(64)))
            assert threads and all(t.startswith("broadcast-history-write") for t in threads)
            threads.clear()
            await bc.publish("c", "small")
            assert threads == [loop_thread]
        finally:
            release.set()
        assert [e.message for e in await read] == ["first"]
        threads.clear()
        await asyncio.gather(*(bc.publish("c", str(i)) for i in range(64)))
        assert threads == [loop_thread]


async def test_after_a_slow_commit_on_the_loop_only_small_batches_commit_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit on the loop that took long (another thread held the GIL, say) sends
    # all but small batches to the writer thread for INLINE_BUSY_SECONDS.
    threads = _commit_threads(monkeypatch)
    loop_thread = threading.current_thread().name
    spy = sqlite_store.commit
    slow = [True]

    def commit(conn: sqlite3.Connection, items: Any, *rest: Any) -> Any:
        if slow[0] and threading.current_thread().name == loop_thread:
            slow[0] = False
            time.sleep(2 * sqlite_store.INLINE_SLOW_SECONDS)
        return spy(conn, items, *rest)

    monkeypatch.setattr(sqlite_store, "commit", commit)
    monkeypatch.setattr(sqlite_store, "INLINE_BUSY_SECONDS", 0.3)
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}") as bc:
        await bc.publish("c", "first")  # the writer thread (starts the WAL)
        await bc.publish("c", "slow")
        assert threads[-1] == loop_thread and not slow[0]
        threads.clear()
        await asyncio.gather(*(bc.publish("c", str(i)) for i in range(64)))
        assert threads and all(t.startswith("broadcast-history-write") for t in threads)
        await asyncio.sleep(0.4)
        threads.clear()
        await asyncio.gather(*(bc.publish("c", str(i)) for i in range(64)))
        assert threads == [loop_thread]


async def test_a_publish_waits_for_another_writer_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = _commit_threads(monkeypatch)
    path = tmp_path / "events.db"
    async with Broadcast(log=f"sqlite+aiosqlite:///{path}") as bc:
        await bc.publish("c", "first")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        try:
            publishing = asyncio.ensure_future(bc.publish("c", "second"))
            began = asyncio.get_running_loop().time()
            for _ in range(20):
                await asyncio.sleep(0.01)
            # The loop ran on (not stuck in SQLite's busy wait) and the publish waits.
            assert asyncio.get_running_loop().time() - began < 1.0
            assert not publishing.done()
        finally:
            other.execute("ROLLBACK")
            other.close()
        event = await asyncio.wait_for(publishing, 10)
        assert (event.offset, event.message) == (2, "second")
        # Tried on the loop, found the lock taken, committed on the writer thread.
        assert threads[-1].startswith("broadcast-history-write")
        assert [e.message for e in await bc.log.read("c")] == ["first", "second"]


async def test_lone_publishes_keep_the_wal_bounded_and_its_syncs_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither connection checkpoints on its own: the store does, on the writer thread,
    every WAL_CHECKPOINT_PAGES (estimated); the WAL then starts over from its beginning
    instead of growing, and the commit that starts it over (which syncs the WAL's
    header) runs on the writer thread too."""
    monkeypatch.setattr(sqlite_store, "WAL_CHECKPOINT_PAGES", 200)
    threads = _commit_threads(monkeypatch)
    writer = "broadcast-history-write"
    path = tmp_path / "events.db"
    async with Broadcast(log=f"sqlite+aiosqlite:///{path}") as bc:
        for i in range(3000):
            await bc.publish(f"c{i % 10}", "x" * 79)
        wal_bytes = Path(f"{path}-wal").stat().st_size
        assert (await bc.log.channel("c9")).last_offset == 300  # type: ignore[union-attr]
    # ~50 lone commits write 200 pages of 2 KiB (0.4 MB); a WAL that never started
    # over would hold all 3,000 (~21 MB).
    assert wal_bytes < 2 * 1024 * 1024
    on_writer = [i for i, name in enumerate(threads) if name.startswith(writer)]
    # The first commit, then per copy (every ~50 commits, or up to twice that when
    # its thread waits for the GIL) one that finishes it and one that starts the
    # WAL over; the rest on the loop.
    assert on_writer[0] == 0 and 40 <= len(on_writer) <= 140
    copies = [i for i in on_writer[1:] if not threads[i - 1].startswith(writer)]
    assert len(copies) >= 20


def _wal_commits(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[tuple[str, bool, int]]:
    """Each commit of the SQLite store at ``path`` as it happens: its thread, whether
    it started the WAL over, and the WAL file's size after it."""
    commits: list[tuple[str, bool, int]] = []
    commit = sqlite_store.commit
    wal = Path(f"{path}-wal")

    def header() -> bytes:
        # Checkpoint sequence number and first salt: both change when the WAL restarts.
        with wal.open("rb") as file:
            return file.read(20)[12:20]

    def spy(conn: sqlite3.Connection, items: Any, *rest: Any) -> Any:
        before = header()
        stored = commit(conn, items, *rest)
        name = threading.current_thread().name
        commits.append((name, header() != before, wal.stat().st_size))
        return stored

    monkeypatch.setattr(sqlite_store, "commit", spy)
    return commits


async def test_commits_go_on_while_the_wal_is_copied_and_the_wal_still_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy of the WAL into the database file runs beside commits on the loop;
    as some landed during it, the next batch finishes the copy on the writer thread,
    and the commit after that starts the WAL over, there too: never on the loop."""
    monkeypatch.setattr(sqlite_store, "WAL_CHECKPOINT_PAGES", 200)
    path = tmp_path / "events.db"
    writer, loop_thread = "broadcast-history-write", threading.current_thread().name
    commits = _wal_commits(monkeypatch, path)
    async with Broadcast(log=f"sqlite+aiosqlite:///{path}") as bc:
        store = bc.log._store
        assert isinstance(store, sqlite_store.SqliteStore)
        await bc.publish("c", "first")  # starts the WAL: on the writer thread
        # Hold the writer thread, so the copy waits to begin.
        release = threading.Event()
        assert store._write_thread is not None
        holding = asyncio.wrap_future(store._write_thread.submit(release.wait, 10))
        published = 1
        while store._copying is None:
            await bc.publish("c", "x" * 79)
            published += 1
            assert published < 500
        copying = store._copying
        before = len(commits)
        for _ in range(20):  # the writer thread is held: these commit on the loop
            await asyncio.wait_for(bc.publish("c", "x" * 79), 5)
        assert [name for name, _, _ in commits[before:]] == [loop_thread] * 20
        release.set()
        await holding
        await asyncio.wrap_future(copying)
        before = len(commits)
        for _ in range(3):
            await bc.publish("c", "x" * 79)
        # Finishing the copy, then starting the WAL over: both on the writer thread.
        assert [
            (name.startswith(writer), restarted) for name, restarted, _ in commits[before:]
        ] == [
            (True, False),
            (True, True),
            (False, False),
        ]
        wal_bytes = Path(f"{path}-wal").stat().st_size
        for _ in range(30):  # ~100 pages, written from the WAL's beginning again
            await bc.publish("c", "x" * 79)
        assert Path(f"{path}-wal").stat().st_size == wal_bytes
        assert (await bc.log.channel("c")).last_offset == published + 53  # type: ignore[union-attr]
    restarts = [name for name, restarted, _ in commits if restarted]
    assert restarts and all(name.startswith(writer) for name in restarts)


@pytest.mark.parametrize("big_write", ["import", "delete"])
async def test_the_wal_shrinks_back_after_a_big_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big_write: str
) -> None:
    """An import or a delete of many events writes a WAL as large as itself, and
    starting over reuses the file from its beginning without shrinking it: after a
    1M-event import the WAL kept its 262 MB until the app stopped."""
    from broadcast_history.admin import HistoryAdmin
    from broadcast_history.log import _engine

    monkeypatch.setattr(_engine, "WAL_SIZE_LIMIT", 512 * 1024)
    monkeypatch.setattr(sqlite_store, "WAL_CHECKPOINT_PAGES", 200)
    path = tmp_path / "events.db"
    async with Broadcast(log=f"sqlite+aiosqlite:///{path}") as bc:
        admin = HistoryAdmin.of(bc)
        if big_write == "import":
            header = {"type": "channel", "name": "big", "epoch": 7, "first_offset": 1}
            lines = [json.dumps({**header, "last_offset": 3000})]
            for offset in range(1, 3001):
                event = {"type": "event", "channel": "big", "offset": offset, "epoch": 7}
                event.update(timestamp="2024-01-01T00:00:00+00:00", key=None)
                lines.append(json.dumps({**event, "encoding": "text", "message": "x" * 1000}))
            lines.append(json.dumps({"type": "end", "format": 2, "channels": 1, "events": 3000}))
            await admin.import_jsonl(lines)
        else:
            await asyncio.gather(*(bc.publish("big", "x" * 1000) for _ in range(3000)))
            await admin.delete("big")
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size > 3 * 1024 * 1024
        for i in range(600):  # copied, then written again from the WAL's beginning
            await bc.publish("after", "x" * 79)
        # Cut back to the limit when it started over; past it again by at most what
        # was committed since (a checkpoint's 200 pages, and under load the commits
        # that come bigger before one runs: 589 KiB seen in a full run).
        assert wal.stat().st_size <= 1024 * 1024


async def test_the_wal_starts_over_only_on_the_writer_thread_under_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small copies under 64 publishers: the commits that start the WAL over
    (they sync) all run on the writer thread, and the WAL stays small."""
    monkeypatch.setattr(sqlite_store, "WAL_CHECKPOINT_PAGES", 60)
    path = tmp_path / "events.db"
    commits = _wal_commits(monkeypatch, path)
    async with Broadcast(log=f"sqlite+aiosqlite:///{path}") as bc:
        await bc.publish("c0", "first")

        async def publisher(p: int) -> None:
            for k in range(50):
                await bc.publish(f"c{(p + k) % 20}", "x" * 79)

        await asyncio.gather(*(publisher(p) for p in range(64)))
        assert sum(info.last_offset for info in await bc.log.channels()) == 1 + 64 * 50
    restarts = [name for name, restarted, _ in commits if restarted]
    assert len(restarts) >= 5
    assert all(name.startswith("broadcast-history-write") for name in restarts), restarts
    # 60 pages of 2 KiB, and what commits add while one is copied; 3,200 events
    # of a WAL that never started over would take ~8 MB.
    assert max(size for _, _, size in commits) < 2 * 1024 * 1024


def _inline_driver(log: EventLog) -> sqlite3.Connection:
    """The sqlite3 connection ``log``'s store commits on the event loop with."""
    store = log._store
    assert isinstance(store, sqlite_store.SqliteStore) and store._inline is not None
    driver = store._inline.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


def _counter_reads(log: EventLog) -> list[str]:
    """The counter queries the store's commits on the loop run, as they run."""
    driver = _inline_driver(log)
    reads: list[str] = []
    prefix = sqlite_store._COUNTERS.split(" IN ", 1)[0]
    driver.set_trace_callback(lambda sql: reads.append(sql) if sql.startswith(prefix) else None)
    return reads


async def test_counters_are_read_again_only_after_another_connection_wrote(
    sqlite_file_url: str,
) -> None:
    """A commit reuses the counters the last one on its connection left, unless the
    file changed since (PRAGMA data_version): another log's publishes, a channel
    deleted through the admin's connections. Offsets stay gap-free and epochs right."""
    log, other = EventLog(sqlite_file_url), EventLog(sqlite_file_url)
    await log.connect()
    await other.connect()
    try:
        reads = _counter_reads(log)

        async def one(message: str) -> Event:
            (event,) = await log.append([Pending("c", message, None)])
            return event

        # The first commit runs on the writer thread, the next ones on the loop.
        assert [(await one(f"m{i}")).offset for i in range(3)] == [1, 2, 3]
        known = len(reads)
        assert [(await one(f"n{i}")).offset for i in range(5)] == [4, 5, 6, 7, 8]
        assert len(reads) == known  # kept
        (theirs,) = await other.append([Pending("c", "theirs", None)])
        assert theirs.offset == 9
        mine = await one("mine")
        assert mine.offset == 10 and len(reads) > known
        known = len(reads)
        assert await other.delete_channel("c")
        fresh = await one("fresh")
        assert fresh.offset == 1 and fresh.epoch != mine.epoch and len(reads) > known
        known = len(reads)
        assert (await one("kept")).offset == 2 and len(reads) == known
        await log.delete_channel("c")  # through the store's async engine: another connection
        again = await one("again")
        assert again.offset == 1 and again.epoch != fresh.epoch and len(reads) > known
    finally:
        await other.disconnect()
        await log.disconnect()


async def test_a_failed_commit_does_not_keep_the_counters_it_advanced(
    sqlite_file_url: str,
) -> None:
    """A batch that fails after counting its offsets leaves the kept counters unused:
    the next commit reads them again and takes the next offset."""
    log = EventLog(sqlite_file_url)
    await log.connect()
    try:
        await log.append([Pending("c", "zero", None)])  # on the writer thread
        (first,) = await log.append([Pending("c", "one", None)])  # on the loop: kept
        reads = _counter_reads(log)
        driver = _inline_driver(log)
        # A trigger of this connection's own: no other connection writes to the file,
        # so only the failure itself can tell the kept counters are stale.
        driver.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.broadcast_events "
            "WHEN NEW.payload = CAST('bad' AS BLOB) BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        with pytest.raises(BroadcastError):
            await log.append([Pending("c", "two", None), Pending("c", "bad", None)])
        driver.execute("DROP TRIGGER temp.refuse")
        (second,) = await log.append([Pending("c", "three", None)])
        assert second.offset == first.offset + 1
        assert reads  # read again
        info = await log.channel("c")
        assert info is not None and info.last_offset == 3
    finally:
        await log.disconnect()


async def test_migrate_false_refuses_missing_schema(sqlite_file_url: str) -> None:
    with pytest.raises(SchemaOutOfDate, match="db upgrade"):
        async with Broadcast(log=sqlite_file_url, migrate=False):
            pass
    # Refused before opening: no empty file is left behind.
    assert not Path(make_url(sqlite_file_url).database or "").exists()
    async with Broadcast(log=sqlite_file_url):
        pass
    async with Broadcast(log=sqlite_file_url, migrate=False) as bc:
        assert (await bc.publish("c", "m")).offset == 1


def test_migrate_goes_with_the_log_it_applies_to(sqlite_file_url: str) -> None:
    """An EventLog given to Broadcast keeps its own migrate: a different one given to
    Broadcast was ignored silently (an empty file got a schema despite False)."""
    with pytest.raises(InvalidArgument, match=r"EventLog\(url, migrate=False\)"):
        Broadcast(log=EventLog(sqlite_file_url), migrate=False)
    with pytest.raises(InvalidArgument, match="migrate="):
        Broadcast(log=EventLog(sqlite_file_url, migrate=False), migrate="create")
    assert Broadcast(log=EventLog(sqlite_file_url, migrate=False)).log.migrate is False
    assert Broadcast(log=EventLog(sqlite_file_url, migrate=False), migrate=False)
    # An explicit True looked like the default and was ignored.
    with pytest.raises(InvalidArgument, match=r"EventLog\(url, migrate=True\)"):
        Broadcast(log=EventLog(sqlite_file_url, migrate=False), migrate=True)
    assert Broadcast(log=EventLog(sqlite_file_url), migrate=True).log.migrate is True
    assert Broadcast(log=sqlite_file_url).log.migrate is True


async def test_unreachable_log_is_typed() -> None:
    with pytest.raises(LogUnavailable):
        async with Broadcast(log="postgresql+asyncpg://nobody@127.0.0.1:1/none"):
            pass
    with pytest.raises(InvalidArgument, match="Unsupported log"):
        Broadcast(log="oracle://localhost/db")


async def test_sqlite_file_that_cannot_be_opened_is_typed(tmp_path: Path) -> None:
    # The directory does not exist: sqlite3 itself refuses, before SQLAlchemy.
    url = f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'events.db'}"
    with pytest.raises(LogUnavailable, match="cannot open the event log at ") as failed:
        async with Broadcast(log=url):
            pass
    assert str(tmp_path / "missing" / "events.db") in str(failed.value)  # which file


def test_an_error_without_a_message_is_still_named() -> None:
    """A connect timing out on a frozen server said "cannot open the event log: "."""
    from sqlalchemy.engine import make_url

    from broadcast_history.log._engine import cannot_open

    error = cannot_open(make_url("postgresql+asyncpg://db/app"), TimeoutError())
    assert str(error) == "cannot open the event log: TimeoutError"


async def test_failed_append_raises_and_sends_nothing(sqlite_file_url: str) -> None:
    async with Broadcast(log=sqlite_file_url, idle_check=0.05) as bc:
        async with bc.subscribe("c") as sub:
            await bc.publish("c", "ok")
            assert (await take(sub, 1))[0].message == "ok"
            path = sqlite_file_url.split("///", 1)[1]
            with sqlite3.connect(path) as raw:
                raw.execute("ALTER TABLE broadcast_events RENAME TO moved_away")
            with pytest.raises(LogUnavailable):
                await bc.publish("c", "lost?")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sub.get(), 0.3)


@pytest.mark.parametrize("kind", ["log:sqlite-file", "log:postgres", "log:mysql"])
async def test_migrations_match_metadata(kind: str, sqlite_file_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from broadcast_history.log import VERSION_TABLE, metadata, migration_engine

    url = sqlite_file_url
    if kind == "log:postgres":
        require_postgres()
        url = POSTGRES_URL
    if kind == "log:mysql":
        require_mysql()
        url = MYSQL_URL
    log = EventLog(url)
    await log.connect()  # migrates
    await log.disconnect()
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:

            def diff(sync_conn: object) -> list[object]:
                context = MigrationContext.configure(
                    sync_conn,  # type: ignore[arg-type]
                    opts={"version_table": VERSION_TABLE, "compare_type": True},
                )
                return list(compare_metadata(context, metadata))

            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()


_PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from broadcast_history import Broadcast

    async def main(url, name):
        async with Broadcast(log=url) as bc:
            await asyncio.gather(*(bc.publish("shared", f"{name}-{i}") for i in range(200)))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_processes_share_a_sqlite_file_log(sqlite_file_url: str) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _PUBLISHER, sqlite_file_url, f"p{n}"])
        for n in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]

    async def check() -> None:
        async with Broadcast(log=sqlite_file_url) as bc:
            events = await bc.log.read("shared", after=0, limit=10_000)
            assert_contiguous(events, 1, 800)
            assert len({e.message for e in events}) == 800
            stamps = [e.timestamp for e in events]
            assert stamps == sorted(stamps)  # type: ignore[type-var]

    asyncio.run(check())


def _open_and_close(path: str, barrier: Any, failures: Any, asynchronous: bool) -> None:
    from sqlalchemy import text

    from broadcast_history.log._engine import create_engine, create_sync_engine, normalize_url

    url = normalize_url(f"sqlite:///{path}")
    barrier.wait()
    try:
        if asynchronous:

            async def touch() -> None:
                engine = create_engine(url)
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                await engine.dispose()

            asyncio.run(touch())
        else:
            engine = create_sync_engine(url)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
    except Exception as exc:
        failures.put(repr(exc))


def test_processes_opening_and_closing_one_sqlite_file_together(tmp_path: Path) -> None:
    """SQLite refuses a new connection's first statement, busy handler or not, while
    another process creates the file or closes the last connection to it: the
    engines retry it. Before, about one round in ten failed here (30 rounds: 96 %)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    for round_ in range(30):
        path = tmp_path / f"r{round_}.db"
        barrier = context.Barrier(4)
        procs = [
            context.Process(target=_open_and_close, args=(str(path), barrier, failures, n % 2))
            for n in range(4)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    assert failures.empty(), failures.get()


def test_installed_wheel_creates_a_database(tmp_path: Path) -> None:
    """A built wheel (not the checkout) carries the migrations and can create a log.

    It also carries the operator console's static files and the streaming app's
    ``client.js`` (package data).
    """
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True,
    )
    [wheel] = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    console = ROOT / "broadcast_history" / "admin" / "static" / "console"
    assert (console / "index.html").exists()
    assert {
        f"broadcast_history/admin/static/console/{f.name}" for f in console.iterdir()
    } <= shipped
    assert "broadcast_history/web/static/client.js" in shipped
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    script = textwrap.dedent(
        """
        import asyncio, sys
        import broadcast_history
        from broadcast_history.log._migrate import migrations_dir
        assert broadcast_history.__file__.startswith(sys.argv[1]), broadcast_history.__file__
        assert str(migrations_dir()).startswith(sys.argv[1]), migrations_dir()
        async def main():
            async with broadcast_history.Broadcast(log="sqlite+aiosqlite:///new.db") as bc:
                print((await bc.publish("c", "m")).offset)
        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(target)!r}); " + f"exec({script!r})",
            str(target),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert (tmp_path / "new.db").exists()


async def test_cancelled_readers_leave_the_memory_log_intact() -> None:
    """Cancelling consumers mid-replay (a client going away) must not break the log."""
    async with Broadcast(page_size=50) as bc:
        await asyncio.gather(*(bc.publish("c", str(i)) for i in range(2000)))

        async def consume() -> None:
            async with bc.subscribe("c", since=0) as sub:
                async for _ in sub:
                    await asyncio.sleep(0)

        for delay in (0, 0.001, 0.005, 0.01, 0.02):
            task = asyncio.create_task(consume())
            await asyncio.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert (await bc.publish("c", "after")).offset == 2001
        assert len(await bc.log.read("c", after=1990)) == 11


def test_migrations_use_only_public_log_names() -> None:
    """The Alembic environment reaches the log as any other user does."""
    import ast

    env = Path(__file__).resolve().parents[1] / "migrations" / "env.py"
    for node in ast.walk(ast.parse(env.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("broadcast_history"):
            assert "._" not in (node.module or ""), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), node.module


async def test_disconnect_lets_a_read_left_by_a_cancelled_caller_end(tmp_path: Path) -> None:
    # A subscriber cancelled mid-read leaves the read running (it holds a connection);
    # closing the pool under it would leak the connection.
    log = EventLog(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    await log.connect()
    real, finished = log._store.read_page, []

    async def slow(*args: object) -> list[Event]:
        await asyncio.sleep(0.3)  # fault injection: a slow database
        page = await real(*args)  # type: ignore[arg-type]
        finished.append(page)
        return page

    log._store.read_page = slow  # type: ignore[method-assign]
    caller = asyncio.ensure_future(log.read_from("c", 1, 10))
    await asyncio.sleep(0.05)
    caller.cancel()
    await log.disconnect()
    assert finished == [[]]


async def test_subscriptions_entered_as_the_broadcast_disconnects_end_at_once(
    tmp_path: Path,
) -> None:
    """disconnect() closes a subscription still being positioned; positioning must not
    open it again (it then waited a whole idle_check, 20 s here, before it ended)."""
    broadcast = Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", idle_check=20)
    await broadcast.connect()
    await broadcast.publish("c", "x")

    async def read(since: int | None) -> None:
        async with broadcast.subscribe("c", since=since) as sub:
            async for _ in sub:
                pass

    tasks = [asyncio.create_task(read(since)) for since in (0, None)]
    await asyncio.sleep(0)
    await broadcast.disconnect()
    done, _ = await asyncio.wait(tasks, timeout=5)
    assert len(done) == 2
    for task in done:
        assert task.exception() is None or isinstance(task.exception(), BroadcastError)


async def test_a_cancelled_disconnect_still_closes_everything(tmp_path: Path) -> None:
    """disconnect() cut short (a shutdown timeout) went no further and a second call
    returned at once: tasks, SQLite threads and connections stayed behind. The
    closing now goes on; a second disconnect() waits for it, and connect() works."""
    threads = threading.active_count()
    broadcast = Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    await broadcast.connect()
    publishes = [asyncio.create_task(broadcast.publish("c", str(i))) for i in range(200)]
    await asyncio.sleep(0)
    first = asyncio.create_task(broadcast.disconnect())
    for _ in range(3):  # under way: the appender is finishing the publishes
        await asyncio.sleep(0)
    assert not first.done()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await broadcast.disconnect()
    await asyncio.wait(publishes, timeout=5)
    for task in publishes:
        assert task.done() and (
            task.exception() is None or isinstance(task.exception(), BroadcastError)
        )
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    # A closed connection's thread may take a moment to end (under load), not forever.
    for _ in range(500):
        if threading.active_count() <= threads:
            break
        await asyncio.sleep(0.01)
    # At most: a thread another test left may end meanwhile.
    assert threading.active_count() <= threads, threading.enumerate()
    async with broadcast:
        assert (await broadcast.publish("c", "again")).offset >= 1


async def test_connect_after_a_closing_that_failed(tmp_path: Path) -> None:
    """A cancelled disconnect() goes on closing; if that fails, its error was for its
    callers: a connect() waiting for it connects anyway."""

    class FailingClose(MemoryBackend):
        async def disconnect(self) -> None:
            await asyncio.sleep(0.05)
            raise ConnectionError("the transport would not close")

    broadcast = Broadcast(backend=FailingClose(), log=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}")
    await broadcast.connect()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(broadcast.disconnect(), 0.01)
    await broadcast.connect()
    assert broadcast.connected
    assert (await broadcast.publish("c", "x")).offset == 1
    with pytest.raises(ConnectionError):
        await broadcast.disconnect()


async def test_since_a_future_time_skips_events_stamped_before_it() -> None:
    # since=datetime means "timestamp >= it", also for events that commit after the
    # subscription was entered (a client whose clock runs ahead, a scheduled start).
    async with Broadcast("memory://") as broadcast:
        await broadcast.publish("c", "history")
        since = datetime.now(timezone.utc) + timedelta(seconds=0.3)
        async with broadcast.subscribe("c", since=since) as sub:
            early = await broadcast.publish("c", "early")
            assert early.timestamp is not None and early.timestamp < since
            while datetime.now(timezone.utc) <= since:
                await asyncio.sleep(0.05)
            late = await broadcast.publish("c", "late")
            got = await asyncio.wait_for(sub.get(), 5)
            assert (got.message, got.offset) == ("late", late.offset)
            assert sub.position == late.offset
            await broadcast.publish("c", "after")
            assert (await asyncio.wait_for(sub.get(), 5)).message == "after"


async def test_opening_a_current_log_needs_no_write_lock(tmp_path: Path) -> None:
    """Connecting took SQLite's write lock to check the schema: a process whose
    writer was stopped mid-transaction (SIGSTOP, a debugger) kept every new worker
    and CLI command waiting 30 s, then failing, though they only had to read."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    async with Broadcast(log=url) as bc:
        await bc.publish("c", "stored")
    holder = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")

    async def read() -> None:
        async with Broadcast(log=url) as bc, bc.subscribe("c", since=0) as sub:
            assert (await sub.get()).message == "stored"

    try:
        await asyncio.wait_for(read(), 10)  # the busy timeout is 30 s
    finally:
        holder.rollback()
        holder.close()


class _Bus:
    """A transport written against broadcaster 0.3's own base class: publish() only,
    no publish_many, connected or any other hook of ours. Instances made from one
    ``_Bus.shared`` dict reach each other, like processes on one server."""

    def __init__(self, shared: dict[str, list[asyncio.Queue[Any]]]) -> None:
        self._shared, self._queue = shared, asyncio.Queue[Any]()

    async def connect(self) -> None:
        pass

    async def disconnect(self) -> None:
        pass

    async def subscribe(self, channel: str) -> None:
        self._shared.setdefault(channel, []).append(self._queue)

    async def unsubscribe(self, channel: str) -> None:
        self._shared[channel].remove(self._queue)

    async def publish(self, channel: str, message: Any) -> None:
        for queue in self._shared.get(channel, []):
            queue.put_nowait(Event(channel=channel, message=message))

    async def next_published(self) -> Event:
        event: Event = await self._queue.get()
        return event


async def test_a_backend_with_broadcasters_methods_only_carries_events_live(
    tmp_path: Path,
) -> None:
    """Such a backend (broadcaster's own classes are) failed every live send with
    AttributeError on publish_many: other processes got each event only from their
    idle check. transport_connected raised AttributeError too."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    shared: dict[str, list[asyncio.Queue[Any]]] = {}
    first = Broadcast(backend=_Bus(shared), log=url, idle_check=60)  # type: ignore[arg-type]
    second = Broadcast(backend=_Bus(shared), log=url, idle_check=60)  # type: ignore[arg-type]
    async with first, second, second.subscribe("c") as sub:
        assert first.transport_connected and second.transport_connected
        await first.publish("c", "live")
        assert (await asyncio.wait_for(sub.get(), 10)).message == "live"


def test_a_missing_postgres_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if asyncpg were not installed: the store module imports it at the top.
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.delitem(sys.modules, "broadcast_history.log._postgres", raising=False)
    with pytest.raises(ImportError, match=r"broadcast-history\[postgres\]"):
        EventLog("postgresql+asyncpg://localhost/db")


def count_writes(broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-item list counting the write transactions ``broadcast``'s log opens."""
    writes = [0]
    begin = broadcast.log._store.begin

    def counting(*, write: bool = False) -> Any:
        writes[0] += write
        return begin(write=write)

    monkeypatch.setattr(broadcast.log._store, "begin", counting)
    return writes


async def test_retention_removes_a_backlog_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog (retention turned on late, or a long stop) went in one transaction:
    deleting a million rows held SQLite's write lock for seconds, and every publish
    waited. Each transaction now removes at most RETENTION_SLICE events."""
    from broadcast_history import Retention
    from broadcast_history.log import _log as log_module

    monkeypatch.setattr(log_module, "RETENTION_SLICE", 10)
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}") as bc:
        stored = [await bc.publish("c", str(i)) for i in range(95)]
        await bc.publish("d", "kept")
        writes = count_writes(bc, monkeypatch)
        assert await bc.log.apply_retention(Retention(max_events=3)) == 92
        assert writes == [10]  # 9 slices of 10, and the last 2
        info = await bc.log.channel("c")
        assert info is not None and (info.first_offset, info.last_offset) == (93, 95)
        assert info.trimmed_timestamp == stored[91].timestamp
        # By age too: everything older than a microsecond, a slice at a time.
        assert await bc.log.apply_retention(Retention(max_age=timedelta(microseconds=1))) == 4
        info = await bc.log.channel("c")
        assert info is not None and info.count == 0


@pytest.mark.parametrize("kind", ["log:postgres", "log:mysql"])
async def test_retention_by_age_on_the_clock_that_stamped_the_events(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a server log, events are stamped by the database's clock, but max_age was
    counted from this host's: a host whose clock ran 2 h ahead removed the shared
    log's recent history (found by a probe)."""
    from broadcast_history import Retention
    from tests.support.admin_support import fresh_log_url

    url = await fresh_log_url(kind, tmp_path)
    async with Broadcast(log=url) as bc:
        for i in range(5):
            await bc.publish("c", str(i))
        ahead = time.time_ns() + 2 * 3600 * 10**9 - time.monotonic_ns()
        monkeypatch.setattr(time, "time_ns", lambda: ahead + time.monotonic_ns())
        assert await bc.log.apply_retention(Retention(max_age=timedelta(hours=1))) == 0
        info = await bc.log.channel("c")
        assert info is not None and info.count == 5


async def test_a_cancellation_landing_as_a_wait_completes_is_not_lost() -> None:
    """Python 3.11's wait_for returns the result when the awaited future completes
    in the same loop step as the task's cancellation: the live-send loop then went
    on and asyncio.run()'s clean-up waited for it for ever (3 in 10 crashed apps on
    postgres://). The library's loops wait through _cancel.wait_for."""
    from broadcast_history import _cancel

    async def outcome(wait: Any, failing: bool = False) -> str:
        future = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(wait(future, 10))
        await asyncio.sleep(0)  # the task waits on the future
        if failing:
            future.set_exception(ConnectionError("send failed"))
        else:
            future.set_result("done")
        task.cancel()
        try:
            return str(await task)
        except asyncio.CancelledError:
            return "cancelled"
        except ConnectionError:
            return "failed"

    if sys.version_info < (3, 11):
        pytest.skip("Python 3.10 does not count cancellations: nothing to read")
    assert await outcome(_cancel.wait_for) == "cancelled"
    assert await outcome(_cancel.wait_for, failing=True) == "cancelled"
    if sys.version_info[:2] == (3, 11):  # what it guards against
        assert await outcome(asyncio.wait_for) == "done"
        assert await outcome(asyncio.wait_for, failing=True) == "failed"


async def test_a_bounded_read_never_loses_its_callers_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bounded read runs in its caller's task: a cancellation of that task which the
    read swallowed (a driver's connect through 3.11's wait_for can) made the read
    return as if nothing happened, where wait_for in a task of its own raised it. The
    read's own timeout still fails as the log's."""
    from broadcast_history.log import _calls

    async def swallowing() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "value"
        return "slept"

    async def read_then_go_on() -> str:
        value = await _calls.bounded_read(swallowing())
        await asyncio.sleep(0)
        return f"went on with {value}"

    if sys.version_info < (3, 11):
        pytest.skip("Python 3.10 does not count cancellations: nothing to read")
    task = asyncio.create_task(read_then_go_on())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    monkeypatch.setattr(_calls, "READ_TIMEOUT", 0.05)
    with pytest.raises(LogUnavailable, match=r"did not answer a read within 0\.05 s"):
        await _calls.bounded_read(asyncio.sleep(10))

    async def own_timeout() -> None:
        raise asyncio.TimeoutError  # a driver's command_timeout: not the log's bound

    with pytest.raises(asyncio.TimeoutError):
        await _calls.bounded_read(own_timeout())


async def test_retention_by_age_writes_only_where_events_are_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With max_age, every channel that stored anything got a write transaction each
    pass, due or not (20,000 channels took 48 s a pass on MySQL, every second)."""
    from datetime import timedelta

    from broadcast_history import Retention

    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}") as bc:
        for i in range(20):
            await bc.publish(f"c{i}", "m")
        writes = count_writes(bc, monkeypatch)
        assert await bc.log.apply_retention(Retention(max_age=timedelta(hours=1))) == 0
        assert writes == [0]
        await asyncio.sleep(0.01)
        assert await bc.log.apply_retention(Retention(max_age=timedelta(milliseconds=5))) == 20
        assert writes == [20]


async def test_retention_reads_only_the_channels_it_may_trim_a_page_at_a_time(
    log_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass read every channel row, with its first event's timestamp, into one list,
    every second: channel rows outlive their events, so with per-session channels
    each pass grew, in time and memory, with every channel ever used."""
    from broadcast_history import Retention
    from broadcast_history.log import _log, _queries

    monkeypatch.setattr(_log, "_RETENTION_PAGE", 50)  # pages of 500 took 11-13 s a log
    async with Broadcast(log=log_url) as bc:
        sessions = [f"session-{i:04}" for i in range(2 * _log._RETENTION_PAGE + 20)]
        for _ in range(2):
            await asyncio.gather(*(bc.publish(name, "m") for name in sessions))
        await bc.publish("kept", "k")
        # Over three pages, every channel due is trimmed.
        assert await bc.log.apply_retention(Retention(max_events=1)) == len(sessions)
        assert (await bc.log.channel(sessions[-1])).count == 1  # type: ignore[union-attr]
        await asyncio.sleep(0.01)
        assert (
            await bc.log.apply_retention(Retention(max_age=timedelta(milliseconds=5)))
            == len(sessions) + 1
        )

        read: list[str] = []
        info = _queries.channel_info
        monkeypatch.setattr(_queries, "channel_info", lambda row: read.append(row[0]) or info(row))
        await bc.publish("kept", "new")
        assert await bc.log.apply_retention(Retention(max_events=1)) == 0
        assert await bc.log.apply_retention(Retention(max_age=timedelta(hours=1))) == 0
        assert read == []  # no row of a channel with nothing to remove left the database
        await asyncio.sleep(0.01)
        assert await bc.log.apply_retention(Retention(max_age=timedelta(milliseconds=5))) == 1
        assert read == ["kept"]


async def test_retention_passes_are_spaced_out_by_what_their_search_costs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding the channels due reads every channel row in the database, and channel
    rows outlive their events: with a million per-user channels a pass took 0.25 s of
    SQLite's time (0.5 s of Postgres'), every second, in every process. A pass now
    waits 20 times as long as its search took, so it costs at most a twentieth."""
    from broadcast_history import Retention
    from broadcast_history.log import EventLog

    searches: list[float] = []
    search = EventLog._retention_page

    async def slow_search(log: EventLog, *args: Any) -> Any:
        searches.append(time.monotonic())
        await asyncio.sleep(0.05)  # a log with a great many channel rows
        return await search(log, *args)

    monkeypatch.setattr(EventLog, "_retention_page", slow_search)
    async with Broadcast(retention=Retention(max_events=1, interval=0.3)) as bc:
        for i in range(3):
            await bc.publish("orders", f"o{i}")
        await asyncio.sleep(0.9)
        assert (await bc.log.channel("orders")).count == 1  # type: ignore[union-attr]
    # Before: a pass every 0.35 s. Now the second waits 1 s after the first.
    assert len(searches) == 1


async def test_failing_retention_passes_are_spaced_out_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass that failed after its search (a deadlock, a lock timeout) came back
    after `interval`: a log failing so searched every row every second (a review's
    probe: 10 searches in 3 s, against 2 when the passes succeed). Each failure also
    logged a warning with two chained tracebacks (a probe's Postgres outage of 40 s:
    5,222 lines): now one line now and then."""
    from broadcast_history import LogUnavailable, Retention
    from broadcast_history.log import EventLog

    searches: list[float] = []
    search = EventLog._retention_page

    async def slow_search(log: EventLog, *args: Any) -> Any:
        searches.append(time.monotonic())
        await asyncio.sleep(0.05)
        return await search(log, *args)

    async def failing_trim(*args: Any, **kwargs: Any) -> int:
        raise LogUnavailable("the trim failed")

    monkeypatch.setattr(EventLog, "_retention_page", slow_search)
    monkeypatch.setattr(EventLog, "_in_slices", failing_trim)
    with caplog.at_level("WARNING", logger="broadcast_history"):
        async with Broadcast(retention=Retention(max_events=1, interval=0.3)) as bc:
            for i in range(3):
                await bc.publish("orders", f"o{i}")
            await asyncio.sleep(0.9)
    assert len(searches) == 1
    [line] = [r for r in caplog.records if "retention" in r.getMessage()]
    assert line.getMessage() == "retention pass failed: the trim failed"
    assert not line.exc_info


async def test_a_retention_pass_failing_on_a_bug_says_where(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not the log away but a bug: its traceback is kept (once in a while), and each
    broadcast's failures are its own (one's did not hide another's for 30 s)."""
    from broadcast_history import Retention
    from broadcast_history.log import EventLog

    async def broken(*args: Any) -> Any:
        raise KeyError("missing")

    monkeypatch.setattr(EventLog, "retention_pass", broken)
    retention = Retention(max_events=1, interval=0.05)
    with caplog.at_level("WARNING", logger="broadcast_history"):
        async with Broadcast(retention=retention), Broadcast(retention=retention):
            await asyncio.sleep(0.5)
    lines = [r for r in caplog.records if "retention" in r.getMessage()]
    assert len(lines) == 2  # one each, the rest held back
    assert all(r.exc_info is not None and r.exc_info[0] is KeyError for r in lines)


async def test_retention_slices_leave_a_channel_started_again_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounds worked out once per pass, applied slice after slice: a channel deleted
    and started again between two slices lost its new events, those max_events
    keeps too."""
    from broadcast_history import Retention
    from broadcast_history.log import _log as log_module

    monkeypatch.setattr(log_module, "RETENTION_SLICE", 10)
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}") as bc:
        for i in range(95):
            await bc.publish("c", str(i))
        store = bc.log._store
        begin, writes = store.begin, 0

        @contextlib.asynccontextmanager
        async def hooked(*, write: bool = False) -> AsyncIterator[Any]:
            nonlocal writes
            writes += write
            if write and writes == 3:  # between the second slice and the third
                monkeypatch.setattr(store, "begin", begin)
                await bc.log.delete_channel("c")
                for i in range(5):
                    await bc.publish("c", f"new {i}")
                monkeypatch.setattr(store, "begin", hooked)
            async with begin(write=write) as conn:
                yield conn

        monkeypatch.setattr(store, "begin", hooked)
        assert await bc.log.apply_retention(Retention(max_events=3)) == 20
        monkeypatch.setattr(store, "begin", begin)
        info = await bc.log.channel("c")
        assert info is not None and (info.first_offset, info.last_offset) == (1, 5)
        assert await bc.log.apply_retention(Retention(max_events=3)) == 2  # the next pass


async def test_a_read_cancelled_as_it_gets_its_turn_gives_the_turn_back() -> None:
    """A caller of acquire_while_moving cancelled in the step its slot was granted kept
    the slot (wait_for returned it held, then raised the cancellation): subscribers
    leaving at that moment would use up the broadcast's turns at reading, for good."""
    from broadcast_history._gate import acquire_while_moving

    slots = asyncio.Semaphore(1)
    await slots.acquire()  # a read holds the only turn
    waiting = asyncio.create_task(acquire_while_moving(slots, 5, lambda: 0.0))
    await asyncio.sleep(0.01)
    slots.release()  # the read ends in the step its waiter is cancelled
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)
    assert not slots.locked()


async def test_a_subscription_cancelled_again_as_it_leaves_still_unsubscribes(
    sqlite_file_url: str,
) -> None:
    """anyio's cancel scopes (Starlette, FastAPI) deliver the cancellation again at
    each await of a cancelled task's clean-up. A subscription leaving while another
    channel's subscribe held the lock for its round trip was cancelled again as it
    waited to unsubscribe: its channel stayed subscribed on the transport for good,
    its messages read and dropped (found by an audit, on Redis)."""
    import anyio

    class SlowSubscribe(MemoryBackend):
        """A subscribe takes a round trip, as on a server (fault injection)."""

        async def subscribe(self, channel: str) -> None:
            await asyncio.sleep(0.05)
            await super().subscribe(channel)

    backend = SlowSubscribe()
    async with Broadcast(backend=backend, log=sqlite_file_url) as bc:
        for round_ in range(5):
            channel = f"leaving-{round_}"

            async def worker(channel: str = channel) -> None:
                async with bc.subscribe(channel) as sub:
                    async for _ in sub:
                        pass

            async def other(round_: int = round_) -> None:
                async with bc.subscribe(f"other-{round_}"):
                    pass

            async with anyio.create_task_group() as group:
                group.start_soon(worker)
                await anyio.sleep(0.1)  # subscribed
                arriving = asyncio.create_task(other())
                await asyncio.sleep(0)  # holds the lock for its round trip
                group.cancel_scope.cancel()
            await arriving
        for _ in range(100):
            if not backend._channels:
                break
            await asyncio.sleep(0.01)
        assert backend._channels == set()
        assert bc._channels._on_transport == set()
