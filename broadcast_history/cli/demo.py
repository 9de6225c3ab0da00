"""``broadcast-history demo``: the chat demo (defined in :mod:`broadcast_history.demo`)."""

from __future__ import annotations

from ..demo._command import demo
from ._app import app

app.command("demo")(demo)
