"""The chat demo as an ASGI app you can serve, read and change.

    uvicorn examples.chat.app:app --port 8000

``broadcast-history demo`` runs the same app from the installed package; this file
shows how to put it on your own transport and log with environment variables:

    CHAT_LIVE=redis://localhost:6379 CHAT_LOG=postgresql://localhost/app \\
        uvicorn examples.chat.app:app --port 8001

The app itself (routes, the SSE/WebSocket feed, the page) lives in
``broadcast_history/demo/`` so that it ships inside the wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

from broadcast_history import Broadcast
from broadcast_history.demo import create_app

DATA = Path(os.environ.get("CHAT_DATA_DIR", ".data"))
DATA.mkdir(exist_ok=True)

broadcast = Broadcast(
    os.environ.get("CHAT_LIVE", "memory://"),
    log=os.environ.get("CHAT_LOG", f"sqlite+aiosqlite:///{DATA / 'chat.db'}"),
)
app = create_app(broadcast)
