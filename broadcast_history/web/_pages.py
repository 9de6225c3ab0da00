"""Static pages (the operator console, the demo) served with a strict policy.

The pages show what others wrote (messages, channel names) as text, never as
markup; the policy is the second line of defence: no inline script, nothing loaded
from elsewhere, not framed by another site.
"""

from __future__ import annotations

import os

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

HEADERS = {
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


class PageFiles(StaticFiles):
    """A directory of page files, with :data:`HEADERS` on every one."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response
