"""Channel names from URL paths, refused when the path's bytes are not UTF-8."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.requests import HTTPConnection

from .._errors import InvalidArgument
from .._validation import check_channel

_REPLACED = "\ufffd"
#: What a path that is not UTF-8 is answered (400).
NOT_UTF8 = "the path is not valid UTF-8: not a valid channel name"


def undecodable_path(scope: Mapping[str, Any]) -> bool:
    """Whether the request's path, percent-decoded, is not valid UTF-8.

    Servers decode it with replacement characters (``%FF`` becomes U+FFFD), which
    would make one channel of every invalid spelling; the raw path tells them apart
    from a U+FFFD that was sent as such (``%EF%BF%BD``).
    """
    if _REPLACED not in scope.get("path", ""):
        return False
    raw = scope.get("raw_path")
    if not raw:
        return False
    try:
        unquote_to_bytes(raw.split(b"?", 1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def channel_from_path(connection: HTTPConnection) -> str:
    """The ``{channel}`` of a route, checked.

    Raises:
        InvalidArgument: The path is not UTF-8, or the name is not a valid channel name.
    """
    if undecodable_path(connection.scope):
        raise InvalidArgument(NOT_UTF8)
    if "\n" in connection.scope.get("path", ""):
        # A route's pattern ends in `$`, which matches before a final line feed:
        # /chat%0A was channel "chat". (No `{channel}` can hold one.)
        raise InvalidArgument("a channel name in a URL path cannot hold a line feed")
    return check_channel(connection.path_params["channel"])
