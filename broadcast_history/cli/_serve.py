"""``serve``: the admin HTTP API under uvicorn."""

from __future__ import annotations

import contextlib
from types import FrameType
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
        import uvicorn

        from ..admin import create_app
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
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    err_console.print(f"admin API on {base} (docs: {base}/docs)", markup=False)
    err_console.print(f"operator console: {base}/ui/", markup=False)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Event streams never end by themselves: end them, or shutdown waits for
            # them (then cancels them, logging each as an error).
            application.state.close_streams()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(application, host=host, port=port, timeout_graceful_shutdown=2)
    # After a graceful stop uvicorn raises the signal again (as uvicorn.run does,
    # Ctrl-C then ends the command normally).
    with contextlib.suppress(KeyboardInterrupt):
        Server(config).run()
