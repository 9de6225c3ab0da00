"""Running an app with event streams under uvicorn (the ``admin`` extra) until a signal."""

from __future__ import annotations

import contextlib
import socket
from types import FrameType
from typing import Any

import uvicorn

#: Seconds a shutdown waits for the streams to be over when the config sets no
#: ``timeout_graceful_shutdown``.
FINISH_WAIT = 5.0


class StreamServer(uvicorn.Server):
    """A uvicorn server for an app with ``app.state.close_streams`` and
    ``finish_streams``: event streams end at the signal, and shutdown lets them finish
    before it closes the connections.

    Event streams never end by themselves: without the first, shutdown would wait for
    them, then cancel them and log each one as an error. Without the second, uvicorn
    closes every WebSocket with 1012 at once, and the answer to a publish under way
    is lost (the event is stored all the same).
    """

    @property
    def _state(self) -> Any:
        """The app's state: its ``close_streams`` and ``finish_streams``."""
        app: Any = self.config.app
        return app.state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.close_streams()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timeout = self.config.timeout_graceful_shutdown
        await self._state.finish_streams(FINISH_WAIT if timeout is None else timeout)
        await super().shutdown(sockets)


def serve_until_stopped(app: Any, **options: Any) -> None:
    """Serve ``app`` with a :class:`StreamServer` until SIGINT or SIGTERM; ``options``
    go to ``uvicorn.Config``."""
    # After a graceful stop uvicorn raises the signal again; as with uvicorn.run,
    # Ctrl-C then ends the command normally.
    with contextlib.suppress(KeyboardInterrupt):
        StreamServer(uvicorn.Config(app, **options)).run()
