"""``broadcast-history demo``: serve the chat demo, on the embedded default or on services."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from .._broadcast import Broadcast
from .._errors import BroadcastError
from .._redact import redacted

DEFAULT_DATA_DIR = Path(".data")


def default_log_url(data_dir: Path) -> str:
    """The embedded log: a SQLite file in ``data_dir`` (created if missing)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{(data_dir / 'demo.db').resolve()}"


async def _reachable(live: str, log: str) -> None:
    async with Broadcast(live, log=log):
        pass


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    live: str = "memory://",
    log: str | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
) -> None:
    """Run the chat demo with uvicorn until interrupted.

    Args:
        host: Interface to listen on.
        port: TCP port.
        live: Live transport URL (``memory://``, ``redis://...``, ``kafka://...``).
        log: Event log URL; default: ``<data_dir>/demo.db`` (SQLite).
        data_dir: Where the default SQLite log lives.
    """
    from ..log import Retention
    from ..web._serving import serve_until_stopped
    from ._app import create_app
    from ._limits import MAX_BODY

    try:
        log_url = log or default_log_url(data_dir)
    except OSError as exc:
        typer.echo(f"Error: cannot create the data directory {data_dir}: {exc}", err=True)
        raise typer.Exit(2) from None
    # Connected once before serving: an unreachable log or transport is one line and
    # exit code 3, as in the other commands, not uvicorn's startup traceback.
    try:
        asyncio.run(_reachable(live, log_url))
    except (BroadcastError, ValueError, ImportError) as exc:
        typer.echo(f"Error: cannot start the demo: {exc}", err=True)
        code = 2 if isinstance(exc, ValueError) else 1 if isinstance(exc, ImportError) else 3
        raise typer.Exit(code) from None
    # A demo anyone can write to keeps a bounded history per room.
    retention = Retention(max_events=10_000, max_age=timedelta(days=7), interval=60.0)
    app = create_app(Broadcast(live, log=log_url, retention=retention))
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host  # noqa: S104
    print(f"broadcast_history chat demo: http://{shown}:{port}/", flush=True)
    print(f"  live transport: {redacted(live)}\n  event log:      {redacted(log_url)}", flush=True)
    print("  open it in two windows, press 'Drop connection' in one, chat in the other.")

    serve_until_stopped(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=3,
        ws_max_size=MAX_BODY,
    )


def demo(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    data_dir: Annotated[
        Path, typer.Option(help="Directory of the default SQLite log.")
    ] = DEFAULT_DATA_DIR,
    live: Annotated[
        str, typer.Option(help="Live transport URL: memory://, redis://, postgres://, kafka://.")
    ] = "memory://",
    log: Annotated[
        str | None,
        typer.Option(help="Event log URL (default: a SQLite file in --data-dir)."),
    ] = None,
) -> None:
    """Serve the realtime chat demo (rooms, SSE and WebSocket, catch-up on reconnect)."""
    serve(host=host, port=port, live=live, log=log, data_dir=data_dir)
