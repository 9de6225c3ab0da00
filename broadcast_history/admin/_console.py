"""The operator console: a static page at ``/ui`` that uses the admin API from the browser.

The page, its styles and scripts hold no data, so they are served without the token;
the page asks the operator for it and sends it on every API call like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..web._pages import PageFiles

STATIC = Path(__file__).parent / "static" / "console"


async def _to_console(_request: Request) -> Response:
    # Relative, so it also works where the admin app is mounted under a prefix.
    return RedirectResponse("ui/", status_code=308)


def add_console(app: FastAPI) -> None:
    """Serve the console at ``/ui/`` (and redirect ``/ui`` there), without the token.

    Plain Starlette routes: the app-wide token dependency applies to the API routes
    only. ``StaticFiles`` answers 404 for any path that resolves outside its directory.
    """
    app.add_route("/ui", _to_console, include_in_schema=False)
    app.mount("/ui", PageFiles(directory=STATIC, html=True), name="console")
