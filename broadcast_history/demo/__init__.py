"""A realtime chat that never loses a message: the demo of broadcast_history.

Run it with ``broadcast-history demo`` (or ``python -m broadcast_history.demo``), or
mount :func:`create_app` in your own server. Needs the ``admin`` extra (Starlette,
uvicorn, Typer)::

    from broadcast_history import Broadcast
    from broadcast_history.demo import create_app

    app = create_app(Broadcast("memory://", log="sqlite+aiosqlite:///chat.db"))
"""

from ._app import create_app
from ._command import demo, serve

__all__ = ["create_app", "demo", "serve"]
