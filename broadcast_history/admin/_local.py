"""What an admin API served without a token still refuses: the rest of the web.

Without a token nothing tells the operator's own requests from those a web page in
the operator's browser makes. Such a page can send a form or a ``no-cors`` request
to ``localhost`` (a cross-site write: publish, import, delete), and one served from a
host name that resolves to 127.0.0.1 once loaded (DNS rebinding) can read the answers
too. So the app answers only requests addressed to a loopback name, and writes only
from its own origin or from clients that are not browsers (which send no Origin).
"""

from __future__ import annotations

from fastapi import HTTPException, Request

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_READS = {"GET", "HEAD", "OPTIONS"}


def _hostname(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def local_only(request: Request) -> None:
    """Refuse (403) a request that did not come from this machine's own clients."""
    host = request.headers.get("host", "")
    name = _hostname(host).lower()
    if name not in _LOOPBACK and not name.endswith(".localhost"):
        raise HTTPException(
            403,
            f"served without a token, the admin API answers only requests to localhost "
            f"(this one was to {host!r}): give it a token to serve others",
        )
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{host}"
    if request.method not in _READS and origin is not None and origin != own:
        raise HTTPException(
            403, f"served without a token, the admin API takes no writes from {origin!r}"
        )
