"""Replay pages shared by the subscribers of one broadcast (broadcast_history._pagecache).

Subscribers replaying the same stretch of a channel get the same events without a read
of their own; a page of an earlier incarnation of the channel is never served; the
cache stays within its byte budget.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from broadcast_history import Broadcast, Event
from broadcast_history._event import stored_event
from broadcast_history._pagecache import PageCache


async def _replay(bc: Broadcast, channel: str, since: int, until: int) -> list[Event]:
    got: list[Event] = []
    async with bc.subscribe(channel, since=since) as sub:
        async for event in sub:
            got.append(event)
            if event.offset >= until:
                return got
    raise AssertionError("the subscription ended")


async def test_subscribers_replaying_one_stretch_share_its_pages(tmp_path: Path) -> None:
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", page_size=50) as bc:
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
        assert reads <= 2 + 2 * 2  # a short first page each, the tail's reads each
        # The same events, not copies.
        assert second[-1] is first[-1] and third[100] is first[80]


async def test_a_page_of_an_earlier_incarnation_is_never_served(tmp_path: Path) -> None:
    async with Broadcast(log=f"sqlite+aiosqlite:///{tmp_path / 'log.db'}", page_size=10) as bc:
        await asyncio.gather(*(bc.publish("c", f"old{i}") for i in range(30)))
        old = await _replay(bc, "c", since=0, until=30)
        assert {e.epoch for e in old} == {old[0].epoch}
        await bc.log.delete_channel("c")
        for i in range(30):
            await bc.publish("c", f"new{i}")
        new = await _replay(bc, "c", since=0, until=30)
        assert [e.message for e in new] == [f"new{i}" for i in range(30)]
        assert {e.epoch for e in new} != {old[0].epoch}


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
    assert cache.get("c", 995, 10, 2) is None  # another epoch: dropped
    assert cache.get("c", 995, 10, 1) is None
    assert cache.get("c", 985, 10, None) is None  # unknown epoch: ask the log
