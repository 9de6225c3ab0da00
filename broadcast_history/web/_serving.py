"""Running an app with event streams under uvicorn (the ``admin`` extra) until a signal."""

from __future__ import annotations

import contextlib
from types import FrameType
from typing import Any


def serve_until_stopped(app: Any, **options: Any) -> None:
    """Serve ``app`` (with ``app.state.close_streams``) until SIGINT or SIGTERM.

    Event streams never end by themselves: at the signal they are ended, or shutdown
    would wait for them, then cancel them and log each one as an error. ``options``
    go to ``uvicorn.Config``.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.state.close_streams()
            super().handle_exit(sig, frame)

    # After a graceful stop uvicorn raises the signal again; as with uvicorn.run,
    # Ctrl-C then ends the command normally.
    with contextlib.suppress(KeyboardInterrupt):
        Server(uvicorn.Config(app, **options)).run()
