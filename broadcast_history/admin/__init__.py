"""Admin history API: one query layer (:class:`HistoryAdmin`), served over HTTP
(:func:`create_app`) and by the ``broadcast-history`` command line.

The HTTP app needs the ``admin`` extra (``pip install 'broadcast-history[admin]'``);
the query layer does not, so ``create_app`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..log import ConsumerInfo
from ._errors import (
    ChannelNotFound,
    ConsumerNotFound,
    EventNotFound,
    ImportConflict,
    InvalidExport,
    NotFound,
)
from ._jsonl import event_json
from ._models import ChannelPage, ChannelStats, EventPage, ImportResult, RetentionStats
from ._query import HistoryAdmin

if TYPE_CHECKING:
    from ._http import create_app

__all__ = [
    "ChannelNotFound",
    "ChannelPage",
    "ChannelStats",
    "ConsumerInfo",
    "ConsumerNotFound",
    "EventNotFound",
    "EventPage",
    "HistoryAdmin",
    "ImportConflict",
    "ImportResult",
    "InvalidExport",
    "NotFound",
    "RetentionStats",
    "create_app",
    "event_json",
]


if not TYPE_CHECKING:  # type checkers see the imports above: a misspelled name is an error

    def __getattr__(name: str) -> Any:
        if name == "create_app":
            try:
                from ._http import create_app
            except ImportError as exc:  # pragma: no cover - depends on the install
                extra = "pip install 'broadcast-history[admin]'"
                raise ImportError(f"the admin HTTP API needs FastAPI: {extra} ({exc})") from exc
            return create_app
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
