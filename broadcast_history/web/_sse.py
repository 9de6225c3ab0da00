"""A :class:`Feed` as Server-Sent Events: the framing and the streaming response.

Each event is one frame::

    id: <epoch>:<offset>
    event: message            (event: binary for bytes, with base64 data)
    data: <the message, one data: line per line>

A reset is ``id: <epoch>:<head>`` (so a reconnecting ``EventSource`` resumes after
it), ``event: reset`` and ``{"reason", "epoch", "head"}`` as JSON data. The stream
opens with ``retry: 1000`` and, in the same frame, where it starts: ``id:`` of that
position, ``event: start`` and ``{"epoch", "offset"}`` as JSON data (so a client that
has seen no event yet resumes from there, not from the head when it comes back). It
gets a ``: ping`` comment after ``keepalive`` seconds without a frame; with
``?pings=1``, an ``event: ping`` frame with ``{"keepalive"}`` instead, and one in the
opening chunk, which a script can see (``EventSource`` hides comments) and so tell a
connection gone silent from a quiet channel. With the app's ``recheck``, a stream
``authorize`` no longer allows ends with ``event: refused`` and ``{"detail"}``.

Framing and response are written here rather than taken from sse-starlette: its
response costs about 14 µs per frame sent (an anyio cancel scope around every send)
against under 1 µs here, and on a fan-out to a thousand clients it delivered 41%
fewer events per second (docs/performance.md has the measurements).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import Response

from .._errors import BroadcastError, InvalidArgument, LogUnavailable, NotConnected
from .._event import Event
from .._validation import check_seconds
from ._feed import Feed, Reset
from ._streams import OpenStreams, Refusal, first_of, last_write, unless_stopped
from ._unavailable import unavailable

logger = logging.getLogger("broadcast_history.web")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[MutableMapping[str, Any]], Any]
Frame = Callable[[Event], bytes]

RETRY = b"retry: 1000\n\n"
PING = b": ping\n\n"
#: Most replayed events written in one chunk, and about the most bytes of their
#: messages (as held in memory): a chunk is built whole and copied into the
#: transport, so a client reading slowly holds a chunk (twice) besides its page.
FRAMES_PER_WRITE = 64
WRITE_BYTES = 64 * 1024
#: Shortest keepalive: a stream pinged far more often than this writes without pause.
MIN_KEEPALIVE = 0.01


def check_keepalive(keepalive: Any, name: str = "keepalive") -> float:
    """``keepalive`` (seconds between pings of an idle stream), checked."""
    seconds = check_seconds(name, keepalive)
    # Not so short that pinging a stream whose client left starves the loop.
    if seconds < MIN_KEEPALIVE:
        raise InvalidArgument(f"{name} must be at least {MIN_KEEPALIVE} s, got {keepalive!r}")
    return seconds


HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # no-transform: compression layers that honour only it (Express's) would buffer.
    (b"cache-control", b"no-store, no-transform"),
    # nginx buffers proxied responses unless told not to: events would arrive late.
    (b"x-accel-buffering", b"no"),
]
# The line ends of the SSE format: text is cut on each of them into data: lines.
_LINE_END = re.compile(r"\r\n|\r|\n")


def frame(event_id: str, kind: str, data: str) -> bytes:
    """One SSE frame; multi-line ``data`` becomes several ``data:`` lines."""
    if "\n" in data or "\r" in data:
        data = "\ndata: ".join(_LINE_END.split(data))
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


def event_frame(event: Event) -> bytes:
    """The frame of an event: its text as ``message``, its bytes as base64 ``binary``."""
    message = event.message
    event_id = f"{event.epoch}:{event.offset}"
    if isinstance(message, str):
        return frame(event_id, "message", message)
    return frame(event_id, "binary", base64.b64encode(message).decode("ascii"))


def json_frame(event: Event, value: Any) -> bytes:
    """A ``message`` frame of ``event`` whose data is ``value`` as JSON (one line)."""
    data = json.dumps(value, separators=(",", ":"))
    return frame(f"{event.epoch}:{event.offset}", "message", data)


def opening_frame(feed: Feed) -> bytes:
    """``retry:``, with the feed's start (unless a reset comes first to say it)."""
    start = feed.start()
    if start is None:
        return RETRY
    data = json.dumps({"epoch": start["epoch"], "offset": start["offset"]}, separators=(",", ":"))
    return b"retry: 1000\n" + frame(start["id"], "start", data)


def ping_event(keepalive: float) -> bytes:
    """A ping as an event a script sees, saying how often pings come."""
    return b"event: ping\ndata: " + json.dumps({"keepalive": keepalive}).encode() + b"\n\n"


def refused_frame(detail: str) -> bytes:
    """``event: refused``: ``authorize`` asked again said no; the stream ends (no id,
    so a client's position stays that of the last event it had)."""
    data = json.dumps({"detail": detail}, separators=(",", ":"))
    return b"event: refused\ndata: " + data.encode() + b"\n\n"


def reset_frame(reset: Reset) -> bytes:
    """The ``event: reset`` frame, whose id is the position the stream goes on from."""
    return frame(reset.id, "reset", json.dumps(reset.json(), separators=(",", ":")))


async def error_response(send: Send, status: int, detail: str) -> None:
    """A small JSON error response (before any stream started)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EventStream(Response):
    """ASGI response: a feed as ``text/event-stream``, until the client leaves.

    The feed is entered (subscribed) before the response starts, so a client that
    has seen the response headers will receive whatever is published next. Nothing
    is queued here: each frame is written with the server's flow control, so a slow
    reader holds at most its subscriber's budgets (``buffer_bytes``, ``page_bytes``)
    plus the server's transport buffer. A client that goes away ends the
    subscription at once.

    Args:
        feed: The (not yet entered) feed.
        keepalive: Seconds without a frame after which a ``: ping`` comment is sent.
        streams: The app's open streams, which a stopping server ends.
        encode: Frame of an event (default :func:`event_frame`).
        pings: Ping with ``event: ping`` frames a script sees, one at once.
        refusal: Returns once ``authorize``, asked again, refuses the stream: an
            ``event: refused`` frame says why and the stream ends.
    """

    def __init__(
        self,
        feed: Feed,
        *,
        keepalive: float,
        streams: OpenStreams,
        encode: Frame = event_frame,
        pings: bool = False,
        refusal: Refusal | None = None,
    ) -> None:
        self.feed = feed
        self.refusal = refusal
        self.keepalive = keepalive
        self.pings = pings
        self._ping = ping_event(keepalive) if pings else PING
        self.streams = streams
        self.encode = encode
        self._last_write = 0.0
        # What frameworks expect of a Response (FastAPI may attach background tasks).
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.raw_headers = list(HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        if scope.get("method") == "HEAD":
            await send(start)
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            await self.feed.__aenter__()
        except (LogUnavailable, NotConnected) as exc:
            await error_response(send, 503, unavailable(exc))
            return
        try:
            with self.streams.open() as stop:
                await send(start)
                if await self._stream(receive, send, stop):
                    await last_write(send({"type": "http.response.body", "body": b""}))
        except OSError:  # the client went away while a frame was being written
            pass
        finally:
            await self.feed.__aexit__(None, None, None)
        if self.background is not None:
            await self.background()

    async def _stream(self, receive: Receive, send: Send, stop: asyncio.Future[None]) -> bool:
        """Stream until the feed ends, the client leaves or ``stop``; whether to end
        the body (not after a disconnect)."""
        lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._last_write = loop.time()

        async def write(chunk: bytes) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._last_write = loop.time()

        tasks: list[Awaitable[Any]] = [self._pump(write), self._watch(receive, write, stop)]
        if self.refusal is not None:
            tasks.append(self.refusal())
        pump, watch, *revoked = await first_of(*tasks)
        if revoked and revoked[0].done() and not revoked[0].cancelled():
            return await self._refused(revoked[0], write)
        if pump.done() and not pump.cancelled():
            error = pump.exception()
            if isinstance(error, OSError):
                return False
            if error is not None:
                # The transport or the log failed: end the stream; the client comes
                # back with its Last-Event-ID and resumes exactly.
                logger.warning("stream of %r ended: %r", self.feed.channel, error)
                if not isinstance(error, BroadcastError):
                    raise error
            return True
        if not watch.cancelled() and watch.exception() is None:
            return bool(watch.result())
        return False

    async def _pump(self, write: Callable[[bytes], Any]) -> None:
        encode = self.encode
        feed = self.feed
        await write(opening_frame(feed) + (self._ping if self.pings else b""))
        async for item in feed:
            frame = encode(item) if isinstance(item, Event) else reset_frame(item)
            more = feed.take_read(FRAMES_PER_WRITE - 1, WRITE_BYTES - len(frame))
            if not more:
                await write(frame)
                if not feed.live:  # large events in hand: a turn after each (see below)
                    await asyncio.sleep(0)
                continue
            # Replayed events are in hand, so writing them never waits: in chunks, with
            # a turn of the loop after each, a client gone meanwhile is noticed after a
            # chunk. Frame by frame, it was noticed at the page's end, and asyncio
            # logged a warning for every frame written to the closed socket.
            frames = [frame]
            try:
                for event in more:
                    frames.append(encode(event))
            except Exception:  # the encoder failed: the events before it still go out
                await write(b"".join(frames))
                raise
            await write(b"".join(frames))
            await asyncio.sleep(0)

    async def _refused(self, revoked: asyncio.Future[str], write: Callable[[bytes], Any]) -> bool:
        """End a stream ``authorize``, asked again, no longer allows: an ``event:
        refused`` frame says why, after the last event written (the feed stopped).
        Its ``HTTPException`` of another status than 401 or 403 (503: it could not
        tell), or an ``OSError``, ends the stream without a refusal: the client comes
        back. Whether to end the body."""
        error = revoked.exception()
        if error is None:
            with contextlib.suppress(OSError):
                await last_write(write(refused_frame(revoked.result())))
            return True
        logger.warning("stream of %r ended: authorize failed: %r", self.feed.channel, error)
        # Nothing was written by the refusal: an OSError is authorize's own (its
        # session store refusing connections), not the client leaving; like its
        # HTTPException, it ends the body and the client comes back. Anything else is
        # a bug, raised for the server to report.
        if isinstance(error, (HTTPException, OSError)):
            return True
        raise error

    async def _watch(
        self, receive: Receive, write: Callable[[bytes], Any], stop: asyncio.Future[None]
    ) -> bool:
        """Ping an idle stream; return on disconnect (``False``) or ``stop`` (``True``)."""
        loop = asyncio.get_running_loop()
        receiving = asyncio.ensure_future(receive())
        try:
            while True:
                wait = self._last_write + self.keepalive - loop.time()
                if wait <= 0:
                    if not await unless_stopped(stop, write(self._ping)):
                        return True
                    continue
                await asyncio.wait(
                    (receiving, stop), timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if stop.done():
                    return True
                if receiving.done():
                    if receiving.result()["type"] == "http.disconnect":
                        return False
                    receiving = asyncio.ensure_future(receive())
        finally:
            receiving.cancel()
