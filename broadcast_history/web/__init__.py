"""Realtime endpoints for apps: Server-Sent Events, WebSocket and HTTP publish.

:func:`create_stream_app` returns an ASGI app (Starlette) to mount in a web app, say
at ``/events``; browsers connect with the ES module it serves at ``/client.js``.
Every reconnect resumes exactly (event ids are ``<epoch>:<offset>``), and a position
that cannot be served is said with a ``reset`` before the stream goes on.

The app needs the ``web`` extra (``pip install 'broadcast-history[web]'``);
:class:`Feed` (what every stream face reads: events, and :class:`Reset` items for
positions that cannot be served), :class:`Position` and :func:`allow_all` do not, so
``create_stream_app`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._parse import Position
from ._auth import Action, Authorize, allow_all
from ._feed import Feed, Reset

if TYPE_CHECKING:
    from ._app import create_stream_app

__all__ = ["Action", "Authorize", "Feed", "Position", "Reset", "allow_all", "create_stream_app"]


if not TYPE_CHECKING:  # type checkers see the imports above: a misspelled name is an error

    def __getattr__(name: str) -> Any:
        if name != "create_stream_app":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:  # Starlette (the web extra) is needed from here on only
            from ._app import create_stream_app as app
        except ImportError as exc:  # pragma: no cover - depends on the install
            message = "the streaming app needs Starlette: pip install 'broadcast-history[web]'"
            raise ImportError(f"{message} ({exc})") from exc
        return app
