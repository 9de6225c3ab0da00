"""Postgres specifics: the LISTEN/NOTIFY transport and the one-statement log append."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from broadcast_history import Broadcast, Event, EventLog, NotConnected, TransportError, _envelope
from broadcast_history._event import NOTICE
from broadcast_history.backends import backend_from_url
from broadcast_history.backends.memory import MemoryBackend
from broadcast_history.backends.postgres import PostgresBackend, channel_identifier
from broadcast_history.log import _queries
from broadcast_history.log._postgres import _bounded_page
from tests.conftest import unique
from tests.support.helpers import assert_contiguous, take
from tests.support.postgres_support import database_url, ensure_database

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
async def pg_url() -> str:
    """A database of these tests only (never truncated by the shared fixtures)."""
    return await ensure_database("bh_test_postgres")


@pytest.fixture
async def backend(pg_url: str) -> AsyncIterator[PostgresBackend]:
    made = PostgresBackend(pg_url)
    await made.connect()
    yield made
    await made.disconnect()


async def next_events(backend: PostgresBackend, count: int) -> list[tuple[str, str]]:
    async def collect() -> list[tuple[str, str]]:
        return [
            (event.channel, event.message)
            for event in [await backend.next_published() for _ in range(count)]
        ]

    return await asyncio.wait_for(collect(), 10)


# -- transport -------------------------------------------------------------------------


def test_url_schemes_select_postgres_backend() -> None:
    for url in ("postgres://localhost/db", "postgresql://localhost/db"):
        assert isinstance(backend_from_url(url), PostgresBackend)
    assert PostgresBackend.max_message_size is not None
    assert PostgresBackend.max_message_size < 8000


def test_channel_identifiers_fit_postgres_names() -> None:
    names = ["a", "x" * 255, "ü ñ 漢字 " * 30, "with space", "Upper"]
    idents = {channel_identifier(name) for name in names}
    assert len(idents) == len(names)
    for ident in idents:
        assert len(ident.encode()) <= 63 and ident == ident.lower() and ident.isascii()
    assert channel_identifier("a") == channel_identifier("a")


@pytest.mark.parametrize(
    "channel", ["x" * 255, "ünïcødé 漢字 " + "é" * 200, "spaces and / slashes ?"]
)
async def test_odd_channel_names_round_trip(backend: PostgresBackend, channel: str) -> None:
    channel = channel[:-12] + unique("")[-12:]
    await backend.subscribe(channel)
    await backend.publish(channel, "hello")
    assert await next_events(backend, 1) == [(channel, "hello")]


async def test_publish_many_keeps_order(backend: PostgresBackend) -> None:
    first, second = unique(), unique()
    await backend.subscribe(first)
    await backend.subscribe(second)
    messages = [(first if i % 2 else second, f"m{i}") for i in range(50)]
    await backend.publish_many(messages)
    assert await next_events(backend, 50) == messages


async def test_unsubscribe_one_channel_among_many(backend: PostgresBackend) -> None:
    channels = [unique() for _ in range(5)]
    for channel in channels:
        await backend.subscribe(channel)
    await backend.unsubscribe(channels[2])
    await backend.publish_many([(channel, channel) for channel in channels])
    kept = [channel for channel in channels if channel != channels[2]]
    assert await next_events(backend, 4) == [(channel, channel) for channel in kept]
    # Subscribing again works and the others are untouched.
    await backend.subscribe(channels[2])
    await backend.publish(channels[2], "again")
    await backend.publish(channels[0], "still")
    assert await next_events(backend, 2) == [(channels[2], "again"), (channels[0], "still")]


async def test_disconnect_wakes_next_published(backend: PostgresBackend) -> None:
    waiter = asyncio.create_task(backend.next_published())
    await asyncio.sleep(0.05)
    await backend.disconnect()
    with pytest.raises(NotConnected):
        await asyncio.wait_for(waiter, 5)
    assert not backend.connected


async def test_connect_twice_and_disconnect_twice(pg_url: str) -> None:
    made = PostgresBackend(pg_url)
    await made.connect()
    await made.connect()
    assert made.connected
    await made.disconnect()
    await made.disconnect()
    assert not made.connected


async def test_unreachable_database_raises_transport_error() -> None:
    made = PostgresBackend(database_url("bh_no_such_database"))
    with pytest.raises(TransportError):
        await made.connect()


async def test_large_payload_travels_as_notice_and_is_read_from_log(pg_url: str) -> None:
    log_url = pg_url.replace("postgresql://", "postgresql+asyncpg://")
    channel = "große Nachricht " + unique()
    big = "ü" * 9000  # 18000 UTF-8 bytes: over NOTIFY's limit
    async with (
        Broadcast(pg_url, log=log_url) as broadcast,
        broadcast.subscribe(channel) as subscriber,
    ):
        # Watch the raw envelopes too, to see the notice on the wire.
        raw = PostgresBackend(pg_url)
        await raw.connect()
        try:
            await raw.subscribe(channel)
            small = await broadcast.publish(channel, "small")
            large = await broadcast.publish(channel, big)
            binary = await broadcast.publish(channel, bytes(range(256)) * 40)
            got = await take(subscriber, 3)
            wire: list[str] = []
            records: list[Event] = []
            while len(records) < 3:  # envelopes may carry several events
                wire += [message for _, message in await next_events(raw, 1)]
                records += _envelope.decode(channel, wire[-1], broadcast.log.log_id)
        finally:
            await raw.disconnect()
    assert got == [small, large, binary]
    assert got[1].message == big and got[2].message == bytes(range(256)) * 40
    assert all(len(message.encode()) < 8000 for message in wire)
    assert [record.offset for record in records] == [1, 2, 3]
    assert records[0].message == "small"
    assert records[1].message is NOTICE and records[2].message is NOTICE


async def test_live_delivery_between_two_broadcasts(pg_url: str) -> None:
    log_url = pg_url.replace("postgresql://", "postgresql+asyncpg://")
    channel = unique()
    async with Broadcast(pg_url, log=log_url) as sender, Broadcast(pg_url, log=log_url) as receiver:
        async with receiver.subscribe(channel) as subscriber:
            published = await asyncio.gather(
                *(sender.publish(channel, f"m{i}") for i in range(200))
            )
            got = await take(subscriber, 200)
        assert receiver.transport_connected
    assert_contiguous(got, 1, 200)
    assert sorted(published, key=lambda e: e.offset) == got


# -- log ---------------------------------------------------------------------------------


async def test_log_concurrency_many_broadcasts_gap_free(pg_url: str) -> None:
    """8 broadcasts (own engines, like 8 hosts) x 50 publishers on one Postgres log."""
    log_url = pg_url.replace("postgresql://", "postgresql+asyncpg://")
    channel, other = unique(), unique()
    broadcasts = [Broadcast(backend=MemoryBackend(), log=log_url) for _ in range(8)]
    for broadcast in broadcasts:
        await broadcast.connect()
    try:

        async def publisher(broadcast: Broadcast, n: int) -> list[tuple[int, str]]:
            done = []
            for i in range(4):
                # Every other message also touches a second channel in the same batch.
                target = other if (n + i) % 2 else channel
                event = await broadcast.publish(target, f"{n}-{i}")
                done.append((event.offset, f"{target}:{n}-{i}"))
            return done

        results = await asyncio.gather(
            *(publisher(b, n) for n, b in zip(range(400), itertools.cycle(broadcasts)))
        )
        reader = broadcasts[0].log
        stored = await reader.read(channel, after=0, limit=10_000)
        stored_other = await reader.read(other, after=0, limit=10_000)
    finally:
        for broadcast in broadcasts:
            await broadcast.disconnect()
    assert len(stored) + len(stored_other) == 1600
    assert_contiguous(stored, 1, len(stored))
    assert_contiguous(stored_other, 1, len(stored_other))
    for events in (stored, stored_other):
        stamps = [event.timestamp for event in events]
        assert stamps == sorted(stamps)
        assert len({event.epoch for event in events}) == 1
    returned = {text: offset for result in results for offset, text in result}
    assert returned == {f"{e.channel}:{e.message}": e.offset for e in stored + stored_other}


async def test_idempotency_key_race_between_hosts(pg_url: str) -> None:
    log_url = pg_url.replace("postgresql://", "postgresql+asyncpg://")
    channel = unique()
    logs = [EventLog(log_url) for _ in range(4)]
    for log in logs:
        await log.connect()
    try:
        broadcasts = [Broadcast(backend=MemoryBackend(), log=log) for log in logs]
        for broadcast in broadcasts:
            await broadcast.connect()
        results = await asyncio.gather(
            *(
                broadcast.publish(channel, f"try {n}", key=f"k{n % 5}")
                for n, broadcast in zip(range(80), itertools.cycle(broadcasts))
            )
        )
        stored = await logs[0].read(channel, after=0)
        for broadcast in broadcasts:
            await broadcast.disconnect()
    finally:
        for log in logs:
            await log.disconnect()
    assert_contiguous(stored, 1, 5)
    by_key = {event.key: event for event in stored}
    assert all(result == by_key[result.key] for result in results)


async def test_append_mixed_batch_in_input_order(pg_url: str) -> None:
    from broadcast_history.log import Pending

    log = EventLog(pg_url.replace("postgresql://", "postgresql+asyncpg://"))
    await log.connect()
    try:
        a, b = unique(), "ü " + unique()
        first = await log.append(
            [Pending(a, "a1", None), Pending(b, b"b1", "k"), Pending(a, "a2", "k")]
        )
        again = await log.append(
            [
                Pending(b, b"ignored", "k"),
                Pending(a, "a3", None),
                Pending(a, "x", "k"),
                Pending(a, "a4", "n"),
                Pending(a, "y", "n"),
            ]
        )
        info = await log.channel(a)
    finally:
        await log.disconnect()
    assert [(e.channel, e.message, e.offset) for e in first] == [
        (a, "a1", 1),
        (b, b"b1", 1),
        (a, "a2", 2),
    ]
    assert again[0] == first[1] and again[2] == first[2]
    assert [(e.message, e.offset) for e in again] == [
        (b"b1", 1),
        ("a3", 3),
        ("a2", 2),
        ("a4", 4),
        ("a4", 4),
    ]
    assert info is not None and info.last_offset == 4


async def test_append_stores_each_payload_as_its_slice_of_the_batch(pg_url: str) -> None:
    # The batch's payloads travel as one bytea; each row stores its own slice.
    from broadcast_history.log import Pending

    log = EventLog(pg_url.replace("postgresql://", "postgresql+asyncpg://"))
    await log.connect()
    a, b, c = unique(), unique(), unique()
    messages: list[tuple[str, str | bytes]] = [
        (a, ""),
        (b, b""),
        (a, "ü 漢字 🙂"),
        (c, b"\x00\xff\x00"),
        (a, "x" * 100_000),
        (b, "plain"),
        (a, b"\x00"),
        (c, ""),
    ]
    try:
        returned = await log.append([Pending(ch, m, None) for ch, m in messages])
        stored = {ch: await log.read(ch) for ch in (a, b, c)}
    finally:
        await log.disconnect()
    assert [(e.channel, e.message) for e in returned] == messages
    for channel in (a, b, c):
        mine = [m for ch, m in messages if ch == channel]
        assert [e.message for e in stored[channel]] == mine
        assert [type(e.message) for e in stored[channel]] == [type(m) for m in mine]
        assert [e.offset for e in stored[channel]] == list(range(1, len(mine) + 1))


async def test_delete_and_trim_racing_appends_leave_consistent_channels(pg_url: str) -> None:
    """Deletes and trims from one host while another appends: no event is left without
    its channel row or outside the channel's bounds, and no append fails."""
    import asyncpg

    from broadcast_history.log import Pending

    log_url = pg_url.replace("postgresql://", "postgresql+asyncpg://")
    channels = [unique() for _ in range(4)]
    writer, admin = EventLog(log_url), EventLog(log_url)
    await writer.connect()
    await admin.connect()
    stop = asyncio.Event()
    try:

        async def append(channel: str) -> int:
            done = 0
            while not stop.is_set():
                await writer.append([Pending(channel, f"m{done}", None)] * 3)
                done += 1
            return done

        async def churn() -> None:
            for i in range(60):
                channel = channels[i % len(channels)]
                if i % 3:
                    info = await admin.channel(channel)
                    if info is not None:
                        await admin.trim(channel, before=info.last_offset)
                else:
                    await admin.delete_channel(channel)
                await asyncio.sleep(0.005)
            stop.set()

        counts = await asyncio.wait_for(
            asyncio.gather(churn(), *(append(channel) for channel in channels)), 60
        )
    finally:
        await writer.disconnect()
        await admin.disconnect()
    assert all(count > 0 for count in counts[1:])
    conn = await asyncpg.connect(pg_url)
    try:
        bad = await conn.fetch(
            'SELECT e.channel, e."offset", c.first_offset, c.last_offset'
            " FROM broadcast_events e LEFT JOIN broadcast_channels c ON c.name = e.channel"
            " WHERE e.channel = ANY($1::varchar[]) AND (c.name IS NULL"
            ' OR e."offset" < c.first_offset OR e."offset" > c.last_offset)',
            channels,
        )
        rows = await conn.fetch(
            'SELECT c.first_offset, c.last_offset, count(e."offset") AS n'
            " FROM broadcast_channels c LEFT JOIN broadcast_events e ON e.channel = c.name"
            " WHERE c.name = ANY($1::varchar[]) GROUP BY c.name, c.first_offset, c.last_offset",
            channels,
        )
    finally:
        await conn.close()
    assert [dict(row) for row in bad] == []
    for row in rows:
        assert row["n"] == row["last_offset"] - row["first_offset"] + 1


def test_a_transport_given_as_an_instance_survives_a_loop_ended_without_disconnect(
    tmp_path: Path,
) -> None:
    """The transport's disconnect, called from the next loop, failed on the ended
    loop's task before letting go of its connections: the next live sends went to
    the ended loop's connection and failed, and its server sessions stayed open."""
    import asyncpg

    url = asyncio.run(ensure_database("bh_test_pg_loops"))
    log = f"sqlite+aiosqlite:///{tmp_path / 'loops.db'}"
    broadcast = Broadcast(backend=PostgresBackend(url), log=log)

    async def sessions() -> int:
        admin = await asyncpg.connect(database_url("postgres"))
        try:
            name = url.rsplit("/", 1)[1]
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
            return int(await admin.fetchval(query, name))
        finally:
            await admin.close()

    async def left_connected() -> None:
        await broadcast.connect()
        await broadcast.publish("c", "one")  # opens the publishing connection

    async def used_again() -> None:
        await broadcast.connect()
        try:
            for i in range(3):
                await broadcast.publish("c", f"n{i}")
                await asyncio.sleep(0.05)
            assert broadcast.stats.live_send_failures == 0
        finally:
            await broadcast.disconnect()
        for _ in range(100):  # the server ends the sessions as it sees the sockets shut
            if await sessions() == 0:
                break
            await asyncio.sleep(0.05)
        assert await sessions() == 0

    asyncio.run(left_connected())
    asyncio.run(used_again())


async def test_a_page_read_sorts_only_the_page_whatever_the_plan() -> None:
    """With the running sum that bounds a page in bytes in the SELECT of its LIMIT, a
    plan that does not read the index in order (statistics gone stale after a bulk
    load) sorted every event of the channel, spilling to disk, before the LIMIT: 0.3
    to 1.1 s a page of a million-event channel, against 2 to 30 ms. The page is now
    taken first, so that sort keeps only the page (a top-N heapsort)."""
    url = await ensure_database("bh_test_pages")
    async with Broadcast("memory://", log=url.replace("postgresql:", "postgresql+asyncpg:")) as b:
        channel = unique()
        await asyncio.gather(*(b.publish(channel, "x" * 100) for _ in range(3000)))
    compiled = _bounded_page().compile(dialect=asyncpg_dialect())
    values = {"channel": channel, "after": 0, "limit": 100, "max_bytes": 8 << 20}
    assert compiled.positiontup is not None
    args = [values[name] for name in compiled.positiontup]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET enable_indexscan = off; SET enable_indexonlyscan = off")
        explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}", *args)
        [plan] = json.loads(explained)
    finally:
        await conn.close()

    def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    sorts = [n for n in nodes(plan["Plan"]) if n["Node Type"] == "Sort"]
    assert sorts, plan  # the plan the test forces: no index read in order
    assert {n["Sort Method"] for n in sorts} == {"top-N heapsort"}, sorts


async def test_a_log_that_cannot_be_opened_says_why_in_the_drivers_words(pg_url: str) -> None:
    """The error carried SQLAlchemy's wrapping: its class names and a link to its error
    page on a line of its own ("(Background on this error at: https://sqlalche.me/...")."""
    from broadcast_history import LogUnavailable

    missing = database_url("bh_no_such_database").replace("postgresql://", "postgresql+asyncpg://")
    with pytest.raises(LogUnavailable) as failed:
        await Broadcast(log=missing, migrate=False).connect()
    assert str(failed.value) == (
        'cannot open the event log: database "bh_no_such_database" does not exist'
    )


async def test_a_prefix_is_exact_under_a_collation_that_is_not_by_code_point() -> None:
    """A prefix reads a range of the primary key where names sort by code point. Under
    a linguistic collation (ICU here; en_US.UTF-8 alike), of the database or of the
    column, the names under a prefix are not one range of that order: there it reads
    them all, and is exact either way. A database not in UTF-8 cannot hold the
    range's bound (a review found both)."""
    icu = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    names = ["a", "a-b", "a.", "ab", "aB", "A-b", "Ab", "b", "á", "a\u0301x", "a\U0010ffff"]
    prefixes = ["a", "a-", "a.", "A", "á", "a\u0301", "a\U0010ffff", "b", "c"]
    latin1 = "TEMPLATE template0 ENCODING 'LATIN1' LOCALE 'C'"
    column = await ensure_database("bh_test_column_collation")
    async with Broadcast(log=column):  # the schema, then the column's own collation
        pass
    conn = await asyncpg.connect(column)
    try:
        await conn.execute(
            "ALTER TABLE broadcast_channels ALTER COLUMN name TYPE varchar(255)"
            ' COLLATE "en-US-x-icu"'
        )
    finally:
        await conn.close()
    for url, by_code_point, names, prefixes in [
        (await ensure_database("bh_test_icu", options=icu), False, names, prefixes),
        (column, False, names, prefixes),
        (await ensure_database("bh_test_latin1", options=latin1), False, ["ÿa", "ÿ", "y"], ["ÿ"]),
        (await ensure_database("bh_test_code_point"), True, names, prefixes),
    ]:
        async with Broadcast(log=url) as broadcast:
            for name in names:
                await broadcast.publish(name, "x")
            async with broadcast.log._store.engine.connect() as conn:  # type: ignore[attr-defined]
                assert await _queries._ordered_by_code_point(conn) is by_code_point, url
            for prefix in prefixes:
                found = [c.name for c in await broadcast.log.channels(prefix=prefix, limit=50)]
                assert sorted(found) == sorted(n for n in names if n.startswith(prefix)), url
