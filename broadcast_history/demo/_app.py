"""The chat demo as a Starlette app: a static page, a small JSON API, and the streams.

The page reads its room through :mod:`broadcast_history.web` (mounted at
``/api/stream``, SSE or WebSocket, with ``client.js``) and writes through
``POST /api/rooms/{room}/messages``, which checks what a chat message is (author,
text, lengths) and how often one client may send.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from .._broadcast import Broadcast
from .._errors import InvalidArgument, MessageTooLarge
from .._parse import parse_int
from .._redact import redacted
from ..web import Action, create_stream_app
from ..web._pages import HEADERS, PageFiles
from ..web._publish import read_body
from ._limits import MAX_BODY, RateLimits
from ._rooms import ROOM_PREFIX, encode_message, is_room_channel, message_item, room_channel

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
    text, author = body.get("text"), body.get("author")
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("text must be a non-empty string")
    if author is not None and not isinstance(author, str):
        raise InvalidArgument("author must be a string")
    author = (author or "").strip() or "anonymous"
    if len(text) > MAX_TEXT or len(author) > MAX_AUTHOR:
        raise InvalidArgument(f"text is limited to {MAX_TEXT}, author to {MAX_AUTHOR} characters")
    return author, text


async def _rooms_only(connection: HTTPConnection, channel: str, action: Action) -> bool:
    """The streams serve chat rooms, read-only: messages go through the checked POST."""
    return action == "subscribe" and is_room_channel(channel)


def create_app(
    broadcast: Broadcast,
    *,
    heartbeat: float = 15.0,
    message_rate: tuple[float, float] = (5.0, 20.0),
) -> Starlette:
    """The chat demo as an ASGI app; it connects ``broadcast`` for its lifetime.

    Args:
        broadcast: The broadcast to publish and subscribe on (not yet connected).
        heartbeat: Seconds between keep-alive pings on idle streams.
        message_rate: Messages per second, and burst, one client address may send.

    The returned app has ``app.state.close_streams``: a function, safe to call from a
    signal handler or another thread, that ends every open stream so that the server
    can stop at once; ``app.state.finish_streams(timeout)``, which ends them and
    waits for them to be over; and ``app.state.stopping_streams()``, a context for a
    server's whole shutdown, in which streams opened meanwhile end too.
    """
    posts = RateLimits(rate=message_rate[0], burst=message_rate[1])
    streams = create_stream_app(broadcast, authorize=_rooms_only, keepalive=heartbeat)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=HEADERS)

    async def info(request: Request) -> Response:
        return JSONResponse(
            {
                "transport": type(broadcast.backend).__name__,
                # A public page: no password, in the user part or the query.
                "log": redacted(broadcast.log.url.render_as_string(hide_password=False)),
                "prefix": ROOM_PREFIX,
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
            body = await read_body(request, MAX_BODY)
            try:
                fields = json.loads(body)
            except ValueError:
                return _error(422, "send a JSON object {author, text}")
            author, text = _parse_message(fields)
            event = await broadcast.publish(channel, encode_message(author, text))
        except MessageTooLarge as exc:
            return _error(413, str(exc))
        except ValueError as exc:  # bad JSON, or an InvalidArgument (bad text)
            return _error(422, str(exc))
        except RecursionError:
            return _error(422, "the body is nested too deeply")
        return JSONResponse(message_item(event), status_code=201)

    async def room_history(request: Request) -> Response:
        channel = room_channel(request.path_params["room"])
        if channel is None:
            return _error(404, "no such room name")
        try:
            before = _int_param(request, "before", None)
            limit = min(_int_param(request, "limit", 20) or 1, 200)
        except InvalidArgument as exc:
            return _error(422, str(exc))
        page = await broadcast.log.read(channel, before=before, limit=limit, order="desc")
        return JSONResponse([message_item(event) for event in page])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield
            streams.state.close_streams()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", info),
            Route("/api/rooms", rooms),
            Route("/api/rooms/{room}/messages", post_message, methods=["POST"]),
            Route("/api/rooms/{room}/history", room_history),
            Mount("/api/stream", streams),
            Mount("/static", PageFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.close_streams = streams.state.close_streams
    app.state.finish_streams = streams.state.finish_streams
    app.state.stopping_streams = streams.state.stopping_streams
    return app
