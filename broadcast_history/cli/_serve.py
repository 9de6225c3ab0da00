"""``serve``: the admin HTTP API under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from .._broadcast import Broadcast
from ._app import app, err_console, fail
from ._options import DEFAULT_LOG, DEFAULT_URL, LogOption, UrlOption


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(envvar="BROADCAST_HISTORY_TOKEN", help="Bearer token clients must send."),
    ] = None,
    allow_no_token: Annotated[
        bool, typer.Option("--allow-no-token", help="Serve without a token (local use only).")
    ] = False,
    log: LogOption = DEFAULT_LOG,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Serve the admin HTTP API (OpenAPI docs at /docs, operator console at /ui/)."""
    try:
        import uvicorn  # noqa: F401  (the admin extra: missing, say so before anything starts)

        from ..admin import create_app
        from ..web._serving import serve_until_stopped
    except ImportError as exc:
        fail(f"{exc}: pip install 'broadcast-history[admin]'", 1)
    if not token and not allow_no_token:
        fail("give --token (or BROADCAST_HISTORY_TOKEN), or --allow-no-token for local use", 2)
    try:
        broadcast = Broadcast(url, log=log)
        # The token is checked here too (printable ASCII, no spaces).
        application = create_app(broadcast, token=token, allow_no_token=allow_no_token)
    except ValueError as exc:
        fail(str(exc), 2)
    except ImportError as exc:  # the transport's or the log's driver is missing
        fail(str(exc), 1)
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    err_console.print(f"admin API on {base} (docs: {base}/docs)", markup=False)
    err_console.print(f"operator console: {base}/ui/", markup=False)

    serve_until_stopped(application, host=host, port=port, timeout_graceful_shutdown=2)
