"""Replay pages read one ahead for a lone subscriber (broadcast_history.log._ahead),
on the logs that read on the event loop (Postgres, MySQL).

The next page's statement goes out when a full page arrives; the page read ahead is
handed only to the reader it was read for, fresh, and never to another subscriber
(one that came after a delete and re-import gets the log as it is then).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broadcast_history import Broadcast, Event
from broadcast_history.admin import HistoryAdmin
from broadcast_history.log._ahead import ReadAhead
from tests.conftest import MYSQL_URL, require_mysql
from tests.support.helpers import assert_contiguous
from tests.support.postgres_support import ensure_database

A, B = object(), object()


class _Pages:
    """Rows 1..size of one channel, answered at once; counts what was asked."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.asked: list[int] = []
        self.failing: set[int] = set()  # pages whose next fetch fails

    async def fetch(self, channel: str, start: int, limit: int, max_bytes: int | None) -> list[int]:
        self.asked.append(start)
        if start in self.failing:
            self.failing.discard(start)
            raise RuntimeError("the log is down")
        return list(range(start, min(start + limit, self.size + 1)))


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_full_page_sets_off_the_next_for_the_same_reader_only() -> None:
    pages = _Pages(25)
    ahead: ReadAhead[int] = ReadAhead(pages.fetch)
    ahead.FRESH = 60  # this test is not about time
    assert await ahead.rows("c", 1, 10, None, A) == list(range(1, 11))
    assert pages.asked == [1, 11]  # page 11 went out before page 1 was handed back
    assert await ahead.rows("c", 11, 10, None, A) == list(range(11, 21))
    assert pages.asked == [1, 11, 21]  # page 11 was taken, 21 asked for
    await _settle()
    # Another reader does not get A's page: it reads its own (and nothing ahead of a
    # short page).
    assert await ahead.rows("c", 21, 10, None, B) == list(range(21, 26))
    assert pages.asked == [1, 11, 21, 21]
    # Not even A gets a short page read ahead: it may lack what A missed live since.
    assert await ahead.rows("c", 21, 10, None, A) == list(range(21, 26))
    assert pages.asked == [1, 11, 21, 21, 21]
    assert ahead.pending == 0


async def test_a_reader_has_one_page_ahead_at_most() -> None:
    pages = _Pages(100)
    ahead: ReadAhead[int] = ReadAhead(pages.fetch)
    ahead.FRESH = 60  # this test is not about time
    await ahead.rows("c", 1, 10, None, A)
    await ahead.rows("c", 41, 10, None, A)  # A jumped (a gap filled, say): 11 let go
    assert ahead.pending == 1
    assert await ahead.rows("c", 11, 10, None, A) == list(range(11, 21))
    assert pages.asked == [1, 11, 41, 51, 11, 21]


async def test_no_reader_no_page_ahead() -> None:
    pages = _Pages(100)
    ahead: ReadAhead[int] = ReadAhead(pages.fetch)
    ahead.FRESH = 60  # this test is not about time
    await ahead.rows("c", 1, 10, None)
    await ahead.rows("c", 11, 10, None)
    assert pages.asked == [1, 11]
    assert ahead.pending == 0


async def test_a_page_not_taken_in_time_is_read_again() -> None:
    pages = _Pages(100)
    ahead: ReadAhead[int] = ReadAhead(pages.fetch)
    ahead.FRESH = 0.0
    await ahead.rows("c", 1, 10, None, A)
    await asyncio.sleep(0.01)
    assert await ahead.rows("c", 11, 10, None, A) == list(range(11, 21))
    assert pages.asked == [1, 11, 11, 21]


async def test_a_page_not_taken_is_let_go_without_further_reads() -> None:
    # Its reader went away: the rows (and the reader) are not held until the next read.
    pages = _Pages(100)
    ahead: ReadAhead[int] = ReadAhead(pages.fetch)
    ahead.FRESH = 0.01
    await ahead.rows("c", 1, 10, None, A)
    assert ahead.pending == 1
    await asyncio.sleep(0.1)
    assert ahead.pending == 0


async def test_a_failed_read_ahead_is_read_again() -> None:
    pages = _Pages(100)
    ahead: ReadAhead[int] = ReadAhead(pages.fetch)
    ahead.FRESH = 60  # this test is not about time
    pages.failing.add(11)
    await ahead.rows("c", 1, 10, None, A)
    await _settle()  # the read ahead failed, and nobody has asked for it yet
    assert await ahead.rows("c", 11, 10, None, A) == list(range(11, 21))
    assert pages.asked == [1, 11, 11, 21]


async def test_reads_ahead_are_bounded_and_closed() -> None:
    pages = _Pages(1000)
    ahead: ReadAhead[int] = ReadAhead(pages.fetch)
    ahead.FRESH = 60  # this test is not about time
    readers = [object() for _ in range(ahead.SLOTS + 3)]
    for reader in readers:
        await ahead.rows("c", 1, 10, None, reader)
    assert ahead.pending == ahead.SLOTS
    await ahead.close()
    assert ahead.pending == 0
    await ahead.rows("c", 1, 10, None, A)  # closed: nothing read ahead any more
    assert ahead.pending == 0


async def test_closing_lets_reads_ahead_end_then_cancels_the_stuck() -> None:
    release = asyncio.Event()
    asked: list[int] = []
    ended: list[int] = []

    async def slow(channel: str, start: int, limit: int, max_bytes: int | None) -> list[int]:
        asked.append(start)
        if start == 11:
            await asyncio.sleep(0.05)  # slow, but ends
        elif start == 41:
            await release.wait()  # stuck
        ended.append(start)
        return list(range(start, start + limit))

    ahead: ReadAhead[int] = ReadAhead(slow)
    ahead.FRESH = 0.5  # how long close() waits
    await ahead.rows("c", 1, 10, None, A)
    await ahead.rows("c", 31, 10, None, B)
    assert asked == [1, 11, 31, 41]
    await asyncio.wait_for(ahead.close(), 5)
    assert 11 in ended  # let to end (its connection goes back whole)
    assert 41 not in ended  # cancelled once the wait was over
    assert ahead.pending == 0


# -- on the logs that read on the event loop -------------------------------------------


@pytest.fixture(params=["postgres", "mysql"])
async def loop_log(request: pytest.FixtureRequest) -> str:
    """A Postgres or MySQL/MariaDB log (the stores that read pages on the loop)."""
    if request.param == "mysql":
        require_mysql()
        return MYSQL_URL
    url = await ensure_database("bh_test_read_ahead")
    return url.replace("postgresql://", "postgresql+asyncpg://")


async def _counted(bc: Broadcast) -> dict[str, int]:
    """Counts of the pages the store fetched, and of those taken from ahead."""
    ahead: Any = bc.log._store.ahead  # type: ignore[attr-defined]
    counts = {"fetched": 0, "taken": 0}
    fetch, taken = ahead._fetch, ahead._taken

    async def counting_fetch(*args: Any) -> Any:
        counts["fetched"] += 1
        return await fetch(*args)

    async def counting_taken(*args: Any) -> Any:
        rows = await taken(*args)
        counts["taken"] += rows is not None
        return rows

    ahead._fetch, ahead._taken = counting_fetch, counting_taken
    return counts


async def test_a_lone_subscriber_replays_through_pages_read_ahead(loop_log: str) -> None:
    channel = f"ahead-{id(object())}"
    async with Broadcast(log=loop_log, page_size=50) as bc:
        await bc.log.delete_channel(channel)
        for i in range(1, 1001):
            await bc.publish(channel, f"m{i}")
        bc.log._store.ahead.FRESH = 60  # type: ignore[attr-defined]
        counts = await _counted(bc)
        got: list[Event] = []
        async with bc.subscribe(channel, since=0) as sub:
            async for event in sub:
                got.append(event)
                if len(got) == 1000:
                    break
        assert_contiguous(got, 1, 1000)
        assert [e.message for e in got] == [f"m{i}" for i in range(1, 1001)]
        # 20 pages (and the empty one after them), each fetched once, every one after
        # the first read ahead.
        assert counts["taken"] >= 19
        assert counts["fetched"] <= 22


async def test_a_page_read_ahead_for_one_subscriber_never_goes_to_the_next(loop_log: str) -> None:
    # A first subscriber stops after one page, with the next read ahead for it; the
    # channel is deleted and re-imported (same epoch, offsets 1..5 again) and gets
    # new events: a second subscriber replays the log as it is now.
    channel = f"ahead-{id(object())}"
    async with Broadcast(log=loop_log, page_size=10) as bc:
        bc.log._store.ahead.FRESH = 60  # type: ignore[attr-defined]
        await bc.log.delete_channel(channel)
        admin = HistoryAdmin.of(bc)
        for i in range(5):
            await bc.publish(channel, f"v1-{i}")
        export = [line async for line in admin.export_jsonl([channel])]
        for i in range(5, 30):
            await bc.publish(channel, f"v1-{i}")
        async with bc.subscribe(channel, since=0) as first:
            for _ in range(10):
                await asyncio.wait_for(first.get(), 5)
        await bc.log.delete_channel(channel)
        await admin.import_jsonl(export)
        for i in range(5, 30):
            await bc.publish(channel, f"v2-{i}")
        assert bc.log._store.ahead.pending >= 1  # type: ignore[attr-defined]  # first's page 11
        async with bc.subscribe(channel, since=0) as second:
            got = [(await asyncio.wait_for(second.get(), 5)).message for _ in range(30)]
        assert got == [f"v1-{i}" for i in range(5)] + [f"v2-{i}" for i in range(5, 30)]
