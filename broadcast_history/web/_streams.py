"""The open streams of an app, so a server that stops can end them at once.

An event stream never ends by itself, and uvicorn waits for open responses before it
shuts down: without this, Ctrl-C would wait for every browser to go away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from ._auth import Forbidden

if TYPE_CHECKING:
    from .._broadcast import Broadcast

#: Waits until ``authorize``, asked again now and then, refuses an open stream; its
#: reason (see :func:`refused`).
Refusal = Callable[[], Awaitable[str]]


async def refused(recheck: Callable[[], Awaitable[None]], every: float) -> str:
    """Ask ``recheck`` every ``every`` seconds; the reason of its first refusal.

    Any other error it raises (``authorize`` failing) ends the wait too: a stream
    whose right to go on cannot be checked is ended, not kept on trust.
    """
    while True:
        await asyncio.sleep(every)
        try:
            await recheck()
        except Forbidden as exc:
            return str(exc)


class OpenStreams:
    """A registry of running streams; :meth:`close_all` ends them all."""

    def __init__(self) -> None:
        self._stops: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        # Futures of finish() calls, done when no stream of their loop is left.
        self._idle: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        # finish() is waiting: a stream opened meanwhile ends at once.
        self._finishing = 0

    def __len__(self) -> int:
        return len(self._stops)

    @contextmanager
    def open(self) -> Iterator[asyncio.Future[None]]:
        """Register a stream; the future it yields is done when it must end (at once
        for a stream opened while :meth:`finish` waits: the server is stopping)."""
        loop = asyncio.get_running_loop()
        entry = (loop, loop.create_future())
        self._stops.add(entry)
        if self._finishing:
            entry[1].set_result(None)
        try:
            yield entry[1]
        finally:
            self._stops.discard(entry)
            # Copies: streams of other loops' threads come and go meanwhile.
            if not any(other is loop for other, _ in list(self._stops)):
                for waiter in [w for w in list(self._idle) if w[0] is loop]:
                    self._idle.discard(waiter)
                    set_done(waiter[1])

    @contextmanager
    def stopping(self) -> Iterator[None]:
        """A server's whole shutdown: streams open now end, and so does every stream
        opened before it is over (a request that was still subscribing when the
        streams finished streamed on until the server cancelled it, with an error
        logged: hundreds in a probe stopping a server while clients reconnected)."""
        self._finishing += 1
        try:
            self.close_all()
            yield
        finally:
            self._finishing -= 1

    def close_all(self) -> None:
        """End every open stream; safe to call from a signal handler or another thread."""
        for loop, stop in list(self._stops):
            if not loop.is_closed():
                loop.call_soon_threadsafe(set_done, stop)

    async def finish(self, timeout: float) -> bool:
        """End every stream, as :meth:`close_all`, and wait up to ``timeout`` seconds
        for those of this event loop to be over: a WebSocket publish under way
        answered, the last frames written. Whether they all were.

        For a server's shutdown, before it closes its connections: uvicorn closes a
        WebSocket with 1012 at once, and an answer still on its way is lost.
        """
        loop = asyncio.get_running_loop()
        self._finishing += 1
        try:
            self.close_all()
            if not any(other is loop for other, _ in list(self._stops)):
                return True
            waiter = (loop, loop.create_future())
            self._idle.add(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter[1]), timeout)
            except asyncio.TimeoutError:
                return False
            finally:
                self._idle.discard(waiter)
            return True
        finally:
            self._finishing -= 1

    def lifespan(self, broadcast: Broadcast) -> Any:
        """An ASGI app's lifespan: connect ``broadcast`` if nobody did (and disconnect
        it then), and end the open streams when the server stops."""

        @asynccontextmanager
        async def lifespan(_app: object) -> AsyncIterator[None]:
            owned = not broadcast.connected
            if owned:
                await broadcast.connect()
            try:
                yield
            finally:
                self.close_all()
                if owned:
                    await broadcast.disconnect()

        return lifespan


def set_done(stop: asyncio.Future[None]) -> None:
    """Make ``stop`` done (if it is not yet)."""
    if not stop.done():
        stop.set_result(None)


#: Seconds a stream's last write (the end of the body, a WebSocket close) may wait
#: for a client that reads nothing; past that the stream ends without it.
LAST_WRITE_WAIT = 1.0


async def unless_stopped(stop: asyncio.Future[None], write: Awaitable[None]) -> bool:
    """Await ``write`` unless ``stop`` comes first (it is then cancelled); whether it
    was written. A write to a client that stopped reading waits as long as the client
    does: a server that stops must not."""
    return await _written(stop, write, 0.0)


async def answered(stop: asyncio.Future[None], write: Awaitable[None]) -> bool:
    """Await ``write``, an answer to a client (a publish's ack), until ``stop`` comes
    and then :data:`LAST_WRITE_WAIT` seconds more; ``False`` once ``stop`` came
    (written or not). Cancelled at once, an ack whose event is stored would be lost,
    and a client retrying without a key would store it twice."""
    return await _written(stop, write, LAST_WRITE_WAIT) and not stop.done()


async def _written(stop: asyncio.Future[None], write: Awaitable[None], grace: float) -> bool:
    """Await ``write`` until ``stop`` comes and ``grace`` seconds more (then cancel
    it); whether it was written. Its error (the client went away) is raised."""
    task = asyncio.ensure_future(write)
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and grace > 0:
            await asyncio.wait((task,), timeout=grace)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled():
            task.exception()  # retrieved, should this wait have been cancelled as it failed
    if task.cancelled():
        return False
    task.result()
    return True


async def last_write(write: Awaitable[None]) -> None:
    """Await ``write`` for at most :data:`LAST_WRITE_WAIT` seconds."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(write, LAST_WRITE_WAIT)


async def first_of(*coroutines: Any) -> tuple[asyncio.Future[Any], ...]:
    """Run ``coroutines`` until the first ends; cancel the rest. Returns the tasks in
    order (the ones that ended are done; cancelled ones are cancelled)."""
    tasks = tuple(asyncio.ensure_future(c) for c in coroutines)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tasks
