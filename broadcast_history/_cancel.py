"""Cancellations that libraries swallow, raised again.

Python 3.11's ``asyncio.wait_for`` returns the result when the awaited future
completes in the same loop step as the task's cancellation lands, and the
cancellation is lost; redis-py 8 swallows one inside a (un)subscribe command. A
background loop that goes on then never ends, and ``disconnect()`` or
``asyncio.run()``'s clean-up waits for it for ever. ``Task.cancelling()`` (3.11+)
still counts the request, which is what these helpers read. Python 3.10 has no such
count: there the helpers cannot tell, and do nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


def cancel_count() -> int:
    """How many cancellations the running task was asked for (0 before Python 3.11)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return int(cancelling()) if cancelling is not None else 0


def raise_if_cancelled_since(count: int) -> None:
    """Raise the cancellation of the running task that something swallowed since it
    counted ``count``."""
    if cancel_count() > count:
        raise asyncio.CancelledError


async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``asyncio.wait_for`` that never loses a cancellation of the calling task
    (whether the awaited call returned or failed as it landed)."""
    count = cancel_count()
    try:
        result = await asyncio.wait_for(awaitable, timeout)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if cancel_count() > count:
            raise asyncio.CancelledError from exc
        raise
    raise_if_cancelled_since(count)
    return result


async def acquire(resource: asyncio.Lock | asyncio.Semaphore, timeout: float) -> bool:
    """Take ``resource`` within ``timeout`` seconds; whether it was taken.

    Not ``wait_for(resource.acquire(), ...)``: a caller cancelled in the step the
    resource was granted got it back held, then the cancellation (see
    :func:`wait_for`), and nobody released it. Here the attempt is a task of its
    own, and one the caller no longer waits for gives back what it got.
    """
    taking: asyncio.Future[Any] = asyncio.ensure_future(resource.acquire())
    try:
        await asyncio.wait({taking}, timeout=timeout)
    except asyncio.CancelledError:
        _give_back(resource, taking)
        raise
    if taking.done() and not taking.cancelled() and taking.exception() is None:
        return True
    _give_back(resource, taking)
    return False


def _give_back(resource: asyncio.Lock | asyncio.Semaphore, taking: asyncio.Future[Any]) -> None:
    """Cancel the attempt ``taking``; if it got ``resource`` all the same, release it."""

    def release(taken: asyncio.Future[Any]) -> None:
        if not taken.cancelled() and taken.exception() is None:
            resource.release()

    taking.cancel()
    taking.add_done_callback(release)
