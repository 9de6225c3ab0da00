"""The operator console: a static page at ``/ui`` that uses the admin API from the browser.

The page, its styles and scripts hold no data, so they are served without the token;
the page asks the operator for it and sends it on every API call like any other client.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static" / "console"

# Messages are shown as text, never as markup; this policy is the second line of
# defence for the token the page keeps: no inline script, nothing from elsewhere.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time, so a page upgraded with the package is not mixed with
    # cached scripts of the previous version.
    "Cache-Control": "no-cache",
}


class _ConsoleFiles(StaticFiles):
    """The console's directory, with the headers above on every file."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_HEADERS)
        return response


async def _to_console(_request: Request) -> Response:
    # Relative, so it also works where the admin app is mounted under a prefix.
    return RedirectResponse("ui/", status_code=308)


def add_console(app: FastAPI) -> None:
    """Serve the console at ``/ui/`` (and redirect ``/ui`` there), without the token.

    Plain Starlette routes: the app-wide token dependency applies to the API routes
    only. ``StaticFiles`` answers 404 for any path that resolves outside its directory.
    """
    app.add_route("/ui", _to_console, include_in_schema=False)
    app.mount("/ui", _ConsoleFiles(directory=STATIC, html=True), name="console")
