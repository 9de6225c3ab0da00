"""The chat demo as a Starlette app: a static page and a small JSON/SSE/WebSocket API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._broadcast import Broadcast
from .._errors import InvalidArgument
from .._parse import parse_int
from ._feed import (
    ROOM_PREFIX,
    encode_message,
    message_item,
    parse_position,
    room_channel,
    room_feed,
    sse_frame,
)
from ._limits import MAX_BODY, BodyTooLarge, RateLimit, RateLimits, read_body

STATIC = Path(__file__).parent / "static"
MAX_TEXT = 2000
MAX_AUTHOR = 40


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    return parse_int(value, name)


def _parse_message(body: Any) -> tuple[str, str]:
    if not isinstance(body, dict):
        raise InvalidArgument("send a JSON object {author, text}")
    text, author = body.get("text"), body.get("author") or "anonymous"
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("text must be a non-empty string")
    if not isinstance(author, str):
        raise InvalidArgument("author must be a string")
    if len(text) > MAX_TEXT or len(author) > MAX_AUTHOR:
        raise InvalidArgument(f"text is limited to {MAX_TEXT}, author to {MAX_AUTHOR} characters")
    return author.strip(), text


def create_app(
    broadcast: Broadcast,
    *,
    history: int = 50,
    heartbeat: float = 15.0,
    message_rate: tuple[float, float] = (5.0, 20.0),
) -> Starlette:
    """The chat demo as an ASGI app; it connects ``broadcast`` for its lifetime.

    Args:
        broadcast: The broadcast to publish and subscribe on (not yet connected).
        history: Messages a page starts with when it has no position yet.
        heartbeat: Seconds between keep-alive pings on idle streams.
        message_rate: Messages per second, and burst, one client address (HTTP) or
            one WebSocket may send.

    The returned app has ``app.state.close_streams``: a function, safe to call from a
    signal handler or another thread, that ends every open stream so that the server
    can stop at once.
    """
    stopping = asyncio.Event()
    loop: asyncio.AbstractEventLoop | None = None
    posts = RateLimits(rate=message_rate[0], burst=message_rate[1])

    def close_streams() -> None:
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def info(request: Request) -> Response:
        return JSONResponse(
            {
                "transport": type(broadcast.backend).__name__,
                "log": broadcast.log.url.render_as_string(hide_password=True),
            }
        )

    async def rooms(request: Request) -> Response:
        found = await broadcast.log.channels(prefix=ROOM_PREFIX, limit=200)
        return JSONResponse(
            [
                {"room": c.name[len(ROOM_PREFIX) :], "messages": c.count, "last": c.last_offset}
                for c in found
            ]
        )

    async def post_message(request: Request) -> Response:
        channel = room_channel(request.path_params["room"])
        if channel is None:
            return _error(404, "no such room name")
        if not posts.allow(request.client.host if request.client else "?"):
            return _error(429, "too many messages: slow down")
        try:
            author, text = _parse_message(json.loads(await read_body(request)))
            event = await broadcast.publish(channel, encode_message(author, text))
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        except ValueError as exc:  # bad JSON, or an InvalidArgument (bad text)
            return _error(422, str(exc))
        return JSONResponse(message_item(event), status_code=201)

    async def room_history(request: Request) -> Response:
        channel = room_channel(request.path_params["room"])
        if channel is None:
            return _error(404, "no such room name")
        try:
            before = _int_param(request, "before", None)
            limit = min(_int_param(request, "limit", 20) or 20, 200)
        except InvalidArgument as exc:
            return _error(422, str(exc))
        page = await broadcast.log.read(channel, before=before, limit=limit, order="desc")
        return JSONResponse([message_item(event, replayed=True) for event in page])

    async def events(request: Request) -> Response:
        channel = room_channel(request.path_params["room"])
        if channel is None:
            return _error(404, "no such room name")
        # EventSource resends the last id it saw in Last-Event-ID when it reconnects by
        # itself; a page that reconnects on purpose passes it as ?last= instead.
        last = parse_position(request.headers.get("last-event-id")) or parse_position(
            request.query_params.get("last")
        )

        async def frames() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            async for item in room_feed(
                broadcast, channel, last, history=history, heartbeat=heartbeat, stop=stopping
            ):
                yield sse_frame(item)

        return StreamingResponse(
            frames(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def websocket(ws: WebSocket) -> None:
        channel = room_channel(ws.path_params["room"])
        if channel is None:
            await ws.close(code=4404)
            return
        await ws.accept()
        last = parse_position(ws.query_params.get("last"))

        async def send_feed() -> None:
            async for item in room_feed(
                broadcast, channel, last, history=history, heartbeat=heartbeat, stop=stopping
            ):
                await ws.send_json(item)

        async def receive() -> None:
            # The page may publish over the socket: {"type": "publish", author, text}.
            limit = RateLimit(*message_rate)
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    frame = await ws.receive_text()
                    try:
                        if len(frame) > MAX_BODY:
                            raise InvalidArgument(f"frames are limited to {MAX_BODY} bytes")
                        if not limit.allow():
                            raise InvalidArgument("too many messages: slow down")
                        author, text = _parse_message(json.loads(frame))
                        await broadcast.publish(channel, encode_message(author, text))
                    except ValueError as exc:  # bad JSON, or an InvalidArgument
                        await ws.send_json({"type": "error", "detail": str(exc)})

        tasks = [asyncio.create_task(send_feed()), asyncio.create_task(receive())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Closed by the client already: Starlette says RuntimeError, uvicorn a disconnect.
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal loop
        loop = asyncio.get_running_loop()
        stopping.clear()
        async with broadcast:
            yield

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", info),
            Route("/api/rooms", rooms),
            Route("/api/rooms/{room}/messages", post_message, methods=["POST"]),
            Route("/api/rooms/{room}/history", room_history),
            Route("/api/rooms/{room}/events", events),
            WebSocketRoute("/api/rooms/{room}/ws", websocket),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.close_streams = close_streams
    return app
