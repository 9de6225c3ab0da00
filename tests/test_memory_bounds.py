"""Memory is bounded in bytes, not only in counts.

A subscriber's live buffer (``buffer_bytes``), a replay page (``page_bytes``) and a
page of the admin API (8 MiB) each stop at a byte budget, and always hold at least
one event, so large messages neither exhaust memory nor stall delivery.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from broadcast_history import Broadcast
from broadcast_history.admin import create_app
from tests.conftest import MakeBroadcast, unique
from tests.support.admin_support import LOG_KINDS, fresh_log_url
from tests.support.helpers import assert_contiguous, take

STALLED = """
import asyncio, json, resource, sys
from broadcast_history import Broadcast

def rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

async def main(log, count, size):
    async with Broadcast("memory://", log=log) as broadcast:
        async with broadcast.subscribe("big") as subscriber:
            await broadcast.publish("big", b"warm-up")
            await subscriber.get()
            before = rss_mib()
            peak = before
            for i in range(count):
                # A new object each time: a buffer keeping references keeps them all.
                await broadcast.publish("big", bytes([i % 256]) * size)
                peak = max(peak, rss_mib())
            # The subscriber never read while that happened; now it catches up.
            offsets = []
            for _ in range(count):
                event = await asyncio.wait_for(subscriber.get(), 30)
                assert len(event.message) == size and event.message[0] == (event.offset - 2) % 256
                offsets.append(event.offset)
    print(json.dumps({"before": before, "peak": peak, "offsets": offsets}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

IMPORTED = """
import asyncio, json, resource, sys
from broadcast_history import Broadcast
from broadcast_history.admin import HistoryAdmin

def lines(count, size):
    yield json.dumps({"type": "channel", "name": "big", "epoch": 7, "first_offset": 1,
                      "last_offset": count})
    for i in range(1, count + 1):
        yield json.dumps({"type": "event", "channel": "big", "offset": i, "epoch": 7,
                          "timestamp": "2024-01-01T00:00:00+00:00", "key": None,
                          "encoding": "text", "message": chr(97 + i % 26) * size})
    yield json.dumps({"type": "end", "format": 2, "channels": 1, "events": count})

async def main(log, count, size):
    async with Broadcast("memory://", log=log) as broadcast:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = await HistoryAdmin.of(broadcast).import_jsonl(lines(count, size))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before": before, "peak": peak, "events": result.events}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

STATEMENTS = """
import asyncio, ctypes, json, sqlite3, sys
from broadcast_history import EventLog
from broadcast_history.log._info import Pending

def sqlite_library():
    # The library the sqlite3 module runs on, if it is a shared one (loaded again by
    # ctypes, it is the same copy, with the same memory counters).
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libsqlite3" in line:
                return ctypes.CDLL(line.split()[-1])
    return None

async def main(log, low, high):
    library = sqlite_library()
    if library is None:
        print(json.dumps({"skip": "the sqlite3 module is not linked to a shared libsqlite3"}))
        return
    library.sqlite3_memory_used.restype = ctypes.c_int64
    names = [f"channel-{n}" for n in range(high)]
    log = EventLog(log)
    await log.connect()
    try:
        async def lists_of(size, keyed):
            key = f"k{size}" if keyed else None
            await log.append([Pending(name, "m", key) for name in names[:size]])
            await log.channels_named(names[:size])
            await log.read_at(names[0], range(size))
        for size in (high, low):  # each path's connections open and warm
            await lists_of(size, True)
        for _ in range(60):  # and the writer's page cache full (2 MB), as it ends up
            await log.append([Pending(name, "m", None) for name in names])
        before = library.sqlite3_memory_used()
        for size in range(low, high):  # more lengths than the 128 statements kept
            await lists_of(size, size % 2 == 0)
        grown = library.sqlite3_memory_used() - before
    finally:
        await log.disconnect()
    print(json.dumps({"grown": grown / 2**20}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def test_lists_of_every_length_keep_a_few_sqlite_statements(tmp_path: Path) -> None:
    """A commit over N channels and a lookup of N names ran as a statement with an IN
    list of N: the driver keeps the last 128 statements of each connection, 10 MB
    for lists of 300 to 500 names (a server's RSS grew 11 MB in 80 reconnect storms of
    1,000 streams). Padded to powers of two, they take a few shapes."""
    figures = _measured(STATEMENTS, f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", 300, 440)
    if "skip" in figures:
        pytest.skip(figures["skip"])
    assert figures["grown"] < 4, f"SQLite's memory grew by {figures['grown']:.1f} MiB"


def _measured(script: str, log: str, count: int, size: int) -> dict[str, Any]:
    """What ``script`` printed, run in a process of its own (an RSS of its own)."""
    result = subprocess.run(
        [sys.executable, "-c", script, log, str(count), str(size)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def test_an_import_of_200_mb_stays_bounded(tmp_path: Path) -> None:
    """The import's spool is read back a page (4 MiB) at a time: one unpickler for
    the whole spool kept every message it had read, 197 MiB more for 191 MiB."""
    count, size = 400, 512 * 1024
    figures = _measured(IMPORTED, f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", count, size)
    assert figures["events"] == count
    grown = figures["peak"] - figures["before"]
    assert grown < 60, f"RSS grew by {grown:.0f} MiB while 200 MiB were imported"


def test_stalled_subscriber_over_200_mb_stays_bounded(tmp_path: Path) -> None:
    count, size = 400, 512 * 1024  # 200 MiB published while the subscriber stalls
    figures = _measured(STALLED, f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", count, size)
    assert figures["offsets"] == list(range(2, count + 2))
    grown = figures["peak"] - figures["before"]
    assert grown < 60, f"RSS grew by {grown:.0f} MiB while 200 MiB went by"


async def test_live_buffer_overflows_by_bytes_and_catches_up(make_broadcast: MakeBroadcast) -> None:
    broadcast = await make_broadcast(buffer_bytes=64 * 1024)
    channel = unique()
    async with broadcast.subscribe(channel) as subscriber:
        assert subscriber.live
        published = [await broadcast.publish(channel, b"x" * 10_000) for _ in range(30)]
        assert subscriber._live_bytes <= 64 * 1024 + 11_000
        assert not subscriber.live  # said so at once, not at the next get()
        got = await take(subscriber, 30)
        assert subscriber.live
    assert got == published


async def test_replay_pages_stop_at_their_byte_budget(make_broadcast: MakeBroadcast) -> None:
    broadcast = await make_broadcast(page_bytes=25_000)
    channel = unique()
    published = [await broadcast.publish(channel, "é" * 5_000) for _ in range(20)]  # 10 kB each
    log = broadcast.log
    assert [e.offset for e in await log.read_from(channel, 1, 100, max_bytes=25_000)] == [1, 2, 3]
    assert [e.offset for e in await log.read(channel, limit=100, max_bytes=20_000)] == [1, 2]
    desc = await log.read(channel, limit=100, max_bytes=25_000, order="desc")
    assert [e.offset for e in desc] == [20, 19, 18]
    assert [e.offset for e in await log.read(channel, max_bytes=1)] == [1]  # one at least
    async with broadcast.subscribe(channel, since=0) as subscriber:
        got = await take(subscriber, 20)
    assert got == published
    assert_contiguous(got, 1, 20)


@pytest.mark.parametrize("kind", LOG_KINDS)
async def test_admin_pages_hold_at_most_8_mib(kind: str, tmp_path: Path) -> None:
    url = await fresh_log_url(kind, tmp_path)
    async with Broadcast("memory://", log=url) as broadcast:
        megabyte = 1024 * 1024
        for i in range(20):
            await broadcast.publish("big", bytes([i]) * megabyte)
        app = create_app(broadcast, token="t")
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer t"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://a", headers=headers
        ) as c:
            offsets: list[int] = []
            query = "?limit=200"
            while True:
                response = await c.get("/channels/big/events" + query)
                assert response.status_code == 200, response.text
                page = response.json()
                sizes = [len(base64.b64decode(e["message"])) for e in page["events"]]
                assert sum(sizes) <= 8 * megabyte
                offsets += [e["offset"] for e in page["events"]]
                if page["next_cursor"] is None:
                    break
                query = f"?limit=200&after={page['next_cursor']}"
    assert offsets == list(range(1, 21))


async def test_admin_pages_are_read_and_encoded_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request for a page of events read its page and encoded it as JSON (about
    five times its messages' size) at once: 64 requests for pages of 8 MiB took
    167 MiB more. At most PAGES_AT_ONCE are read and encoded together; the others wait."""
    from broadcast_history.admin import _http
    from broadcast_history.admin._query import HistoryAdmin

    events = HistoryAdmin.events
    running = most = 0

    async def counted(self: HistoryAdmin, *args: object, **kwargs: object) -> object:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.02)  # a read that takes a while, as a big page does
            return await events(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            running -= 1

    monkeypatch.setattr(HistoryAdmin, "events", counted)
    async with Broadcast("memory://", log=f"sqlite+aiosqlite:///{tmp_path}/l.db") as broadcast:
        for i in range(3):
            await broadcast.publish("big", bytes([i]) * 1000)
        app = create_app(broadcast, token="t")
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer t"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://a", headers=headers
        ) as c:
            answers = await asyncio.gather(
                *(c.get("/channels/big/events?limit=2") for _ in range(3 * _http.PAGES_AT_ONCE))
            )
    assert most == _http.PAGES_AT_ONCE
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["next_cursor"] == 2
        assert [base64.b64decode(e["message"]) for e in answer.json()["events"]] == [
            bytes([0]) * 1000,
            bytes([1]) * 1000,
        ]


def test_admin_pages_are_limited_in_each_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit was one semaphore for the app, bound to the first event loop that
    waited on it: served again in another loop (a second TestClient session), the
    app failed every request that had to wait ("bound to a different event loop")."""
    from broadcast_history.admin._query import HistoryAdmin

    events = HistoryAdmin.events

    async def slow(self: HistoryAdmin, *args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.02)  # so that requests wait for each other
        return await events(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(HistoryAdmin, "events", slow)
    broadcast = Broadcast("memory://", log=f"sqlite+aiosqlite:///{tmp_path}/l.db")
    app = create_app(broadcast, token="t")

    async def session() -> list[int]:
        async with broadcast:
            await broadcast.publish("c", "m")
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": "Bearer t"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://a", headers=headers
            ) as c:
                answers = await asyncio.gather(*(c.get("/channels/c/events") for _ in range(8)))
        return [answer.status_code for answer in answers]

    assert asyncio.run(session()) == [200] * 8
    assert asyncio.run(session()) == [200] * 8
