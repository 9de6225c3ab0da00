"""Errors of the admin API.

All of them derive from :class:`~broadcast_history.BroadcastError`::

    BroadcastError
    ├── NotFound (also LookupError)
    │   ├── ChannelNotFound                   no channel of that name in the log
    │   ├── EventNotFound                     no stored event at that offset
    │   └── ConsumerNotFound                  no durable consumer of that name
    ├── ImportConflict                        the target log already has that channel
    └── InvalidArgument
        └── InvalidExport                     a JSON-lines export is malformed
"""

from __future__ import annotations

from .._errors import BroadcastError, ImportConflict, InvalidArgument

__all__ = [
    "ChannelNotFound",
    "ConsumerNotFound",
    "EventNotFound",
    "ImportConflict",
    "InvalidExport",
    "NotFound",
]


class NotFound(BroadcastError, LookupError):
    """What was asked for is not in the log."""


class ChannelNotFound(NotFound):
    """The log has no channel of that name."""


class EventNotFound(NotFound):
    """The channel has no stored event at that offset (never written, or trimmed)."""


class InvalidExport(InvalidArgument):
    """A line of a JSON-lines export is malformed; the message names the line."""


class ConsumerNotFound(NotFound):
    """The channel has no durable consumer of that name."""
