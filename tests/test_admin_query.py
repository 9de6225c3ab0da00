"""The admin query layer (HistoryAdmin) on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine

from broadcast_history import (
    Broadcast,
    HistoryTruncated,
    InvalidArgument,
    Retention,
    StreamReset,
)
from broadcast_history.admin import (
    ChannelNotFound,
    EventNotFound,
    HistoryAdmin,
    ImportConflict,
    InvalidExport,
    _jsonl,
)
from broadcast_history.log import ChannelInfo, _log, _queries
from tests.support.admin_support import LOG_KINDS, fresh_log_url

ODD = "a/b c é"


@pytest.fixture(params=LOG_KINDS)
async def broadcast(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broadcast]:
    url = await fresh_log_url(request.param, tmp_path)
    async with Broadcast("memory://", log=url, retention=Retention(max_events=50)) as b:
        yield b


@pytest.fixture
def admin(broadcast: Broadcast) -> HistoryAdmin:
    return HistoryAdmin.of(broadcast)


async def collect(lines: AsyncIterator[str]) -> list[str]:
    return [line async for line in lines]


def test_all_is_pinned() -> None:
    import broadcast_history.admin as admin_module

    assert sorted(admin_module.__all__) == [
        "ChannelNotFound",
        "ChannelPage",
        "ChannelStats",
        "ConsumerInfo",
        "ConsumerNotFound",
        "EventNotFound",
        "EventPage",
        "HistoryAdmin",
        "ImportConflict",
        "ImportResult",
        "InvalidExport",
        "NotFound",
        "RetentionStats",
        "create_app",
        "event_json",
    ]


async def test_channel_stats(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    published = [await broadcast.publish(ODD, f"m{i}") for i in range(3)]
    stats = await admin.channel(ODD)
    assert (stats.name, stats.epoch) == (ODD, published[0].epoch)
    assert (stats.first_offset, stats.last_offset, stats.count, stats.trimmed) == (1, 3, 3, 0)
    assert stats.first_timestamp == published[0].timestamp
    assert stats.last_timestamp == published[-1].timestamp

    await admin.trim(ODD, before=3)
    stats = await admin.channel(ODD)
    assert (stats.first_offset, stats.count, stats.trimmed) == (3, 1, 2)
    assert stats.first_timestamp == published[2].timestamp
    assert stats.trimmed_timestamp == published[1].timestamp

    with pytest.raises(ChannelNotFound):
        await admin.channel("nope")
    with pytest.raises(InvalidArgument):
        await admin.channel("bad\x00name")


async def test_channels_prefix_and_cursor(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    names = [f"p:{i}" for i in range(5)] + ["q:0", "p%x", "p_y", "P:upper", "é:x", "É:y"]
    for name in names:
        await broadcast.publish(name, "x")
    seen: list[str] = []
    after = None
    while True:
        page = await admin.channels(prefix="p:", after=after, limit=2)
        assert len(page.channels) <= 2
        seen += [c.name for c in page.channels]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert seen == [f"p:{i}" for i in range(5)]
    # LIKE wildcards in a prefix are literal.
    assert [c.name for c in (await admin.channels(prefix="p%")).channels] == ["p%x"]
    assert [c.name for c in (await admin.channels(prefix="p_")).channels] == ["p_y"]
    # A prefix is exact, case included (SQLite's LIKE folds ASCII case).
    assert [c.name for c in (await admin.channels(prefix="P:")).channels] == ["P:upper"]
    assert [c.name for c in (await admin.channels(prefix="é")).channels] == ["é:x"]
    assert len(await collect(admin.export_jsonl(prefix="P"))) == 3  # and the end line
    everything = await admin.channels(limit=100)
    assert len(everything.channels) == len(names) and everything.next_cursor is None
    with pytest.raises(InvalidArgument):
        await admin.channels(limit=0)
    with pytest.raises(InvalidArgument):
        await admin.channels(prefix="x\x00")


async def test_a_prefix_reads_its_range_of_names(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    """A prefix reads its range of the primary key (a rare one scanned every channel
    row: 50-270 ms among a million); the range is exact at both ends, at the highest
    code point and next to the surrogates too."""
    top, hangul = chr(sys.maxunicode), chr(0xD7FF)
    names = ["a", "a" + top, "a" + top + "z", "a" + top * 2, "b", "b!", "B", "Ab"]
    names += [hangul, hangul + "x", chr(0xE000), top, top + "a", top * 3, "ab", "a%"]
    for name in names:
        await broadcast.publish(name, "x")
    for prefix in ["a", "a" + top, "a" + top * 2, "b", hangul, top, top * 2, "a%", "A"]:
        found = [c.name async for c in admin.all_channels(prefix=prefix)]
        assert sorted(found) == sorted(n for n in names if n.startswith(prefix)), prefix
    if broadcast.log.url.get_backend_name() == "sqlite":
        plans: list[str] = []

        def explain(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if statement.startswith("SELECT") and " LIKE " in statement:
                found = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
                plans.extend(str(row[-1]) for row in found)

        # On every engine: SQLite's readers have engines of their own.
        sa_event.listen(Engine, "after_cursor_execute", explain)
        try:
            await admin.channels(prefix="b")
        finally:
            sa_event.remove(Engine, "after_cursor_execute", explain)
        assert any("(name>? AND name<?)" in plan for plan in plans), plans


async def test_events_pages_both_ways(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    for i in range(1, 8):
        await broadcast.publish("chat", f"m{i}")
    offsets: list[int] = []
    after = None
    while True:
        page = await admin.events("chat", after=after, limit=3)
        offsets += [e.offset for e in page.events]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert offsets == [1, 2, 3, 4, 5, 6, 7]

    offsets, before = [], None
    while True:
        page = await admin.events("chat", before=before, limit=3, order="desc")
        offsets += [e.offset for e in page.events]
        if page.next_cursor is None:
            break
        before = page.next_cursor
    assert offsets == [7, 6, 5, 4, 3, 2, 1]

    page = await admin.events("chat", after=2, before=6)
    assert [e.offset for e in page.events] == [3, 4, 5]
    assert page.next_cursor is None
    # Exactly `limit` left: no next page.
    assert (await admin.events("chat", after=4, limit=3)).next_cursor is None


async def test_events_by_time(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    first = [await broadcast.publish("t", f"a{i}") for i in range(3)]
    await asyncio.sleep(0.01)
    middle = datetime.now(timezone.utc)
    await asyncio.sleep(0.01)
    later = [await broadcast.publish("t", f"b{i}") for i in range(3)]
    page = await admin.events("t", since=middle)
    assert [e.offset for e in page.events] == [e.offset for e in later]
    page = await admin.events("t", until=middle, order="desc")
    assert [e.offset for e in page.events] == [3, 2, 1]
    page = await admin.events("t", since=first[1].timestamp, until=later[1].timestamp)
    assert [e.offset for e in page.events] == [2, 3, 4]
    # A time window and a cursor together.
    page = await admin.events("t", since=first[1].timestamp, limit=2)
    page = await admin.events("t", since=first[1].timestamp, after=page.next_cursor, limit=2)
    assert [e.offset for e in page.events] == [4, 5]


@pytest.mark.parametrize("kind", LOG_KINDS)
async def test_times_find_events_across_the_sparse_time_index(kind: str, tmp_path: Path) -> None:
    """Only every 64th offset is in the time index: lookups by time land on the right
    event wherever it falls between two indexed ones (repeated timestamps, gaps, a
    trimmed start, a time before, between and after everything)."""
    async with Broadcast(log=await fresh_log_url(kind, tmp_path)) as broadcast:  # no retention
        await _check_times(broadcast, HistoryAdmin.of(broadcast))


async def _check_times(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    # Offsets 37..600: runs of one to five events per timestamp, gaps between runs.
    first_offset, last_offset = 37, 600
    stamps, micros = [], 0
    for offset in range(first_offset, last_offset + 1):
        if offset % 5 in (0, 3):
            micros += 7 + offset % 11
        stamps.append(base + timedelta(microseconds=micros))

    def line(value: dict[str, object]) -> str:
        return json.dumps(value)

    lines = [
        line(
            {"type": "channel", "format": 1, "name": "times", "epoch": 9,
             "first_offset": first_offset, "last_offset": last_offset,
             "last_timestamp": stamps[-1].isoformat(), "trimmed_timestamp": None}
        )
    ] + [
        line(
            {"type": "event", "channel": "times", "offset": offset, "epoch": 9,
             "timestamp": stamp.isoformat(), "key": None, "encoding": "text",
             "message": str(offset)}
        )
        for offset, stamp in zip(range(first_offset, last_offset + 1), stamps, strict=True)
    ]  # fmt: skip
    await admin.import_jsonl(lines)
    stored = list(zip(range(first_offset, last_offset + 1), stamps, strict=True))

    def expected_first(moment: datetime) -> int | None:
        return next((offset for offset, stamp in stored if stamp >= moment), None)

    probes = sorted({s + timedelta(microseconds=d) for s in stamps[::3] for d in (-1, 0, 1)})
    probes += [base - timedelta(days=1), stamps[-1] + timedelta(microseconds=1)]
    for moment in probes:
        assert await broadcast.log.offset_at("times", moment) == expected_first(moment), moment
    for since, until in zip(probes[::17], probes[40::17], strict=False):
        want = [offset for offset, stamp in stored if since <= stamp < until]
        page = await broadcast.log.read("times", since=since, until=until, limit=1000)
        assert [e.offset for e in page] == want
        page = await broadcast.log.read("times", until=until, order="desc", limit=5)
        assert [e.offset for e in page] == [o for o, s in stored if s < until][::-1][:5]


async def test_time_lookups_seek_the_sparse_index_on_sqlite(tmp_path: Path) -> None:
    """The plans behind the previous test: one seek in the time index, then a short
    range of the primary key (not a scan of the channel)."""
    path = tmp_path / "plans.db"
    async with Broadcast(log=f"sqlite+aiosqlite:///{path}"):
        pass
    dialect = sqlite.dialect()
    queries = [
        _queries.offset_at_query("c", 5, time_marks=True),
        _queries.events_query("c", since_us=5, limit=10, time_marks=True),
        _queries.events_query("c", until_us=9, limit=10, descending=True, time_marks=True),
    ]
    with sqlite3.connect(path) as raw:
        for query in queries:
            sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
            plan = " | ".join(row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}"))
            assert "USING COVERING INDEX ix_broadcast_events_time (channel=? AND" in plan, plan
            assert re.search(r"USING INDEX \w+ \(channel=\? AND offset[<>]\?\)", plan), plan


async def test_events_bad_parameters(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    await broadcast.publish("c", "x")
    with pytest.raises(ChannelNotFound):
        await admin.events("missing")
    for bad in (
        {"limit": 0},
        {"limit": 10**6},
        {"after": -1},
        {"before": 2**64},
        {"order": "up"},
        {"since": datetime(2024, 1, 1)},  # naive
    ):
        with pytest.raises(InvalidArgument):
            await admin.events("c", **bad)  # type: ignore[arg-type]


async def test_one_event(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    events = [await broadcast.publish("one", b"\x00\xff" * i) for i in range(1, 4)]
    assert await admin.event("one", 2) == events[1]
    await admin.trim("one", before=2)
    with pytest.raises(EventNotFound, match="trimmed"):
        await admin.event("one", 1)
    with pytest.raises(EventNotFound):
        await admin.event("one", 9)
    with pytest.raises(ChannelNotFound):
        await admin.event("none", 1)


async def test_the_log_reads_events_at_offsets(broadcast: Broadcast) -> None:
    # EventLog.read_at: what the broadcast checks kept replay pages with, many at once.
    events = [await broadcast.publish(ODD, b"\x00" if i % 2 else f"m{i}") for i in range(6)]
    await broadcast.publish("other", "x")
    got = await broadcast.log.read_at(ODD, [5, 1, 3, 99, 1])
    assert got == [events[0], events[2], events[4]]
    assert await broadcast.log.read_at(ODD, []) == []
    # More offsets than one statement takes: asked in several queries.
    assert await broadcast.log.read_at(ODD, range(1, 2000)) == events
    assert await broadcast.log.read_at("none", [1]) == []


async def test_lookups_over_any_number_of_names_take_a_few_statement_shapes(
    broadcast: Broadcast,
) -> None:
    # An IN list of each length is a statement text of its own, which drivers prepare
    # and keep per connection (and Postgres's server with them): lists of 1 to 200
    # names or offsets are padded to one of 8 lengths.
    texts: set[str] = set()

    def ran(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if " IN (" in statement.upper():
            texts.add(statement)

    names = [f"shape-{n}" for n in range(200)]
    for name in (names[0], names[0], names[1]):
        await broadcast.publish(name, "m")
    # On every engine: SQLite's readers have engines of their own.
    sa_event.listen(Engine, "before_cursor_execute", ran)
    try:
        for size in range(1, len(names) + 1):
            found = await broadcast.log.channels_named(names[:size])
            assert sorted(found) == names[: min(size, 2)]
            got = await broadcast.log.read_at(names[0], range(1, size + 1))
            assert [e.offset for e in got] == [1, 2][:size]
    finally:
        sa_event.remove(Engine, "before_cursor_execute", ran)
    assert 0 < len(texts) <= 2 * 8 + 2, sorted(texts)


async def test_retention_stats_and_trim_by_time(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    empty = await admin.retention_stats()
    assert (empty.channels, empty.events, empty.trimmed) == (0, 0, 0)
    assert empty.oldest_timestamp is None and empty.max_events == 50
    old = [await broadcast.publish("r1", f"{i}") for i in range(4)]
    await asyncio.sleep(0.01)
    cut = datetime.now(timezone.utc)
    await broadcast.publish("r1", "new")
    await broadcast.publish("r2", "x")
    assert await admin.trim("r1", before_time=cut) == 4
    assert await admin.trim("r1", before_time=cut - timedelta(days=1)) == 0
    stats = await admin.retention_stats()
    assert (stats.channels, stats.events, stats.trimmed) == (2, 2, 4)
    assert stats.oldest_timestamp is not None and stats.oldest_timestamp > old[-1].timestamp
    with pytest.raises(InvalidArgument):
        await admin.trim("r1")
    with pytest.raises(ChannelNotFound):
        await admin.trim("zz", before=1)


async def test_delete_then_new_epoch(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    before = await broadcast.publish(ODD, "x")
    await admin.delete(ODD)
    with pytest.raises(ChannelNotFound):
        await admin.channel(ODD)
    with pytest.raises(ChannelNotFound):
        await admin.delete(ODD)
    after = await broadcast.publish(ODD, "y")
    assert after.offset == 1 and after.epoch != before.epoch


@pytest.mark.parametrize("operation", ["trim", "delete"])
async def test_a_big_trim_or_delete_lets_publishes_in_between(
    operation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manual trim or delete ran as one transaction: of a million events, it held
    SQLite's write lock for seconds and every publish waited (at about ten million,
    past the 30 s busy timeout: they failed). It runs a slice at a time, as retention
    does, and publishes commit between slices."""
    monkeypatch.setattr(_log, "RETENTION_SLICE", 10)
    slices = 0
    trim_slice = _log.EventLog._trim_slice

    async def counted(*args: Any, **kwargs: Any) -> int:
        nonlocal slices
        slices += 1
        return await trim_slice(*args, **kwargs)

    monkeypatch.setattr(_log.EventLog, "_trim_slice", counted)
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    async with Broadcast("memory://", log=log) as broadcast:
        await asyncio.gather(*(broadcast.publish("big", str(i)) for i in range(3000)))
        if operation == "trim":
            removing = asyncio.create_task(broadcast.log.trim("big", before=2001))
        else:
            removing = asyncio.create_task(broadcast.log.delete_channel("big"))
        while (info := await broadcast.log.channel("big")) is not None and info.first_offset == 1:
            assert not removing.done(), "removed in one transaction"
            await asyncio.sleep(0)
        # Over 64 KiB: committed by the writer thread, which polls for the lock
        # (SQLite's busy handler sleeps 1, 2, 5, 10 ms... between tries), where the
        # removal took it back at once: the publish waited for several slices.
        slices_before = slices
        await broadcast.publish("other", "between two slices" * 4000)
        assert not removing.done()
        assert slices - slices_before <= 1, "the publish waited for more than one slice"
        removed = await removing
    assert removed == (2000 if operation == "trim" else True)


async def test_export_import_round_trip(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    payloads: list[str | bytes] = ["héllo", b"\x00\x01\xfe\xff", "", b"", "line\nbreak"]
    for i, payload in enumerate(payloads):
        await broadcast.publish(ODD, payload, key=f"k{i}")
    for i in range(4):
        await broadcast.publish("other", f"o{i}")
    await admin.trim("other", before=3)
    exported = await collect(admin.export_jsonl())
    assert all(line.endswith("\n") and line.isascii() for line in exported)

    async with Broadcast("memory://") as target:
        copy = HistoryAdmin.of(target)
        result = await copy.import_jsonl(exported)
        assert result.channels == ["a/b c é", "other"] and result.events == 7
        for name in (ODD, "other"):
            assert await copy.channel(name) == await admin.channel(name)
            assert (await copy.events(name)).events == (await admin.events(name)).events
        assert await collect(copy.export_jsonl()) == exported
        restored = (await copy.events(ODD)).events
        assert [e.message for e in restored] == payloads
        assert [type(e.message) for e in restored] == [type(p) for p in payloads]
        # Publishing goes on after the imported history, in the same epoch.
        nxt = await target.publish(ODD, "next")
        assert (nxt.offset, nxt.epoch) == (6, restored[0].epoch)
        assert (await target.publish(ODD, "dup", key="k1")).offset == 2

        # Importing again must not merge: nothing of the file is stored.
        await copy.delete("other")
        with pytest.raises(ImportConflict, match="already exists"):
            await copy.import_jsonl(exported)
        with pytest.raises(ChannelNotFound):
            await copy.channel("other")


async def test_export_fails_when_the_channel_changes_under_it(
    broadcast: Broadcast, admin: HistoryAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A channel deleted or trimmed to nothing mid-export ended the export without an
    error, its file short of the last_offset its channel line promised."""
    # Pages of a few events (bounded in bytes): short pages must not end the export.
    monkeypatch.setattr(_jsonl, "_PAGE_BYTES", 40)
    await asyncio.gather(*(broadcast.publish("c", f"message {i}") for i in range(50)))
    lines = await collect(admin.export_jsonl(["c"]))
    assert [json.loads(line)["offset"] for line in lines[1:-1]] == list(range(1, 51))

    async def export_then(change: str) -> None:
        count = 0
        async for _ in admin.export_jsonl(["c"]):
            count += 1
            if count == 10:
                if change == "delete":
                    await broadcast.log.delete_channel("c")
                    await asyncio.gather(*(broadcast.publish("c", "new") for _ in range(60)))
                else:
                    await broadcast.log.trim("c", before=10**6)

    for change, error in (("delete", StreamReset), ("trim", HistoryTruncated)):
        with pytest.raises(error, match="during the export"):
            await export_then(change)


async def test_export_takes_channels_as_listed_or_as_they_are_now(
    broadcast: Broadcast, admin: HistoryAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export of every channel read each one's state again before its events (two
    queries per channel, each compiled anew: 20,000 one-event channels took 46 s on
    SQLite, 66 s on Postgres; now 6 s and 5 s). It takes the listing's state, and
    the channel as it is now only if it changed since."""
    for name in ("a", "b", "c", "d", "e"):
        await asyncio.gather(*(broadcast.publish(name, f"{name}{i}") for i in range(3)))
    lookups: list[str] = []
    real_channel = broadcast.log.channel

    async def channel(name: str) -> object:
        lookups.append(name)
        return await real_channel(name)

    monkeypatch.setattr(broadcast.log, "channel", channel)
    exported: list[dict[str, object]] = []
    async for line in admin.export_jsonl():
        exported.append(json.loads(line))
        if len(exported) == 1:  # the listing is read: change the channels after "a"
            await broadcast.log.trim("b", before=3)
            await broadcast.log.delete_channel("c")
            await broadcast.log.delete_channel("d")
            await broadcast.publish("d", "new d")
            await broadcast.publish("e", "e3")  # after the listing: not in this export
    heads = [line for line in exported if line["type"] == "channel"]
    assert [(h["name"], h["first_offset"], h["last_offset"]) for h in heads] == [
        ("a", 1, 3),
        ("b", 3, 3),
        ("d", 1, 1),
        ("e", 1, 3),
    ]
    events = [(e["channel"], e["message"]) for e in exported if e["type"] == "event"]
    assert events == [("a", f"a{i}") for i in range(3)] + [("b", "b2"), ("d", "new d")] + [
        ("e", f"e{i}") for i in range(3)
    ]
    assert exported[-1] == {"type": "end", "format": 2, "channels": 4, "events": 8}
    assert lookups == ["b", "c", "d"]  # only those that changed

    async with Broadcast("memory://") as target:
        result = await HistoryAdmin.of(target).import_jsonl(json.dumps(e) for e in exported)
        assert result.channels == ["a", "b", "d", "e"] and result.events == 8


async def test_export_leaves_out_a_trimmed_channel_deleted_after_the_listing(
    broadcast: Broadcast, admin: HistoryAdmin
) -> None:
    """A channel whose events were all trimmed has nothing to read, so its deletion
    after the listing went unseen and the export brought it back (found by a review)."""
    for name in ("a", "b"):
        for i in range(3):
            await broadcast.publish(name, f"{name}{i}")
    await broadcast.log.trim("b", before=4)
    exported = []
    async for line in admin.export_jsonl():
        exported.append(json.loads(line))
        if len(exported) == 1:
            await broadcast.log.delete_channel("b")
    assert [line.get("name") for line in exported if line["type"] == "channel"] == ["a"]


async def test_export_reads_trimmed_channels_in_a_row_together(
    broadcast: Broadcast, admin: HistoryAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each channel whose events were all trimmed was read again on its own: ~1.5 ms
    each, a million per-session channels took half an hour. Those in a row are read
    a run at a time (a review: a whole page in one read got stale before its last
    ones were written), when the export reaches the first of the run."""
    monkeypatch.setattr(_jsonl, "RUN", 4)
    for name in ["a", *(f"t{i:02d}" for i in range(30)), "u", "v"]:
        await broadcast.publish(name, f"{name} 1")
        if name != "u":
            await broadcast.log.trim(name, before=2)
    await broadcast.publish("u", "u 2")
    asked: list[list[str]] = []
    real_named = broadcast.log.channels_named

    async def channels_named(names: list[str]) -> dict[str, ChannelInfo]:
        asked.append(sorted(names))
        return await real_named(names)

    async def no_channel(name: str) -> None:
        raise AssertionError(f"{name} read on its own")

    monkeypatch.setattr(broadcast.log, "channels_named", channels_named)
    monkeypatch.setattr(broadcast.log, "channel", no_channel)
    exported = []
    async for line in admin.export_jsonl():
        exported.append(json.loads(line))
        if exported[-1].get("name") == "t01":  # t05 is in the next run: not read yet
            await broadcast.log.delete_channel("t05")
        if exported[-1].get("name") == "u":  # v was listed trimmed: now it is not
            await broadcast.publish("v", "v 2")
    channel_lines = [line for line in exported if line["type"] == "channel"]
    heads = [(h["name"], h["first_offset"], h["last_offset"]) for h in channel_lines]
    assert heads[:2] == [("a", 2, 1), ("t00", 2, 1)] and len(heads) == 32
    assert heads[-3:] == [("t29", 2, 1), ("u", 1, 2), ("v", 2, 2)]
    assert "t05" not in [head[0] for head in heads]
    trimmed = [f"t{i:02d}" for i in range(30)]
    runs = [["a", *trimmed[:3]]] + [trimmed[i : i + 4] for i in range(3, 30, 4)]
    assert asked == [*runs, ["v"]]
    assert exported[-1] == {"type": "end", "format": 2, "channels": 32, "events": 3}


async def test_export_reads_a_long_run_of_trimmed_channels_again_once_stale(
    broadcast: Broadcast, admin: HistoryAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a run's read says is taken for its channels' state for a second at most:
    a slow reader of the export gets each as it was at most that long before."""
    # Staleness set by hand, not by the clock: a busy machine took more than a short
    # FRESH between the run's read and b.
    monkeypatch.setattr(_jsonl, "FRESH", 3600.0)
    for name in ("a", "b", "c"):
        await broadcast.publish(name, "1")
        await broadcast.log.trim(name, before=2)
    exported = []
    async for line in admin.export_jsonl():
        exported.append(json.loads(line))
        if exported[-1].get("name") == "a":
            await broadcast.log.delete_channel("b")  # read with a: still written
            await broadcast.log.delete_channel("c")
        if exported[-1].get("name") == "b":
            monkeypatch.setattr(_jsonl, "FRESH", 0.0)  # a slow reader: c is read again
    names = [line["name"] for line in exported if line["type"] == "channel"]
    assert names == ["a", "b"]


async def test_export_one_channel(broadcast: Broadcast, admin: HistoryAdmin) -> None:
    await broadcast.publish("x1", "a")
    await broadcast.publish("x2", "b")
    lines = await collect(admin.export_jsonl(["x2"]))
    assert [json.loads(line)["type"] for line in lines] == ["channel", "event", "end"]
    with pytest.raises(ChannelNotFound):
        await collect(admin.export_jsonl(["missing"]))
    assert len(await collect(admin.export_jsonl(prefix="x"))) == 5


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["not json"], "line 1: not JSON"),
        (["[1]"], "line 1: expected a JSON object"),
        (['{"type": "event", "channel": "c"}'], "must follow its channel"),
        (['{"type": "channel", "name": "", "epoch": 1}'], "line 1: channel must not be empty"),
        (
            [
                '{"type":"channel","name":"c","epoch":1,"first_offset":1,"last_offset":2}',
                '{"type":"event","channel":"c","offset":1,"epoch":1,'
                '"timestamp":"2024-01-01T00:00:00+00:00","encoding":"base64","message":"!!"}',
            ],
            "line 2: 'message' is not valid base64",
        ),
        (
            [
                '{"type":"channel","name":"c","epoch":1,"first_offset":1,"last_offset":2}',
                '{"type":"event","channel":"c","offset":2,"epoch":1,'
                '"timestamp":"2024-01-01T00:00:00+00:00","encoding":"text","message":"a"}',
                '{"type":"event","channel":"c","offset":1,"epoch":1,'
                '"timestamp":"2024-01-01T00:00:00+00:00","encoding":"text","message":"a"}',
            ],
            "line 2: events 1..1 of 'c' are missing",
        ),
        (
            [
                '{"type":"channel","name":"c","epoch":1,"first_offset":1,"last_offset":2}',
                '{"type":"event","channel":"c","offset":1,"epoch":1,'
                '"timestamp":"2024-01-01T00:00:00","encoding":"text","message":"a"}',
            ],
            "timezone",
        ),
    ],
)
async def test_import_rejects_malformed_lines(
    admin: HistoryAdmin, lines: list[str], match: str
) -> None:
    with pytest.raises(InvalidExport, match=match):
        await admin.import_jsonl(lines)
    assert (await admin.channels()).channels == []
