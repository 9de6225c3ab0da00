"""A host app around ``create_stream_app``, run as its own process by the web tests.

``python -m tests.support.web_server --port P --log URL`` serves, on 127.0.0.1:

* ``/events/...``: the streaming app (``allow_all``, publishing on, 1 s keepalive),
  mounted as the docs show;
* ``/``: a test page that streams a channel with ``/events/client.js``
  (``?channel=&transport=sse|ws``), keeps what it has shown in ``localStorage`` and
  exposes it as ``window.shown`` and ``window.resets``;
* ``/stats``: the process's live subscriptions, open streams, RSS and open files.

The live transport is ``memory://``: another process reaches the server's channels
only through the shared log, which an idle subscriber checks every 0.2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from broadcast_history import Broadcast
from broadcast_history.web import allow_all, create_stream_app
from broadcast_history.web._serving import StreamServer

PAGE = Path(__file__).with_name("web_page.html")


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_files() -> list[str]:
    """What the process's file descriptors point at (sockets, the log's files...)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def make_app(broadcast: Broadcast) -> Starlette:
    streams = create_stream_app(broadcast, authorize=allow_all, publish=True, keepalive=1.0)

    async def nobody(connection: object, channel: str, action: str) -> bool:
        return False

    closed = create_stream_app(broadcast, authorize=nobody)
    revoked: set[str] = set()

    async def unless_revoked(connection: Request, channel: str, action: str) -> bool:
        return connection.query_params.get("token") not in revoked

    # Streams asked again every 0.2 s; POST /revoke?token=... revokes a token.
    revocable = create_stream_app(broadcast, authorize=unless_revoked, recheck=0.2)

    async def revoke(request: Request) -> Response:
        revoked.add(request.query_params["token"])
        return PlainTextResponse("revoked")

    async def page(request: Request) -> Response:
        return FileResponse(PAGE)

    async def stats(request: Request) -> Response:
        subscribers = sum(len(group) for group in broadcast._subscribers.values())
        return JSONResponse(
            {
                "subscriptions": subscribers,
                "streams": len(streams.state.streams),
                "rss_kb": rss_kb(),
                "fds": len(os.listdir("/proc/self/fd")),
                "sockets": sum(f.startswith("socket:") for f in open_files()),
                "files": sorted(f for f in open_files() if not f.startswith("socket:")),
            }
        )

    async def denied(request: Request) -> Response:
        # As an app's authorize raising HTTPException(401, "log in again") answers.
        return PlainTextResponse("log in again", status_code=401)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/stats", stats),
            Route("/denied", denied, methods=["GET", "POST"]),
            Mount("/events", streams),
            Mount("/closed", closed),
            Route("/revoke", revoke, methods=["POST"]),
            Mount("/revocable", revocable),
        ],
        lifespan=lifespan,
    )
    app.state.close_streams = streams.state.close_streams
    app.state.finish_streams = streams.state.finish_streams
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--buffer-bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--page-bytes", type=int, default=4 * 1024 * 1024)
    args = parser.parse_args()
    broadcast = Broadcast(
        "memory://",
        log=args.log,
        idle_check=0.2,
        buffer_bytes=args.buffer_bytes,
        page_bytes=args.page_bytes,
    )
    app = make_app(broadcast)

    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_level="warning", timeout_graceful_shutdown=1
    )
    StreamServer(config).run()


if __name__ == "__main__":
    main()
