"""Channel names in URL paths: encoded slashes kept apart, control characters and
bytes that are not UTF-8 refused."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import Path, Request
from fastapi.responses import JSONResponse

from .._validation import check_channel, check_consumer
from ..web._paths import undecodable_path

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Stands for an encoded slash (%2F) inside a channel name while routing: a control
# character, so never part of a valid channel name.
_SLASH = "\x1f"


class EncodedSlashes:
    """Keep ``%2F`` apart from ``/`` so ``/channels/a%2Fevents`` is channel "a/events".

    Servers decode the path before routing, which makes a channel named "a/events"
    look like the events route of channel "a". The raw path still tells them apart.
    A path with a control character (``%0A``), or whose bytes are not UTF-8 (``%FF``,
    which servers turn into U+FFFD), cannot hold a valid channel name: it is answered
    400 here, as an invalid name is, since no route would match it or several
    spellings would reach one channel.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = None
            if _CONTROL.search(scope.get("path", "")):
                refusal = "the path holds a control character: not a valid channel or consumer name"
            elif undecodable_path(scope):
                refusal = "the path is not valid UTF-8: not a valid channel or consumer name"
            if refusal is not None:
                await JSONResponse({"detail": refusal}, status_code=400)(scope, receive, send)
                return
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw:
            lowered = raw.split(b"?", 1)[0].lower()
            if b"%2f" in lowered and b"%1f" not in lowered:
                path = raw.split(b"?", 1)[0].decode("latin-1")
                path = path.replace("%2F", _SLASH).replace("%2f", _SLASH)
                scope = dict(scope, path=unquote(path), bh_encoded_slashes=True)
        await self.app(scope, receive, send)


def channel_from_path(request: Request, channel: Annotated[str, Path()]) -> str:
    """The ``{channel}`` of a route, with its encoded slashes restored, checked."""
    if request.scope.get("bh_encoded_slashes"):
        channel = channel.replace(_SLASH, "/")
    return check_channel(channel)


def consumer_from_path(request: Request, name: Annotated[str, Path()]) -> str:
    """The ``{name}`` of a consumer route, with its encoded slashes restored, checked."""
    if request.scope.get("bh_encoded_slashes"):
        name = name.replace(_SLASH, "/")
    return check_consumer(name)
