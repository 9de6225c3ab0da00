"""Running an app with event streams under uvicorn (the ``admin`` extra) until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from types import FrameType
from typing import Any

import uvicorn

#: Seconds a shutdown waits for the streams to be over when the config sets no
#: ``timeout_graceful_shutdown``.
FINISH_WAIT = 5.0


class StreamServer(uvicorn.Server):
    """A uvicorn server for an app with ``app.state.close_streams``,
    ``finish_streams`` and ``stopping_streams`` (given as an object, not an import
    string): event streams end at the signal, shutdown lets them finish before it
    closes the connections, and streams opened during the shutdown end too.

    Event streams never end by themselves: without the first, shutdown would wait for
    them, then cancel them and log each one as an error. Without the second, uvicorn
    closes every WebSocket with 1012 at once, and the answer to a publish under way
    is lost (the event is stored all the same). Without the third, so are the
    streams whose request was still subscribing when the others had finished.
    One app, one server at a time: streams of another server of the same app end
    while this one stops.
    """

    def _streams(self, name: str) -> Any:
        """The app's ``close_streams``, ``finish_streams`` or ``stopping_streams``
        (``None``: it has none)."""
        return getattr(getattr(self.config.app, "state", None), name, None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        close = self._streams("close_streams")
        if close is not None:
            close()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopping = self._streams("stopping_streams")
        # The whole shutdown: a stream whose request was still under way (subscribing)
        # when the others finished ends too, instead of being cancelled at the end.
        with stopping() if stopping is not None else contextlib.nullcontext():
            await self._shutdown(sockets)

    async def _shutdown(self, sockets: list[socket.socket] | None) -> None:
        finish = self._streams("finish_streams")
        timeout = self.config.timeout_graceful_shutdown
        if finish is not None:
            # No new connection while the streams finish: it would be served by a
            # process that is stopping (uvicorn's shutdown closes them again: no harm).
            for server in getattr(self, "servers", ()):
                server.close()
            loop = asyncio.get_running_loop()
            started = loop.time()
            finishing = asyncio.ensure_future(finish(FINISH_WAIT if timeout is None else timeout))
            while not finishing.done() and not self.force_exit:  # a second Ctrl-C
                await asyncio.wait((finishing,), timeout=0.1)
            finishing.cancel()
            await asyncio.gather(finishing, return_exceptions=True)
            if timeout is not None:
                # One budget for both waits, as the setting says.
                left = timeout - (loop.time() - started)
                self.config.timeout_graceful_shutdown = max(0, math.ceil(left))
        await super().shutdown(sockets)


def serve_until_stopped(app: Any, **options: Any) -> None:
    """Serve ``app`` with a :class:`StreamServer` until SIGINT or SIGTERM; ``options``
    go to ``uvicorn.Config``."""
    # After a graceful stop uvicorn raises the signal again; as with uvicorn.run,
    # Ctrl-C then ends the command normally.
    with contextlib.suppress(KeyboardInterrupt):
        StreamServer(uvicorn.Config(app, **options)).run()
