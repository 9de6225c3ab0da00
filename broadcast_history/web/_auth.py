"""Who may subscribe and publish: the ``authorize`` callable of the streaming app."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from .._errors import BroadcastError, InvalidArgument

Action = Literal["subscribe", "publish"]

#: ``async (connection, channel, action) -> bool``: ``connection`` is the Starlette
#: ``Request`` or ``WebSocket``, ``action`` ``"subscribe"`` or ``"publish"``.
Authorize = Callable[[Any, str, Action], "Awaitable[bool] | bool"]


class Forbidden(BroadcastError):
    """``authorize`` said no (HTTP 403, WebSocket close code 1008)."""


async def allow_all(connection: Any, channel: str, action: Action) -> bool:
    """The open policy: anyone may subscribe to (and, if enabled, publish on) any channel.

    Passing it is saying so on purpose: ``create_stream_app`` has no default policy.
    """
    return True


def check_authorize(authorize: Any) -> Authorize:
    """Return ``authorize`` if it is callable, else raise."""
    if not callable(authorize):
        raise InvalidArgument(
            "authorize must be an async callable (connection, channel, action) -> bool; "
            "pass broadcast_history.web.allow_all to let everyone in"
        )
    result: Authorize = authorize
    return result


async def require(authorize: Authorize, connection: Any, channel: str, action: Action) -> None:
    """Raise :class:`Forbidden` unless ``authorize`` allows ``action`` on ``channel``."""
    allowed = authorize(connection, channel, action)
    if inspect.isawaitable(allowed):
        allowed = await allowed
    if allowed is not True:
        # Only True lets in: a policy that forgot to return anything keeps the door shut.
        raise Forbidden(f"not allowed to {action} on this channel")
