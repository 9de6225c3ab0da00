"""Importing is complete or rejected, checked before any write lock, bounded in memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from broadcast_history import Broadcast, Event, EventLog, LogUnavailable, StreamReset
from broadcast_history.admin import (
    HistoryAdmin,
    ImportConflict,
    InvalidExport,
    _import,
    create_app,
)
from broadcast_history.admin._import import _Checker, split_lines
from broadcast_history.log import Pending
from tests.conftest import unique
from tests.support.admin_support import LOG_KINDS, fresh_log_url
from tests.support.ports import free_port

TOKEN = "t"
EARLIER, LATER = "2023-12-31T00:00:00+00:00", "2024-01-02T00:00:00+00:00"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLI = [sys.executable, "-c", "from broadcast_history.cli import main; main()"]


def channel_line(name: str = "c", first: int = 1, last: int = 3, **fields: object) -> str:
    line = {"type": "channel", "name": name, "epoch": 7, "first_offset": first}
    line.update(last_offset=last, **fields)
    return json.dumps(line)


def event_line(offset: int, name: str = "c", **fields: object) -> str:
    line = {
        "type": "event",
        "channel": name,
        "offset": offset,
        "epoch": 7,
        "timestamp": "2024-01-01T00:00:00+00:00",
        "key": None,
        "encoding": "text",
        "message": f"m{offset}",
    }
    line.update(fields)
    return json.dumps(line)


def end_line(channels: int, events: int) -> str:
    return json.dumps({"type": "end", "format": 2, "channels": channels, "events": events})


@pytest.fixture(params=LOG_KINDS)
async def admin(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HistoryAdmin]:
    url = await fresh_log_url(request.param, tmp_path)
    async with Broadcast("memory://", log=url) as broadcast:
        yield HistoryAdmin.of(broadcast)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (
            [channel_line(), event_line(1), event_line(2)],
            r"'c' \(line 1\): events 3..3 are missing",
        ),
        ([channel_line(), event_line(2), event_line(3)], "line 2: events 1..1 of 'c' are missing"),
        ([channel_line(), event_line(1), event_line(3)], "line 3: events 2..2 of 'c' are missing"),
        ([channel_line(), event_line(1), event_line(1)], "line 3: offset 1 of 'c' repeated"),
        ([channel_line(last=0, first=1), event_line(1)], "line 2: offset 1 is beyond"),
        ([channel_line(first=2), event_line(1)], "line 2: offset 1 of 'c' repeated"),
        (
            [channel_line(last=2), event_line(1, key="k"), event_line(2, key="k")],
            "line 3: key 'k' of 'c' repeated",
        ),
        ([channel_line(), '{"type": "event", "x": ' + "[" * 5_000], "line 2: nested too deeply"),
        ([channel_line(), event_line(1, extra={"a": 1})], "line 2: nested values"),
        ([channel_line(last=1), event_line(1, message="x" * 2000)], "line 2: .*larger than 1000"),
        ([channel_line(last=1), event_line(1, message="\ud800")], "not valid Unicode"),
        (  # a valid time whose UTC is past year 9999
            [channel_line(last=1), event_line(1, timestamp="9999-12-31T23:59:59-23:59")],
            "line 2: 'timestamp' must be an ISO 8601 time",
        ),
        (
            [channel_line("a", last=1), event_line(1, "a"), channel_line("b")],
            "'b'.*1..3 are missing",
        ),
        (  # time positions before the kept events would raise HistoryTruncated wrongly
            [channel_line(first=2, last=2, trimmed_timestamp=LATER), event_line(2)],
            "'c' .*trimmed_timestamp is later than the events kept",
        ),
        (
            [channel_line(last=1, trimmed_timestamp=EARLIER), event_line(1)],
            "line 1: trimmed_timestamp given, but nothing was trimmed",
        ),
        # true == 1 in Python, but it is not the format's number
        ([channel_line(last=0, format=True)], "line 1: unsupported export format True"),
        # epochs stay exact in JSON and JavaScript: the log never makes one this large
        (
            [channel_line(last=0, epoch=2**53)],
            "line 1: 'epoch' must be an int from 1 to 9007199254740991",
        ),
        (  # a time before 1970 was refused as "goes backwards"
            [channel_line(last=1), event_line(1, timestamp="1969-12-31T23:59:59+00:00")],
            "line 2: 'timestamp' must be a time from 1970-01-01T00:00:00Z on",
        ),
        (
            [channel_line(last=0, last_timestamp="1960-01-01T00:00:00+00:00")],
            "line 1: 'last_timestamp' must be a time from 1970",
        ),
        # Format 2 ends with a line counting what it holds: a cut between channels
        # (head -n, a full disk, a broken stream) read as a whole export.
        (
            [channel_line(last=1, format=2), event_line(1)],
            "no end line after line 2: the export was cut short",
        ),
        (
            [channel_line(last=1, format=2), event_line(1), end_line(channels=2, events=2)],
            "line 3: the end line counts 2 channels, 1 were read",
        ),
        (
            [channel_line(last=1, format=2), event_line(1), end_line(channels=1, events=0)],
            "line 3: the end line counts 0 events, 1 were read",
        ),
        ([channel_line(last=0, format=3)], "line 1: unsupported export format 3"),
        # Nothing at all is a backup missing (import <(zcat gone.gz)): it "imported 0
        # events", exit 0 (found by a probe). Every export has its end line.
        ([], "the input is empty"),
        (["", "  ", "\n"], "the input is empty"),
    ],
)
async def test_incomplete_or_malformed_exports_store_nothing(
    admin: HistoryAdmin, lines: list[str], match: str
) -> None:
    admin.max_message_size = 1000
    with pytest.raises(InvalidExport, match=match):
        await admin.import_jsonl(lines)
    assert (await admin.channels()).channels == []


async def test_an_export_cut_between_channels_or_joined_to_another(admin: HistoryAdmin) -> None:
    """A cut after a channel's last event imported the channels before it, exit 0."""
    await admin.log.append([Pending(channel, "m", None) for channel in ("a", "b", "c")])
    whole = [line async for line in admin.export_jsonl()]
    assert len(whole) == 7 and json.loads(whole[-1])["type"] == "end"
    two = [line async for line in admin.export_jsonl(["a", "b"])]
    one = [line async for line in admin.export_jsonl(["c"])]
    for channel in ("a", "b", "c"):
        await admin.delete(channel)
    with pytest.raises(InvalidExport, match="no end line after line 4"):
        await admin.import_jsonl(whole[:4])  # head -n 4: channels a and b whole
    assert (await admin.channels()).channels == []
    # Exports joined with cat: each end line counts its own part.
    nothing = [line async for line in admin.export_jsonl([])]
    assert nothing == ['{"type":"end","format":2,"channels":0,"events":0}\n']
    result = await admin.import_jsonl([*two, *one])
    assert (result.channels, result.events) == (["a", "b", "c"], 3)
    # An older export (format 1, no end line) joined before a newer one.
    for channel in ("a", "b", "c"):
        await admin.delete(channel)
    older = [line.replace('"format":2', '"format":1') for line in two[:-1]]
    result = await admin.import_jsonl([*older, *one])
    assert (result.channels, result.events) == (["a", "b", "c"], 3)


async def test_a_last_timestamp_after_the_last_event_is_brought_back_to_it(
    admin: HistoryAdmin,
) -> None:
    """It was stored as given: every next publish was stamped 2099 (found by a probe)."""
    late = channel_line(last=1, last_timestamp="2099-01-01T00:00:00+00:00")
    await admin.import_jsonl([late, event_line(1)])
    stats = await admin.channel("c")
    assert stats.last_timestamp == datetime(2024, 1, 1, tzinfo=timezone.utc)
    # With none of its events left (all trimmed), it is the only time known: kept.
    gone = channel_line("g", first=2, last=1, last_timestamp="2099-01-01T00:00:00+00:00")
    await admin.import_jsonl([gone])
    assert (await admin.channel("g")).last_timestamp == datetime(2099, 1, 1, tzinfo=timezone.utc)


async def test_a_trimmed_channel_imports_from_its_first_offset(admin: HistoryAdmin) -> None:
    lines = [channel_line(first=3, last=4, trimmed_timestamp=EARLIER), event_line(3)]
    result = await admin.import_jsonl([*lines, event_line(4)])
    assert (result.channels, result.events) == (["c"], 2)
    stats = await admin.channel("c")
    assert (stats.first_offset, stats.last_offset, stats.count) == (3, 4, 2)
    assert stats.trimmed_timestamp == datetime(2023, 12, 31, tzinfo=timezone.utc)
    # An export without trimmed_timestamp (older versions wrote none): the trimmed
    # events may be as late as the first kept one, so a time up to it is refused.
    await admin.import_jsonl([channel_line("t", first=3, last=3), event_line(3, "t")])
    assert (await admin.channel("t")).trimmed_timestamp == datetime(2024, 1, 1, tzinfo=timezone.utc)
    empty = [channel_line("d", first=6, last=5)]
    assert (await admin.import_jsonl(empty)).events == 0


@pytest.mark.parametrize("kind", ["log:postgres", "log:mysql"])
async def test_an_import_cancelled_mid_page_finishes_the_page_then_stores_nothing(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during an import into Postgres could leave the CLI waiting for ever,
    its transaction open and the imported channels' rows locked (found by a probe,
    about one Ctrl-C in three): asyncpg's executemany, cancelled midway, may never
    finish. A page's statement now runs to its end, then the import is cancelled."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    url = await fresh_log_url(kind, tmp_path)
    real = AsyncConnection.execute
    started = asyncio.Event()
    outcomes: list[str] = []

    async def slow(self: AsyncConnection, statement: Any, *args: Any, **kwargs: Any) -> Any:
        table = getattr(statement, "table", None)
        if not getattr(statement, "is_insert", False) or not table.name.endswith("events"):
            return await real(self, statement, *args, **kwargs)
        started.set()
        try:
            await asyncio.sleep(0.3)
            result = await real(self, statement, *args, **kwargs)
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise
        outcomes.append("done")
        return result

    monkeypatch.setattr(AsyncConnection, "execute", slow)
    lines = [channel_line("c", last=3), *(event_line(i, "c") for i in (1, 2, 3))]
    async with Broadcast("memory://", log=url) as broadcast:
        admin = HistoryAdmin.of(broadcast)
        task = asyncio.ensure_future(admin.import_jsonl(lines))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.1)  # the page's statement is under way
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # again (a timeout around the import): the statement still ends
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert outcomes == ["done"]
        assert await broadcast.log.channels() == []
        # Rolled back: the channel's row is not held.
        event = await asyncio.wait_for(broadcast.publish("c", "after"), 5)
        assert event.offset == 1


async def test_repeated_keys_are_found_exactly_with_little_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Broadcast("memory://") as broadcast:
        admin = HistoryAdmin.of(broadcast)
        count, key = 20_000, "k" * 250
        lines = [channel_line(last=count)]
        lines += [event_line(n, key=f"{key}{n:05}") for n in range(1, count + 1)]
        with tempfile.TemporaryFile() as spool:
            tracemalloc.start()
            try:
                checker = _Checker(broadcast.log, spool, 1000, False)
                for number, line in enumerate(lines, 1):
                    await checker.line(line, number)
                held, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        # Measured 8.2 MB with a set of the keys (~300 bytes each), 2.9 with digests.
        assert held < 4_500_000
        # Two keys with one digest: the spooled events tell them apart.
        monkeypatch.setattr(_import, "_key_digest", lambda key: 1)
        two = [channel_line(last=2), event_line(1, key="a"), event_line(2, key="b")]
        assert (await admin.import_jsonl(two)).events == 2
        again = [
            channel_line("d", last=3),
            *(event_line(n, "d", key=k) for n, k in enumerate("aba", 1)),
        ]
        with pytest.raises(InvalidExport, match="line 4: key 'a' of 'd' repeated"):
            await admin.import_jsonl(again)


def test_the_spool_is_read_back_as_plain_values_only() -> None:
    """The checked events wait in a spool of pickles (read 3 times faster than JSON
    lines while the write lock is held); reading it back loads tuples of plain
    values and refuses a pickle that names a class or function. Read with one
    unpickler, records pickled with protocol 5 gave a record's repeated value ("y" as
    message and key) the object of the record before: a wrong key or message."""
    import pickle

    from broadcast_history.admin._import import _records, spooled

    records = [
        ("chat", 1, 7, 1_714_564_800_000_002, b"\x00\n\xff", None),
        ("chat", 2, 7, 0, "caf\u00e9", "k"),
        ("b", 3, 7, 0, "b", None),
        ("y", 4, 7, 0, "y", "y"),
        ("y", 5, 7, 0, b"y", "y"),
        ("y", 6, 7, 0, "", ""),
    ]
    with tempfile.TemporaryFile() as spool:
        for record in records:
            spool.write(spooled(record))  # type: ignore[arg-type]
        spool.seek(0)
        assert list(_records(spool)) == records
        spool.seek(0)
        spool.truncate()
        spool.write(pickle.dumps(datetime.now(timezone.utc)))
        spool.seek(0)
        with pytest.raises(pickle.UnpicklingError, match="datetime"):
            list(_records(spool))


@pytest.mark.parametrize(("events", "size"), [(20_000, 2), (32, 400_000)])
async def test_an_import_from_a_list_lets_other_tasks_run_while_it_checks(
    admin: HistoryAdmin, events: int, size: int
) -> None:
    """Checking an event line awaits nothing: lines from a list (or an open file) held
    the event loop for the whole check, seconds per million lines (or per few hundred
    of 1 MiB), with every other task of the app waiting."""
    turns = 0
    seen: list[int] = []  # the other task's turns, as each line is read

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    def lines() -> Iterator[str]:
        yield channel_line(last=events)
        for offset in range(1, events + 1):
            seen.append(turns)
            yield event_line(offset, message=str(offset).zfill(size))

    task = asyncio.create_task(other_task())
    try:
        result = await admin.import_jsonl(lines())
    finally:
        task.cancel()
    assert result.events == events
    assert len(set(seen)) >= 3  # turns came while the lines were being checked


async def test_channels_are_looked_up_in_batches(
    admin: HistoryAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One lookup per channel line made 100,000 one-event channels take 250 s on SQLite.
    lookups: list[int] = []
    refuse_existing = EventLog.refuse_existing

    async def counted(log: EventLog, names: list[str]) -> None:
        lookups.append(len(names))
        await refuse_existing(log, names)

    monkeypatch.setattr(EventLog, "refuse_existing", counted)
    monkeypatch.setattr(EventLog, "channel", None)  # no lookup of one channel
    lines = []
    for n in range(1200):
        lines += [channel_line(f"c{n}", last=1), event_line(1, f"c{n}")]
    assert (await admin.import_jsonl(lines)).events == 1200
    assert lookups == [500, 500, 200]
    # An existing channel is still found before the end of the input.
    read: list[int] = []

    def conflicting() -> Iterator[str]:
        for n in range(1200):
            read.append(n)
            yield channel_line(f"d{n}" if n != 3 else "c3", last=0)

    with pytest.raises(ImportConflict, match="channel 'c3' already exists"):
        await admin.import_jsonl(conflicting())
    assert len(read) == 500


async def test_split_lines_is_bounded_and_linear() -> None:
    def endless() -> Iterator[bytes]:
        for _ in range(100 * 16):  # 100 MiB without a newline
            yield b"x" * 65536

    got: list[bytes] = []
    with pytest.raises(InvalidExport, match="line 3: longer than 1000000"):
        async for line in split_lines(iter([b"a\nb", b"c\n", *endless()]), 1_000_000):
            got.append(line)
    assert got == [b"a", b"bc"]
    lines = [line async for line in split_lines([b"one\ntwo\n\nthree"], 100)]
    assert lines == [b"one", b"two", b"", b"three"]


async def _publish(log: str, channel: str, count: int) -> None:
    async with Broadcast("memory://", log=log) as broadcast:
        for i in range(count):
            await broadcast.publish(channel, f"m{i}")


def test_cli_refuses_a_truncated_export(tmp_path: Path) -> None:
    source = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    target = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    from typer.testing import CliRunner

    from broadcast_history.cli import app

    # The commands run in this process: a process of the CLI costs seconds to start.
    runner = CliRunner()
    asyncio.run(_publish(source, "room", 5))
    exported = runner.invoke(app, ["export", "--log", source])
    assert exported.exit_code == 0, exported.output
    head = "".join(exported.stdout.splitlines(keepends=True)[:3])  # `export | head -n 3`
    result = runner.invoke(app, ["import", "-", "--log", target], input=head)
    assert result.exit_code != 0
    assert "events 3..5 are missing" in result.stderr
    assert "room" not in runner.invoke(app, ["channels", "--log", target]).stdout


# -- over HTTP ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("\n".join([channel_line(last=2), event_line(1, key="k"), event_line(2, key="k")]), 400),
        ("\n".join([channel_line(), "[" * 50_000]), 400),
        ("x" * (7 * 1024 * 1024), 400),  # one line over the limit for 1 MiB messages
        ("", 400),  # nothing: a backup missing, not one of nothing
    ],
)
async def test_http_import_errors_are_400(tmp_path: Path, body: str, status: int) -> None:
    async with Broadcast("memory://", log=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}") as b:
        transport = httpx.ASGITransport(app=create_app(b, token=TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as c:
            response = await c.post("/import", content=body.encode())
        assert response.status_code == status, response.text
        assert await b.log.channels() == []


@contextlib.asynccontextmanager
async def _serving(app: object) -> AsyncIterator[int]:
    port = free_port()
    # log_config=None: uvicorn's loggers propagate, so caplog sees an ASGI error.
    config = uvicorn.Config(app, port=port, log_level="warning", log_config=None)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def _half_upload(port: int, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the import route that sent half of ``body``, then stalls."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /import HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\nContent-Type: application/x-ndjson\r\n\r\n"
    )
    writer.write(head.encode() + body[: len(body) // 2])
    await writer.drain()
    return reader, writer


async def test_a_stalled_upload_blocks_no_other_process(tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    lines = [channel_line(last=1000)] + [event_line(i) for i in range(1, 1001)]
    body = ("\n".join(lines) + "\n").encode()
    async with Broadcast("memory://", log=log) as broadcast:
        async with _serving(create_app(broadcast, token=TOKEN)) as port:
            reader, writer = await _half_upload(port, body)
            await asyncio.sleep(0.5)  # the server has the first half; the client stalls
            # Another process publishes to the same SQLite file meanwhile.
            other = await asyncio.create_subprocess_exec(
                *CLI, "publish", "elsewhere", "hello", "--log", log
            )
            assert await asyncio.wait_for(other.wait(), 20) == 0
            writer.write(body[len(body) // 2 :])
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 20)
            writer.close()
            assert b" 201 " in status, status
        assert (await broadcast.log.channel("c")).last_offset == 1000  # type: ignore[union-attr]
        assert (await broadcast.log.channel("elsewhere")) is not None


async def test_restoring_an_older_backup_with_a_new_epoch(tmp_path: Path) -> None:
    """A backup older than what clients saw, restored in its own epoch, reuses offsets
    those clients already had: a client at 10 would skip the new 6..10. A new epoch
    makes their positions raise StreamReset instead (Python, HTTP and CLI alike)."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    async with Broadcast("memory://", log=log) as broadcast:
        admin = HistoryAdmin.of(broadcast)
        for i in range(5):
            await broadcast.publish("c", f"m{i}")
        backup = [line async for line in admin.export_jsonl(["c"])]
        seen = [await broadcast.publish("c", f"later{i}") for i in range(5)]
        old_epoch = seen[-1].epoch

        await admin.delete("c")
        assert (await admin.import_jsonl(backup, new_epoch=True)).events == 5
        restored = (await admin.events("c")).events
        assert [e.message for e in restored] == [f"m{i}" for i in range(5)]
        assert {e.epoch for e in restored} == {(await admin.channel("c")).epoch} != {old_epoch}
        with pytest.raises(StreamReset):
            async with broadcast.subscribe("c", since=3, epoch=old_epoch):
                pass
        assert (await broadcast.publish("c", "next")).offset == 6

        await admin.delete("c")
        transport = httpx.ASGITransport(app=create_app(broadcast, token=TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as c:
            response = await c.post("/import?new_epoch=true", content="".join(backup).encode())
        assert response.status_code == 201, response.text
        assert (await admin.channel("c")).epoch not in (old_epoch, restored[0].epoch)
        await admin.delete("c")
    (tmp_path / "backup.jsonl").write_text("".join(backup))
    subprocess.run(
        [*CLI, "import", str(tmp_path / "backup.jsonl"), "--log", log, "--new-epoch"], check=True
    )
    async with Broadcast("memory://", log=log) as broadcast:
        info = await broadcast.log.channel("c")
        assert info is not None and info.last_offset == 5 and info.epoch != old_epoch


async def test_an_import_is_stored_in_pages_bounded_in_bytes(tmp_path: Path) -> None:
    """The checked events were read back from the spool 1,000 at a time, whatever
    their size: 400 events of 1 MiB took 900 MB to import."""
    from broadcast_history.admin import _import

    big = "x" * (1 << 20)
    lines = [
        json.dumps(
            {"type": "channel", "format": 1, "name": "big", "epoch": 7, "first_offset": 1,
             "last_offset": 12, "last_timestamp": "2024-01-01T00:00:00.000012+00:00"}
        )
    ] + [
        json.dumps(
            {"type": "event", "channel": "big", "offset": i, "epoch": 7,
             "timestamp": f"2024-01-01T00:00:00.{i:06d}+00:00", "key": None,
             "encoding": "text", "message": big}
        )
        for i in range(1, 13)
    ]  # fmt: skip
    pages: list[int] = []
    spooled = _import._spooled

    async def counted(spool: Any) -> AsyncIterator[list[Event]]:
        async for page in spooled(spool):
            pages.append(sum(len(e.message) for e in page))
            yield page

    log = EventLog(f"sqlite+aiosqlite:///{tmp_path / 'big.db'}")
    await log.connect()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_import, "_spooled", counted)
            result = await _import.import_lines(log, lines, max_message_size=2 << 20)
        assert result.events == 12
    finally:
        await log.disconnect()
    assert len(pages) == 3 and max(pages) <= _import._PAGE_BYTES


@pytest.mark.parametrize("kind", LOG_KINDS)
async def test_a_publish_racing_an_import_of_its_new_channel(kind: str, tmp_path: Path) -> None:
    """On Postgres, an import wrote its events before its channel rows, and a publish
    creating the same channel meanwhile deadlocked with it (each waited on a row the
    other had written): the publish, and the publishes batched with it, failed with
    LogUnavailable. Now the channel row comes first: the publish waits for the
    import, then goes after it."""

    async with Broadcast("memory://", log=await fresh_log_url(kind, tmp_path)) as broadcast:
        await _race(broadcast, f"race-{datetime.now().timestamp()}")


async def _race(broadcast: Broadcast, name: str) -> None:
    from broadcast_history import ChannelInfo

    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    info = ChannelInfo(name, 7, 2, 1, when)
    first_page = asyncio.Event()
    go_on = asyncio.Event()

    async def pages() -> AsyncIterator[list[Event]]:
        yield [Event(name, "m1", 1, when, 7)]
        first_page.set()
        await go_on.wait()
        yield [Event(name, "m2", 2, when, 7)]

    importing = asyncio.ensure_future(broadcast.log.restore([info], pages()))
    await asyncio.wait_for(first_page.wait(), 10)
    publishing = asyncio.ensure_future(broadcast.publish(name, "live"))
    await asyncio.sleep(0.3)  # the publish is at the database
    go_on.set()
    outcome = await asyncio.wait_for(
        asyncio.gather(importing, publishing, return_exceptions=True), 20
    )
    assert not any(isinstance(o, LogUnavailable) for o in outcome), outcome
    if isinstance(outcome[0], BaseException):  # SQLite: the publish went first
        assert type(outcome[0]).__name__ == "ImportConflict", outcome
    else:
        assert outcome[0] == 2 and outcome[1].offset == 3


async def test_publishes_go_on_while_an_import_into_sqlite_stores_its_pages(
    tmp_path: Path,
) -> None:
    """An import held SQLite's write lock, the whole file's, while it stored every
    page: publishes to any channel waited for all of it (about 5 s per million
    events, and a publish fails past 30 s). Its pages now go to a table of the
    import's own first, and the lock is held only to copy them over at once."""
    from broadcast_history import ChannelInfo

    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    async with Broadcast("memory://", log=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}") as bc:
        published: list[int] = []

        async def pages() -> AsyncIterator[list[Event]]:
            yield [Event("imported", f"m{i}", i, when, 7) for i in range(1, 1001)]
            # The next page waits for a publish to another channel, which took the
            # lock the import held: each waited on the other until the publish's
            # 30 s ran out.
            published.append((await asyncio.wait_for(bc.publish("live", "x"), 5)).offset)
            yield [Event("imported", f"m{i}", i, when, 7) for i in range(1001, 2001)]

        info = ChannelInfo("imported", 7, 2000, 1, when)
        assert await asyncio.wait_for(bc.log.restore([info], pages()), 20) == 2000
        assert published == [1]
        stored = await bc.log.read("imported", after=1998)
        assert [(e.offset, e.message, e.epoch, e.timestamp) for e in stored] == [
            (1999, "m1999", 7, when),
            (2000, "m2000", 7, when),
        ]
        assert (await bc.publish("imported", "next")).offset == 2001


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
@pytest.mark.parametrize("query", ["mode=memory&cache=shared", "vfs=memdb"])
async def test_an_import_into_a_shared_in_memory_sqlite_log_keeps_it(
    synchronous: str, query: str
) -> None:
    """Staged imports close their connection at the end, to drop their temporary
    table: into an in-memory database named by a URI, whose only connection that
    was right after connect() (with FULL, no writer connection is open yet), closing
    it threw the database away, the import reported as stored with it."""
    name = f"imp{unique()}" if query.startswith("mode") else f"/imp{unique()}"
    url = f"sqlite+aiosqlite:///file:{name}?{query}&uri=true"
    lines = [channel_line(last=2), event_line(1), event_line(2), end_line(1, 2)]
    log = EventLog(url, sqlite_synchronous=synchronous)
    async with Broadcast("memory://", log=log) as bc:
        assert (await HistoryAdmin.of(bc).import_jsonl(lines)).events == 2
        assert [e.message for e in await bc.log.read("c")] == ["m1", "m2"]


async def test_an_import_that_cannot_be_staged_says_where_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's temporary directory full or not writable: the import fails naming it
    (the driver says only "database or disk is full", which points at the log)."""
    from broadcast_history.log import _sqlite

    # A statement SQLite refuses, as it refuses a write to a full temporary directory.
    monkeypatch.setattr(_sqlite, "_STAGE_INSERT", "INSERT INTO temp.nowhere VALUES (?)")
    lines = [channel_line(last=2), event_line(1), event_line(2), end_line(1, 2)]
    async with Broadcast("memory://", log=f"sqlite+aiosqlite:///{tmp_path / 'e.db'}") as bc:
        with pytest.raises(LogUnavailable, match=r"temporary directory .*nothing was imported"):
            await HistoryAdmin.of(bc).import_jsonl(lines)
        assert await bc.log.channels() == []
        monkeypatch.undo()  # room again
        assert (await HistoryAdmin.of(bc).import_jsonl(lines)).events == 2


async def test_a_client_gone_mid_upload_stores_nothing_and_logs_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette's ClientDisconnect escaped the import route: a traceback in the
    server's log for a client that went away."""
    lines = [channel_line(last=100)] + [event_line(i) for i in range(1, 101)]
    body = ("\n".join(lines) + "\n").encode()
    async with Broadcast("memory://", log=f"sqlite+aiosqlite:///{tmp_path / 'gone.db'}") as bc:
        async with _serving(create_app(bc, token=TOKEN)) as port:
            _reader, writer = await _half_upload(port, body)
            await asyncio.sleep(0.2)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.5)
        assert await bc.log.channel("c") is None
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
