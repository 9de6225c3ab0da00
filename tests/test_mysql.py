"""MySQL/MariaDB log specifics: names byte for byte, events the server refuses, the
migration lock, several processes appending at once, connections killed mid-publish,
durable consumers' leases decided without RETURNING.

The contract suite runs on this log too (``log:mysql`` in ``LOGS``); these tests use
databases of their own (see ``tests/support/mysql_support.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from broadcast_history import (
    Broadcast,
    Event,
    EventLog,
    LogUnavailable,
    MessageTooLarge,
)
from broadcast_history.backends.memory import MemoryBackend
from broadcast_history.log import _migrate, head_revision, schema_revision
from tests.conftest import unique
from tests.support.helpers import assert_contiguous, patient_reads, publish_through_a_cut, take
from tests.support.mysql_support import ensure_database, kill_connections
from tests.support.proxy import CuttableProxy

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
async def mysql_url() -> str:
    """A database of these tests only (never emptied by the shared fixtures)."""
    return await ensure_database("mysql")


async def test_a_publish_refused_before_its_commit_says_it_was_not_stored(
    mysql_url: str,
) -> None:
    """An append whose statement failed (here a lock wait interrupted: 1317; a lock
    wait timeout, 1205, is alike) never reached COMMIT, yet was reported as "may or
    may not be stored", which sends a careful caller looking for it."""
    from sqlalchemy.engine import make_url

    from tests.support.mysql_support import _server_connection

    channel = unique()
    database = make_url(mysql_url).database
    async with Broadcast("memory://", log=mysql_url) as broadcast:
        await broadcast.publish(channel, "first")
        holder = await _server_connection()
        try:
            async with holder.cursor() as cursor:
                await cursor.execute(f"USE `{database}`")
                await cursor.execute("BEGIN")
                await cursor.execute(
                    "SELECT * FROM broadcast_channels WHERE name = %s FOR UPDATE", (channel,)
                )
                blocked = asyncio.create_task(broadcast.publish(channel, "blocked"))
                for _ in range(500):  # the append waits for the channel's row
                    await asyncio.sleep(0.01)
                    await cursor.execute(
                        "SELECT id FROM information_schema.processlist WHERE db = %s"
                        " AND id <> CONNECTION_ID() AND info LIKE %s",
                        (database, "%broadcast_channels%"),
                    )
                    waiting = await cursor.fetchall()
                    if waiting:
                        break
                (thread,) = waiting[0]
                await cursor.execute(f"KILL QUERY {int(thread)}")
                with pytest.raises(LogUnavailable) as failed:
                    await asyncio.wait_for(blocked, 10)
                await cursor.execute("ROLLBACK")
        finally:
            holder.close()
        assert "1317" in str(failed.value)
        assert "may or may not" not in str(failed.value)
        after = await broadcast.publish(channel, "after")
        assert after.offset == 2  # the refused one took no offset


def test_urls_select_asyncmy() -> None:
    pytest.importorskip("asyncmy")
    for scheme in ("mysql", "mysql+asyncmy", "mariadb", "mariadb+asyncmy"):
        log = EventLog(f"{scheme}://user@db.example/app")
        assert log.url.drivername == "mysql+asyncmy"
        assert log.url.query["charset"] == "utf8mb4"


async def test_names_and_keys_compare_byte_for_byte(mysql_url: str) -> None:
    """MySQL's text collations would fold case and ignore trailing spaces."""
    base = unique()
    names = [base, base + " ", base.upper(), base + "\u00e9", base + "e\u0301"]
    async with Broadcast(backend=MemoryBackend(), log=mysql_url) as broadcast:
        for name in names:
            assert (await broadcast.publish(name, name)).offset == 1
        first = await broadcast.publish(base, "k", key="key")
        second = await broadcast.publish(base, "K", key="KEY")
        third = await broadcast.publish(base, "k ", key="key ")
        assert [first.offset, second.offset, third.offset] == [2, 3, 4]
        assert await broadcast.publish(base, "again", key="KEY") == second
        listed = [info.name for info in await broadcast.log.channels(prefix=base)]
        # Prefixes match byte for byte too: the upper-case name is not listed.
        assert sorted(listed) == sorted(name for name in names if name.startswith(base))
        assert [info.name for info in await broadcast.log.channels(prefix=base + " ")] == [
            base + " "
        ]
        for name in names:
            [event] = await broadcast.log.read(name, after=0, limit=1)
            assert event.message == name


async def test_event_too_large_for_the_server_fails_alone(mysql_url: str) -> None:
    """An event over the server's max_allowed_packet is refused on its data; the
    publishes committed in the same batch are stored without it."""
    channel = unique()
    async with Broadcast(backend=MemoryBackend(), log=mysql_url) as broadcast:
        async with broadcast.log._store.begin() as conn:
            found = await conn.exec_driver_sql("SELECT @@max_allowed_packet")
            huge = b"x" * (int(found.scalar()) + 1024 * 1024)
    async with Broadcast(
        backend=MemoryBackend(), log=mysql_url, max_message_size=len(huge)
    ) as broadcast:
        results = await asyncio.gather(
            broadcast.publish(channel, "before"),
            broadcast.publish(channel, huge),
            broadcast.publish(channel, "after"),
            return_exceptions=True,
        )
        assert isinstance(results[1], MessageTooLarge), results[1]
        stored = await broadcast.log.read(channel, after=0)
    assert [event.message for event in stored] == ["before", "after"]
    assert_contiguous(stored, 1, 2)


async def test_a_connection_lost_while_migrating_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection killed while the schema was being made: the clean-up after it
    (session settings, the migration lock) failed on the dead connection, and its
    error ("Can't reconnect until invalid transaction is rolled back") hid the cause
    (found by a probe)."""
    from sqlalchemy import text

    from broadcast_history.log import _migrate

    url = await ensure_database("migrate_killed", empty=True)

    def killed(connection: Any, create_only: bool) -> None:
        connection.execute(text("KILL CONNECTION_ID()"))

    monkeypatch.setattr(_migrate, "_upgrade_unlocked", killed)
    log = EventLog(url)
    with pytest.raises(LogUnavailable) as failed:
        await log.connect()
    await log.disconnect()
    assert "invalid transaction" not in str(failed.value)
    assert "killed" in str(failed.value).lower() or "gone away" in str(failed.value)


async def test_hosts_migrating_at_once_create_one_schema(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = await ensure_database("migrate", empty=True)
    assert await schema_revision(url) is None
    logs = [EventLog(url) for _ in range(4)]
    with caplog.at_level(logging.WARNING):
        await asyncio.gather(*(log.connect() for log in logs))
    try:
        assert len({log.log_id for log in logs}) == 1
        assert await schema_revision(url) == head_revision()
        # MariaDB's "Name 'pk_...' ignored for PRIMARY key", logged by the driver.
        assert [r.getMessage() for r in caplog.records if r.name == "asyncmy"] == []
    finally:
        await asyncio.gather(*(log.disconnect() for log in logs))


async def test_a_migration_is_committed_before_its_lock_is_let_go() -> None:
    """MySQL's migration lock (a named lock of the session) was released before the
    migration's transaction committed: its last version update, after the last DDL
    (which commits by itself), was not yet visible to the next process, which took
    the lock, read an older revision and migrated again ("Online migration expected
    to match one row ... 0 found", seen in a suite run of four hosts starting)."""
    url = await ensure_database("migrate_commit", empty=True)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as first:
            async with first.begin():
                await _migrate.upgrade(first)
                # The lock is let go; this transaction commits only now: a slow host.
                other = EventLog(url)
                connecting = asyncio.create_task(other.connect())
                await asyncio.sleep(0.5)
            await asyncio.wait_for(connecting, 30)
            await other.disconnect()
        assert await schema_revision(url) == head_revision()
    finally:
        await engine.dispose()


_PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from broadcast_history import Broadcast

    async def main(url, prefix, name):
        channels = [f"{prefix}-{n}" for n in range(3)]
        async with Broadcast(log=url) as bc:
            await asyncio.gather(
                *(bc.publish(channels[i % 3], f"{name}-{i}") for i in range(400))
            )

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_four_processes_publish_gap_free(mysql_url: str) -> None:
    """4 processes x 400 concurrent publishes over 3 channels: every channel's offsets
    run gap-free, each process's messages in its order, timestamps never go back."""
    prefix = unique("mp")
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PUBLISHER, mysql_url, prefix, f"p{n}"
        )
        for n in range(4)
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), 120)
    assert codes == [0, 0, 0, 0]
    log = EventLog(mysql_url)
    await log.connect()
    try:
        pages = [await log.read(f"{prefix}-{n}", after=0, limit=2000) for n in range(3)]
    finally:
        await log.disconnect()
    everything: list[Event] = []
    for page in pages:
        assert_contiguous(page, 1, len(page))
        stamps = [event.timestamp for event in page]
        assert stamps == sorted(stamps)  # type: ignore[type-var]
        everything += page
    messages = [str(event.message) for event in everything]
    assert sorted(messages) == sorted(f"p{n}-{i}" for n in range(4) for i in range(400))
    for page in pages:
        for n in range(4):
            mine = [
                int(str(e.message).split("-")[1]) for e in page if e.message.startswith(f"p{n}-")
            ]
            assert mine == sorted(mine)


async def test_log_connections_killed_during_publishing() -> None:
    """Connections killed under 16 publishers: no gap, no duplicate; what returned is
    stored once; what raised is stored at most once (the kill may land after the
    server committed, before it answered)."""
    url = await ensure_database("faults")
    channel = unique()
    failed: list[str] = []
    returned: list[Event] = []
    async with Broadcast(backend=MemoryBackend(), log=url) as broadcast:

        async def publisher(n: int) -> None:
            for i in range(40):
                try:
                    returned.append(await broadcast.publish(channel, f"{n}-{i}"))
                except LogUnavailable:
                    failed.append(f"{n}-{i}")
                await asyncio.sleep(0.002)  # spread the publishes over the kills

        kills: list[int] = []
        done = asyncio.Event()

        async def killer() -> None:
            while not done.is_set():
                await asyncio.sleep(0.01)
                kills.append(await kill_connections(url))

        async def publishers() -> None:
            await asyncio.gather(*(publisher(n) for n in range(16)))
            done.set()

        await asyncio.wait_for(asyncio.gather(killer(), publishers()), 60)
        stored = await broadcast.log.read(channel, after=0, limit=10_000)
        async with broadcast.subscribe(channel, since=0) as subscriber:
            replayed = await take(subscriber, len(stored))

    assert len(returned) + len(failed) == 640
    assert_contiguous(stored, 1, len(stored))
    assert replayed == stored
    by_offset = {event.offset: event for event in stored}
    assert len({event.offset for event in returned}) == len(returned)
    for event in returned:
        assert by_offset[event.offset] == event
    messages = [event.message for event in stored]
    assert len(set(messages)) == len(messages)  # nothing stored twice
    unexpected = set(messages) - {event.message for event in returned}
    assert unexpected <= set(failed)
    assert sum(kills) > 0
    print(
        f"killed {sum(kills)} connections; {len(failed)} publishes raised LogUnavailable, "
        f"{len(unexpected)} of them stored (killed after the commit)"
    )


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "asyncmy" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"broadcast-history\[mysql\]"):
        EventLog("mysql://localhost/db")


@pytest.mark.parametrize(("errno", "retried"), [(1213, True), (2013, False)])
async def test_only_deadlocks_are_retried(
    mysql_url: str, monkeypatch: pytest.MonkeyPatch, errno: int, retried: bool
) -> None:
    """A deadlock rolled the batch back whole: it is retried. A lost connection may
    have hit the COMMIT: it is not (the publish may or may not be stored)."""
    import asyncmy.errors
    from sqlalchemy.exc import OperationalError

    from broadcast_history.log import _mysql

    calls: list[int] = []
    real = _mysql.MySQLStore._append_once

    async def failing_once(self: _mysql.MySQLStore, *args: object) -> list[Event]:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT ...", {}, asyncmy.errors.OperationalError(errno, "x"))
        return await real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_mysql.MySQLStore, "_append_once", failing_once)
    channel = unique()
    async with Broadcast(backend=MemoryBackend(), log=mysql_url) as broadcast:
        if retried:
            assert (await broadcast.publish(channel, "m")).offset == 1
        else:
            with pytest.raises(LogUnavailable, match="may or may not be stored"):
                await broadcast.publish(channel, "m")
            assert await broadcast.log.read(channel, after=0) == []
    assert len(calls) == (2 if retried else 1)


async def test_consumer_names_compare_byte_for_byte(mysql_url: str) -> None:
    """Consumers whose channel or name differ only in case or trailing spaces are
    distinct consumers, each with its own lease and position."""
    base = unique()
    pairs = [(c, n) for c in (base, base + " ", base.upper()) for n in ("w", "w ", "W")]
    holders = [f"holder-{i}" for i in range(len(pairs))]
    async with Broadcast(backend=MemoryBackend(), log=mysql_url) as broadcast:
        log = broadcast.log
        epochs = {c: (await broadcast.publish(c, "m")).epoch for c, _ in pairs}
        for i, (channel, name) in enumerate(pairs):
            assert (await log.acquire_lease(channel, name, holders[i], 5)).acquired
            assert await log.commit_position(channel, name, holders[i], epochs[channel], i, 5) == i
        listed = {(c.channel, c.name): c.position for c in await log.consumers()}
        assert {pair: listed.get(pair) for pair in pairs} == {
            pair: i for i, pair in enumerate(pairs)
        }
        leases = [(c, n, h) for (c, n), h in zip(pairs, holders, strict=True)]
        assert await log.renew_leases(leases, 5) == set(holders)
        for i, (channel, name) in enumerate(pairs):
            await log.release_lease(channel, name, holders[i])
            assert await log.delete_consumer(channel, name)
        assert [c for c in await log.consumers() if c.channel in epochs] == []


async def test_commit_returns_the_stored_position(mysql_url: str) -> None:
    """The position comes back from the UPDATE itself: the higher one within an
    epoch, the new one (even 0, even lower) in another epoch."""
    channel = unique()
    async with Broadcast(backend=MemoryBackend(), log=mysql_url) as broadcast:
        log = broadcast.log
        assert (await log.acquire_lease(channel, "w", "h", 5)).acquired
        assert await log.commit_position(channel, "w", "h", 7, 5, 5) == 5
        assert await log.commit_position(channel, "w", "h", 7, 3, 5) == 5
        assert await log.commit_position(channel, "w", "h", 7, 9, 5) == 9
        assert await log.commit_position(channel, "w", "h", 8, 0, 5) == 0
        assert await log.commit_position(channel, "w", "h", 8, 2, 5) == 2
        assert await log.commit_position(channel, "w", "other", 8, 4, 5) is None
        await log.release_lease(channel, "w", "h")
        assert await log.commit_position(channel, "w", "h", 8, 4, 5) is None
        taken = await log.acquire_lease(channel, "w", "next", 5)
        assert (taken.acquired, taken.epoch, taken.position) == (True, 8, 2)


async def test_one_of_many_connections_takes_a_lease(mysql_url: str) -> None:
    """Logs of their own (as separate processes would have) racing for a consumer
    that does not exist yet, then for one whose lease ran out: one wins each time."""
    channel = unique()
    logs = [EventLog(mysql_url) for _ in range(6)]
    await asyncio.gather(*(log.connect() for log in logs))
    try:
        for round_ in range(2):
            attempts = await asyncio.gather(
                *(
                    # Long enough that the race ends before the lease runs out, on
                    # a loaded 2-core machine too (with 0.3 s, two of the six won once).
                    log.acquire_lease(channel, "w", f"h{round_}-{n}", 1.5)
                    for n, log in enumerate(logs)
                )
            )
            assert sum(attempt.acquired for attempt in attempts) == 1
            busy = [attempt for attempt in attempts if not attempt.acquired]
            assert {attempt.holder for attempt in busy} == {
                f"h{round_}-{n}" for n, attempt in enumerate(attempts) if attempt.acquired
            }
            await asyncio.sleep(1.6)  # the lease runs out
        taken = await logs[0].acquire_leases([(channel, "w", "a"), (channel, "v", "b")], 5)
        assert taken == ({"a": (None, None), "b": (None, None)}, None)
        taken, next_expiry = await logs[1].acquire_leases([(channel, "w", "c")], 5)
        assert taken == {} and next_expiry is not None and 4 < next_expiry <= 5
    finally:
        await asyncio.gather(*(log.disconnect() for log in logs))


async def test_lease_connections_killed() -> None:
    """A lease statement's connection killed by the server is discarded: the next
    statements run on fresh connections, and the lease is still the holder's."""
    url = await ensure_database("consumer_faults")
    channel = unique()
    async with Broadcast(backend=MemoryBackend(), log=url) as broadcast:
        log = broadcast.log
        event = await broadcast.publish(channel, "m")
        assert (await log.acquire_lease(channel, "w", "h", 5)).acquired
        assert await kill_connections(url) > 0
        failures = 0
        for _ in range(5):
            try:
                kept = await log.renew_leases([(channel, "w", "h")], 5)
                stored = await log.commit_position(channel, "w", "h", event.epoch, 1, 5)
                break
            except LogUnavailable:
                failures += 1
        assert failures <= 2
        assert (kept, stored) == ({"h"}, 1)
        assert not (await log.acquire_lease(channel, "w", "other", 5)).acquired


async def test_a_log_gone_silent_fails_publishes_instead_of_holding_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MySQL frozen (a paused VM, a partition dropping packets): every publish waited
    as long as it lasted, and disconnect() with them."""
    from sqlalchemy.engine import make_url

    from broadcast_history.log import _calls

    monkeypatch.setattr(_calls, "APPEND_TIMEOUT", 1.0)
    url = make_url(await ensure_database("silent"))
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 3306)
    port = await proxy.start()
    log = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    channel = unique()
    try:
        broadcast = Broadcast("memory://", log=log)
        await broadcast.connect()
        try:
            await broadcast.publish(channel, "before")
            proxy.stall()
            # Stalled before the COMMIT went out: the server rolls the rest back.
            with pytest.raises(LogUnavailable, match="within 1 s, nothing was stored"):
                await asyncio.wait_for(broadcast.publish(channel, "frozen"), 10)
            # A batch larger than the socket's buffers: closing its connection must
            # not wait for them to drain either.
            await broadcast.publish(channel, "on a new connection")
            proxy.stall()
            with pytest.raises(LogUnavailable, match=r"did not answer within 1\.03 s"):
                await asyncio.wait_for(broadcast.publish(channel, "x" * 300_000), 10)
        finally:
            await asyncio.wait_for(broadcast.disconnect(), 15)
    finally:
        await proxy.stop()


@pytest.fixture
async def silent_log(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[CuttableProxy, Broadcast]]:
    """A connected broadcast whose MySQL log is behind a proxy, its reads bounded at 1 s."""
    from sqlalchemy.engine import make_url

    from broadcast_history.log import _calls

    monkeypatch.setattr(_calls, "READ_TIMEOUT", 1.0)
    url = make_url(await ensure_database("silent"))
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 3306)
    port = await proxy.start()
    log = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    broadcast = Broadcast("memory://", log=log, page_size=10)
    try:
        await broadcast.connect()
        yield proxy, broadcast
    finally:
        await asyncio.wait_for(broadcast.disconnect(), 15)
        await proxy.stop()


async def _replays_whole(broadcast: Broadcast, channel: str, count: int) -> None:
    async def replay() -> list[str]:
        async with broadcast.subscribe(channel, since=0) as again:
            return [e.message for e in await take(again, count)]  # type: ignore[misc]

    assert await asyncio.wait_for(replay(), 10) == [f"m{i}" for i in range(count)]


async def test_a_read_the_log_does_not_answer_fails_in_time(
    silent_log: tuple[CuttableProxy, Broadcast],
) -> None:
    """A replay page, a channel's head or an offset by time asked of a MySQL server
    gone silent held its caller until TCP gave up (15 minutes on Linux defaults), and
    disconnect() behind it: past the read bound they raise LogUnavailable."""
    proxy, broadcast = silent_log
    channel = unique()
    for i in range(30):
        await broadcast.publish(channel, f"m{i}")
    async with broadcast.subscribe(channel, since=0) as sub:
        await sub.get()
        proxy.stall(new_too=True)  # the server froze
        with pytest.raises(LogUnavailable, match="did not answer a read within 1 s"):
            await asyncio.wait_for(take(sub, 29), 10)
        now = datetime.now(timezone.utc)
        lookups = (
            broadcast.log.channel,
            lambda c: broadcast.log.offset_at(c, now),
            lambda c: broadcast.log.read(c, limit=5),
        )
        for lookup in lookups:
            with pytest.raises(LogUnavailable, match="did not answer a read within 1 s"):
                await asyncio.wait_for(lookup(channel), 10)
        proxy.resume()  # the connections it had are lost for good
    with patient_reads():
        await _replays_whole(broadcast, channel, 30)


async def test_after_a_read_gets_no_answer_the_next_take_fresh_connections(
    silent_log: tuple[CuttableProxy, Broadcast],
) -> None:
    """The pools' idle connections, gone silent together (a NAT or a firewall that
    dropped them), each failed a read after the bound, one after another, although
    new connections worked; a replay's connection also kept waiting on a ROLLBACK
    after its read gave up. After the first read without an answer, every idle
    connection is let go."""
    proxy, broadcast = silent_log
    channels = [unique() for _ in range(4)]
    for channel in channels:
        for i in range(30):
            await broadcast.publish(channel, f"m{i}")
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(broadcast.subscribe(c, since=0)) for c in channels]
        await asyncio.gather(*(take(sub, 30) for sub in subs))
    proxy.stall()  # the connections open now go silent; new ones pass
    with pytest.raises(LogUnavailable, match="did not answer a read within 1 s"):
        await _replays_whole(broadcast, channels[0], 30)
    with patient_reads():
        for channel in channels:
            await _replays_whole(broadcast, channel, 30)
            assert (await broadcast.log.channel(channel)).last_offset == 30


async def test_a_connection_whose_answer_was_on_its_way_when_the_log_went_silent_is_let_go(
    mysql_url: str,
) -> None:
    """An answer sent before the path went silent can arrive after a read that then
    waits in vain began: its connection came back after that read began and passed
    for fresh, and the next read on it waited for the whole bound (the likely cause
    of this file's flaky fresh-connections test). What counts is when a use began."""
    async with Broadcast("memory://", log=mysql_url) as broadcast:
        engine = broadcast.log._store.engine  # type: ignore[attr-defined]

        conn = await engine.connect()
        count = engine.pool.checkedin() + 1  # every idle one and this one

        async def every_idle_one() -> list[object]:
            """The drivers of ``count`` connections taken at once."""
            async with contextlib.AsyncExitStack() as stack:
                conns = [await stack.enter_async_context(engine.connect()) for _ in range(count)]
                return [(await conn.get_raw_connection()).driver_connection for conn in conns]

        before = (await conn.get_raw_connection()).driver_connection
        broadcast.log._store.gave_up(time.monotonic())  # type: ignore[attr-defined]
        await conn.close()  # its answer came after that read (on another one) began
        renewed = await every_idle_one()
        assert before not in renewed
        assert await every_idle_one() == renewed  # those are kept


def test_a_connection_asyncmy_lost_is_told_from_a_refusal() -> None:
    """Replay pages call asyncmy directly: its lost-connection errors carry no cause a
    retry could recognize, so a page read that lost its connection was not read again."""
    errors = pytest.importorskip("asyncmy.errors")
    from broadcast_history.log._calls import connection_lost

    def failure(cause: BaseException) -> LogUnavailable:
        error = LogUnavailable(f"event log failure: {cause!r}")
        error.__cause__ = cause
        return error

    for code in (2006, 2013, 2055):
        assert connection_lost(failure(errors.OperationalError(code, "lost")))
    assert not connection_lost(failure(errors.OperationalError(1205, "Lock wait timeout")))
    assert not connection_lost(failure(errors.ProgrammingError(1064, "syntax")))


async def test_a_lease_statement_a_deadlock_rolled_back_runs_again() -> None:
    """InnoDB rolls back a statement it picked as a deadlock's victim: in autocommit
    (lease statements) that statement is all there was, and runs again; inside a
    transaction (setting a position) the whole transaction is gone, so not."""
    from sqlalchemy.exc import OperationalError

    from broadcast_history.log import _consumers_mysql

    class Deadlocking:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0

        async def execute(self, statement: object, params: object) -> str:
            self.calls += 1
            if self.calls <= self.failures:
                raise OperationalError("UPDATE ...", {}, Exception(1213, "Deadlock found"))
            return "done"

    conn = Deadlocking(2)
    assert await _consumers_mysql._write(conn, "UPDATE", {}) == "done"  # type: ignore[arg-type]
    assert conn.calls == 3
    with pytest.raises(OperationalError):
        await _consumers_mysql._write(Deadlocking(1), "UPDATE", {}, alone=False)  # type: ignore[arg-type]
    with pytest.raises(OperationalError):  # not forever
        await _consumers_mysql._write(Deadlocking(99), "UPDATE", {})  # type: ignore[arg-type]


async def test_a_publish_that_reached_no_server_says_nothing_was_stored(
    silent_log: tuple[CuttableProxy, Broadcast],
) -> None:
    """A publish that could not get a connection to the log (refused, or the server
    starting up after a restart) said "the publish may or may not be stored", as one
    whose connection died after sending it does: an app could not tell a failure to
    retry freely from one to retry with the same key (a probe: 5,000 of 5,000 over
    real restarts, none stored)."""
    await publish_through_a_cut(*silent_log, unique())
