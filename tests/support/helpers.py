"""Small async helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from broadcast_history import Event, Subscriber


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
