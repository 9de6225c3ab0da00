"""Replay pages shared by the subscribers of one broadcast (broadcast_history._pagecache).

Subscribers replaying the same stretch of a channel get the same events without
reading the page themselves, and share one read while it runs (but never take a short
page of a read they joined for the end of the log); a kept page the log no longer
holds as kept (the channel deleted, or re-imported from an older export with the same
epoch) is never served; the cache stays within its byte budget. Pages are kept only for
a channel that has more than one subscriber in the broadcast.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broadcast_history import Broadcast, Event, HistoryTruncated, LogUnavailable, StreamReset
from broadcast_history._event import stored_event
from broadcast_history._heads import HeadProbe
from broadcast_history._pagecache import PageCache
from broadcast_history.admin import HistoryAdmin


@asynccontextmanager
async def _watched(tmp_path: Path, **options: Any) -> AsyncIterator[Broadcast]:
    """A broadcast whose channel ``c`` has another (live, idle) subscriber besides the
    ones a test makes: pages are kept only for a channel that has more than one."""
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", **options) as bc:
        async with bc.subscribe("c"):
            yield bc


async def _replay(bc: Broadcast, channel: str, since: int, until: int) -> list[Event]:
    got: list[Event] = []
    async with bc.subscribe(channel, since=since) as sub:
        async for event in sub:
            got.append(event)
            if event.offset >= until:
                return got
    raise AssertionError("the subscription ended")


async def test_subscribers_replaying_one_stretch_share_its_pages(tmp_path: Path) -> None:
    async with _watched(tmp_path, page_size=50) as bc:
        await asyncio.gather(*(bc.publish("c", f"m{i}") for i in range(500)))
        reads = 0
        read_from = bc.log.read_from

        async def counting(*args: object, **kwargs: object) -> list[Event]:
            nonlocal reads
            reads += 1
            return await read_from(*args, **kwargs)  # type: ignore[arg-type]

        bc.log.read_from = counting  # type: ignore[method-assign]
        first = await _replay(bc, "c", since=120, until=500)
        reads_first, reads = reads, 0
        # From 121: a short page to 150, then whole pages of 50 (the last one read
        # ahead may find nothing more).
        assert [e.offset for e in first] == list(range(121, 501))
        assert 8 <= reads_first <= 10

        # Starting inside another page: one short read, the rest from the cache.
        second, third = await asyncio.gather(
            _replay(bc, "c", since=130, until=500), _replay(bc, "c", since=100, until=500)
        )
        assert [e.offset for e in second] == list(range(131, 501))
        assert [e.offset for e in third] == list(range(101, 501))
        # A short first page and the tail's reads each; the kept pages (7 and 8)
        # cost a check each (batched, read_at), not a page read.
        assert reads <= 2 * 2 + 2
        # The same events, not copies.
        assert second[-1] is first[-1] and third[100] is first[80]


async def test_a_page_of_an_earlier_incarnation_is_never_served(tmp_path: Path) -> None:
    async with _watched(tmp_path, page_size=10) as bc:
        await asyncio.gather(*(bc.publish("c", f"old{i}") for i in range(30)))
        old = await _replay(bc, "c", since=0, until=30)
        assert {e.epoch for e in old} == {old[0].epoch}
        await bc.log.delete_channel("c")
        for i in range(30):
            await bc.publish("c", f"new{i}")
        new = await _replay(bc, "c", since=0, until=30)
        assert [e.message for e in new] == [f"new{i}" for i in range(30)]
        assert {e.epoch for e in new} != {old[0].epoch}


async def test_a_lone_subscriber_s_pages_are_not_kept(tmp_path: Path) -> None:
    # Kept pages cost the garbage collector a walk over every kept event per pass: a
    # lone reader of a long history pays that for pages nobody reads again.
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", page_size=10) as bc:
        await asyncio.gather(*(bc.publish("c", f"m{i}") for i in range(30)))
        await _replay(bc, "c", 0, 30)
        assert bc._heads.pages._bytes == 0
        async with bc.subscribe("c"):  # another client of the channel
            epoch = (await _replay(bc, "c", 0, 30))[0].epoch
        kept = [bc._heads.pages.get("c", first, 10, epoch) for first in (1, 11, 21)]
        assert all(page is not None and len(page) == 10 for page in kept)


def _page(channel: str, first: int, size: int, epoch: int = 1) -> list[Event]:
    return [
        stored_event(channel, "x" * 100, offset, None, epoch, None)
        for offset in range(first, first + size)
    ]


def test_only_whole_aligned_pages_are_kept_within_the_byte_budget() -> None:
    cache = PageCache(max_bytes=20_000)
    cache.put("c", 1, 10, _page("c", 1, 9))  # short: not whole
    cache.put("c", 5, 10, _page("c", 5, 10))  # not aligned
    assert cache.get("c", 1, 10, 1) is None and cache.get("c", 5, 10, 1) is None
    for first in range(1, 1000, 10):
        cache.put("c", first, 10, _page("c", first, 10))
    assert cache._bytes <= 20_000
    assert cache.get("c", 1, 10, 1) is None  # the oldest went first
    tail = cache.get("c", 995, 10, 1)
    assert tail is not None and [e.offset for e in tail] == list(range(995, 1001))
    assert cache.get("c", 995, 10, 2) is None  # a reader of another epoch
    assert cache.get("c", 995, 10, 1) is not None  # still kept for this one
    cache.drop("c", 997, 10)
    assert cache.get("c", 995, 10, 1) is None
    assert cache.get("c", 985, 10, None) is None  # unknown epoch: ask the log


async def _replay_all(bc: Broadcast, channel: str, count: int) -> list[Event]:
    async with bc.subscribe(channel, since=0) as sub:
        return [await asyncio.wait_for(sub.get(), 5) for _ in range(count)]


async def test_a_history_re_imported_with_the_same_epoch_is_read_from_the_log(
    tmp_path: Path,
) -> None:
    async with _watched(tmp_path, page_size=10) as bc:
        admin = HistoryAdmin.of(bc)
        for i in range(5):
            await bc.publish("c", f"v1-{i}")
        export = [line async for line in admin.export_jsonl(["c"])]
        for i in range(5, 30):
            await bc.publish("c", f"v1-{i}")
        first = await _replay_all(bc, "c", 30)  # keeps pages 1-10, 11-20, 21-30
        await bc.log.delete_channel("c")
        await admin.import_jsonl(export)  # offsets 1..5 again, under the same epoch
        for i in range(5, 30):
            await bc.publish("c", f"v2-{i}")
        second = await _replay_all(bc, "c", 30)
        assert second[0].epoch == first[0].epoch
        assert [e.message for e in second] == [f"v1-{i}" for i in range(5)] + [
            f"v2-{i}" for i in range(5, 30)
        ]


async def test_a_subscriber_of_a_deleted_channel_is_reset_within_a_page(tmp_path: Path) -> None:
    async with _watched(tmp_path, page_size=10) as bc:
        for i in range(200):
            await bc.publish("c", f"old{i}")
        await _replay_all(bc, "c", 200)  # every page kept
        async with bc.subscribe("c", since=0) as sub:
            for _ in range(5):
                await sub.get()
            await bc.log.delete_channel("c")
            delivered = 0
            with pytest.raises(StreamReset):
                while True:
                    await asyncio.wait_for(sub.get(), 5)
                    delivered += 1
            # The rest of the page in hand (and the one read ahead), not the 195 kept.
            assert delivered <= 15


async def test_subscribers_missing_the_same_page_share_one_read(tmp_path: Path) -> None:
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", page_size=100) as bc:
        await asyncio.gather(*(bc.publish("c", f"m{i}") for i in range(2000)))
        pages = firsts = 0
        read_from = bc.log.read_from

        async def counting(
            channel: str, start: int, limit: int, max_bytes: int | None, **kwargs: Any
        ) -> Any:
            nonlocal pages, firsts
            # Pages of events (each subscriber also reads ahead past the end itself,
            # to learn it is the end).
            pages += start <= 2000
            firsts += start == 1
            return await read_from(channel, start, limit, max_bytes, **kwargs)

        bc.log.read_from = counting  # type: ignore[method-assign]
        # Every turn at reading taken (as by other subscribers' reads), until all 30
        # have asked for page 1.
        gate = bc._heads._gate()
        for _ in range(gate._value):
            await gate.acquire()
        # Counted as they ask (a fixed sleep was too short for 30 subscribers to start
        # on a loaded 2-core machine: one asked after the gate opened and read again).
        asked = 0
        read_page = bc._heads.read_page

        async def asking(channel: str, start: int, *rest: Any) -> Any:
            nonlocal asked
            asked += start == 1
            return await read_page(channel, start, *rest)

        bc._heads.read_page = asking  # type: ignore[method-assign,assignment]
        replays = asyncio.gather(*(_replay(bc, "c", 0, 2000) for _ in range(30)))
        for _ in range(3000):  # 30 s at most
            if asked == 30:
                break
            await asyncio.sleep(0.01)
        assert firsts == 0
        for _ in range(HeadProbe.READS_AT_ONCE):
            gate.release()
        got = await replays
        assert all([e.offset for e in g] == list(range(1, 2001)) for g in got)
        # All 30 asked for page 1 while its read waited for its turn: one read.
        # (Later pages are shared through the cache once read, or read again by
        # those asking once the read has begun.)
        assert firsts == 1
        assert pages < 30 * 20 // 4


async def test_the_checks_of_kept_pages_go_to_the_log_together(tmp_path: Path) -> None:
    async with _watched(tmp_path, page_size=50) as bc:
        await asyncio.gather(*(bc.publish("c", f"m{i}") for i in range(1000)))
        await _replay(bc, "c", 0, 1000)  # keeps the 20 pages
        checks: list[int] = []
        read_at = bc.log.read_at

        async def counting(channel: str, offsets: list[int]) -> list[Event]:
            checks.append(len(offsets))
            return await read_at(channel, offsets)

        bc.log.read_at = counting  # type: ignore[method-assign]
        got = await asyncio.gather(*(_replay(bc, "c", 0, 1000) for _ in range(20)))
        assert all([e.offset for e in g] == list(range(1, 1001)) for g in got)
        # 20 subscribers x 20 kept pages asked about in far fewer queries.
        assert len(checks) <= 100


async def test_a_failed_check_of_a_kept_page_fails_the_subscriber(tmp_path: Path) -> None:
    async with _watched(tmp_path, page_size=10) as bc:
        await asyncio.gather(*(bc.publish("c", f"m{i}") for i in range(30)))
        await _replay(bc, "c", 0, 30)

        async def down(channel: str, offsets: list[int]) -> list[Event]:
            raise LogUnavailable("the log went away")  # fault injection

        bc.log.read_at = down  # type: ignore[method-assign]
        with pytest.raises(LogUnavailable, match="went away"):
            await _replay(bc, "c", 0, 30)


def _slow_reads(bc: Broadcast) -> None:
    read_from = bc.log.read_from

    async def slow(
        channel: str, start: int, limit: int, max_bytes: int | None, **kwargs: Any
    ) -> Any:
        page = await read_from(channel, start, limit, max_bytes, **kwargs)
        await asyncio.sleep(0.3)  # fault injection: the answer is slow to arrive
        return page

    bc.log.read_from = slow  # type: ignore[method-assign]


@asynccontextmanager
async def _a_read_on_its_way(bc: Broadcast) -> AsyncIterator[None]:
    """While inside, a first subscriber's read of page 1 has run and its (slow) answer
    is on its way."""
    _slow_reads(bc)
    async with bc.subscribe("c", since=0) as first:
        reading = asyncio.ensure_future(first.get())
        await asyncio.sleep(0.1)
        yield
        assert (await reading).offset == 1


async def test_a_read_begun_before_subscribing_is_not_taken_for_the_end(tmp_path: Path) -> None:
    # A short page of a read begun before the second subscriber registered for live
    # events lacks an event committed in between, which that subscriber does not get
    # live either (with idle checks 30 s apart it would wait that long): a read that
    # is already running is not shared.
    url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    async with Broadcast(log=url, page_size=10, idle_check=30) as bc:
        for i in range(3):
            await bc.publish("c", f"m{i}")
        async with _a_read_on_its_way(bc):
            async with Broadcast(log=url) as elsewhere:  # another process, in effect
                await elsewhere.publish("c", "m3")  # committed before `second` subscribes
            async with bc.subscribe("c", since=0) as second:
                got = [await asyncio.wait_for(second.get(), 3) for _ in range(4)]
            assert [e.message for e in got] == ["m0", "m1", "m2", "m3"]


async def test_a_read_running_across_a_re_import_is_not_shared(tmp_path: Path) -> None:
    # A second subscriber must not be handed the page a first one's read got before
    # the channel was deleted and re-imported (same epoch): the log no longer holds it.
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", page_size=10) as bc:
        admin = HistoryAdmin.of(bc)
        for i in range(5):
            await bc.publish("c", f"v1-{i}")
        export = [line async for line in admin.export_jsonl(["c"])]
        for i in range(5, 10):
            await bc.publish("c", f"v1-{i}")
        async with _a_read_on_its_way(bc):
            await bc.log.delete_channel("c")
            await admin.import_jsonl(export)  # offsets 1..5 again, same epoch
            for i in range(5, 12):
                await bc.publish("c", f"v2-{i}")
            async with bc.subscribe("c", since=0) as second:
                got = [(await asyncio.wait_for(second.get(), 5)).message for _ in range(12)]
        assert got == [f"v1-{i}" for i in range(5)] + [f"v2-{i}" for i in range(5, 12)]


async def test_a_read_running_across_a_delete_is_not_shared(tmp_path: Path) -> None:
    # The second subscriber subscribes to the deleted channel (no epoch known yet) and
    # falls back to the log on overflow: it gets the new incarnation, not the old one.
    url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    async with Broadcast(log=url, page_size=10, buffer_size=2) as bc:
        for i in range(3):
            await bc.publish("c", f"old{i}")
        async with _a_read_on_its_way(bc):
            await bc.log.delete_channel("c")
            async with bc.subscribe("c", since=0) as second:
                for i in range(5):
                    await bc.publish("c", f"new{i}")  # overflows its buffer of 2
                got = [(await asyncio.wait_for(second.get(), 5)).message for _ in range(5)]
        assert got == [f"new{i}" for i in range(5)]


async def test_events_trimmed_from_a_kept_page_are_not_served(tmp_path: Path) -> None:
    async with _watched(tmp_path, page_size=10) as bc:
        for i in range(30):
            await bc.publish("c", f"m{i}")
        await _replay(bc, "c", 0, 30)  # every page kept
        async with bc.subscribe("c", since=0) as sub:  # subscribed before the trim
            await bc.log.trim("c", before=6)
            with pytest.raises(HistoryTruncated):
                await asyncio.wait_for(sub.get(), 5)  # as without the cache
