"""The chat demo as an ASGI app you can serve, read and change.

    uvicorn examples.chat.app:app --port 8000 --timeout-graceful-shutdown 3

``broadcast-history demo`` runs the same app from the installed package; this file
shows how to put it on your own transport and log with environment variables:

    CHAT_LIVE=redis://localhost:6379 CHAT_LOG=postgresql://localhost/app \\
        uvicorn examples.chat.app:app --port 8001 --timeout-graceful-shutdown 3

(An open page streams until it is closed, and uvicorn waits for open connections
before shutting down: the timeout makes Ctrl-C end them, as the demo command does.)

The app itself (routes, the SSE/WebSocket feed, the page) lives in
``broadcast_history/demo/`` so that it ships inside the wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

from broadcast_history import Broadcast
from broadcast_history.demo import create_app


def _log_url() -> str:
    if "CHAT_LOG" in os.environ:
        return os.environ["CHAT_LOG"]
    data = Path(os.environ.get("CHAT_DATA_DIR", ".data"))
    data.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{data / 'chat.db'}"


broadcast = Broadcast(os.environ.get("CHAT_LIVE", "memory://"), log=_log_url())
app = create_app(broadcast)
