"""Small async helpers shared by the tests."""

from __future__ import annotations

import asyncio

from broadcast_history import Event, Subscriber


async def take(subscriber: Subscriber, count: int, timeout: float = 20.0) -> list[Event]:
    """The next ``count`` events of ``subscriber``, failing after ``timeout`` seconds."""

    async def collect() -> list[Event]:
        return [await subscriber.get() for _ in range(count)]

    return await asyncio.wait_for(collect(), timeout)


def assert_contiguous(events: list[Event], first: int, last: int) -> None:
    """Offsets are exactly first..last, in order, once each."""
    offsets = [event.offset for event in events]
    assert offsets == list(range(first, last + 1)), _describe(offsets, first, last)


def _describe(offsets: list[int], first: int, last: int) -> str:
    expected = set(range(first, last + 1))
    missing = sorted(expected - set(offsets))[:10]
    duplicates = sorted({o for o in offsets if offsets.count(o) > 1})[:10]
    return f"expected {first}..{last}; missing {missing}, duplicates {duplicates}"
