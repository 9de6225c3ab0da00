"""The server process of the web fan-out benchmark.

``python -m bench.web_server --port P --log URL [--impl ours|sse-starlette]`` serves,
with uvicorn in one process, ``create_stream_app`` (``ours``), or the same feed and
publish route through sse-starlette's ``EventSourceResponse`` and ``ServerSentEvent``
(``sse-starlette``: what the streaming app would be had it taken that library), so
the two can be compared on the same load.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broadcast_history import Broadcast, Event
from broadcast_history._parse import Position
from broadcast_history.web import Feed, allow_all, create_stream_app
from broadcast_history.web._publish import event_info, publish_request


def sse_starlette_app(broadcast: Broadcast, keepalive: float) -> Starlette:
    from sse_starlette import EventSourceResponse, ServerSentEvent

    def ping() -> Any:
        return ServerSentEvent(comment="ping", sep="\n")

    async def frames(channel: str) -> AsyncIterator[Any]:
        async with Feed(broadcast, channel, Position()) as feed:
            yield ServerSentEvent(retry=1000, sep="\n")
            async for item in feed:
                if isinstance(item, Event):
                    message = item.message
                    kind = "message" if isinstance(message, str) else "binary"
                    data = (
                        message if isinstance(message, str) else base64.b64encode(message).decode()
                    )
                    event_id = f"{item.epoch}:{item.offset}"
                    yield ServerSentEvent(data, id=event_id, event=kind, sep="\n")
                else:
                    yield ServerSentEvent(
                        json.dumps(item.json()), id=item.id, event="reset", sep="\n"
                    )

    async def stream(request: Request) -> Response:
        return EventSourceResponse(
            frames(request.path_params["channel"]),
            ping=keepalive,
            ping_message_factory=ping,
            sep="\n",
        )

    async def publish(request: Request) -> Response:
        event = await publish_request(broadcast, request.path_params["channel"], request)
        return JSONResponse(event_info(event), status_code=201)

    return Starlette(
        routes=[
            Route("/{channel:path}", stream, methods=["GET"]),
            Route("/{channel:path}", publish, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--impl", choices=["ours", "sse-starlette"], default="ours")
    parser.add_argument("--buffer-bytes", type=int, default=1024 * 1024)
    parser.add_argument("--http", choices=["h11", "httptools"], default="h11")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    broadcast = Broadcast("memory://", log=args.log, buffer_bytes=args.buffer_bytes)
    if args.impl == "ours":
        inner = create_stream_app(broadcast, authorize=allow_all, publish=True)
    else:
        inner = sse_starlette_app(broadcast, 15.0)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield

    app = Starlette(lifespan=lifespan)
    app.mount("/", inner)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        http=args.http,
        loop=args.loop,
        backlog=4096,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
