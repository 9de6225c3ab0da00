"""Small async helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from broadcast_history import Broadcast, Event, LogUnavailable, Subscriber
from tests.support.proxy import CuttableProxy


async def take(subscriber: Subscriber, count: int, timeout: float = 20.0) -> list[Event]:
    """The next ``count`` events of ``subscriber``, failing after ``timeout`` seconds."""

    async def collect() -> list[Event]:
        return [await subscriber.get() for _ in range(count)]

    return await asyncio.wait_for(collect(), timeout)


async def settled(read: Callable[[], object], expected: object, timeout: float = 10.0) -> object:
    """``read()`` once it returns ``expected``, or its last value after ``timeout``.

    For counters that another task updates: a broadcast hands its own events to its
    subscribers at commit, so one taken tells nothing of the transport's messages
    before it (their echo is dropped later, when the transport's reader gets there).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = read()
    while value != expected and loop.time() < deadline:
        await asyncio.sleep(0.01)
        value = read()
    return value


def assert_contiguous(events: list[Event], first: int, last: int) -> None:
    """Offsets are exactly first..last, in order, once each."""
    offsets = [event.offset for event in events]
    assert offsets == list(range(first, last + 1)), _describe(offsets, first, last)


def _describe(offsets: list[int], first: int, last: int) -> str:
    expected = set(range(first, last + 1))
    missing = sorted(expected - set(offsets))[:10]
    duplicates = sorted({o for o in offsets if offsets.count(o) > 1})[:10]
    return f"expected {first}..{last}; missing {missing}, duplicates {duplicates}"


@contextlib.contextmanager
def patient_reads(seconds: float = 5.0) -> Iterator[None]:
    """Log reads bounded at ``seconds`` in the block: fault tests shorten the bound to
    see a silent log fail fast, and a healthy read on a fresh connection can take longer
    than that on a loaded machine. A read on a connection gone silent still fails."""
    from broadcast_history.log import _calls

    before = _calls.READ_TIMEOUT
    _calls.READ_TIMEOUT = seconds
    try:
        yield
    finally:
        _calls.READ_TIMEOUT = before


async def publish_through_a_cut(proxy: CuttableProxy, broadcast: Broadcast, channel: str) -> None:
    """Publish before, during and after a cut of the log's network: the publishes
    that could get no connection say nothing was stored, and none was."""
    await broadcast.publish(channel, "before")
    proxy.cut()  # the kept connections end, and new ones are refused
    said = []
    for i in range(3):
        try:
            await asyncio.wait_for(broadcast.publish(channel, f"m{i}"), 10)
        except LogUnavailable as exc:
            said.append(str(exc))
    assert len(said) == 3 and "nothing was sent" in said[-1], said
    proxy.is_cut = False
    await broadcast.publish(channel, "after")
    async with broadcast.subscribe(channel, since=0) as sub:
        stored = [e.message for e in await take(sub, 2, timeout=10)]
    assert stored == ["before", "after"]
