"""broadcast_history: asyncio broadcast where every publish is logged.

Publish once, subscribe from an offset or a time, and get history then live events
with no gap and no duplicate. See ``Broadcast``.
"""

from ._broadcast import Broadcast
from ._errors import (
    BroadcastError,
    ConsumerBusy,
    HistoryTruncated,
    ImportConflict,
    InvalidArgument,
    InvalidMessage,
    LogError,
    LogUnavailable,
    MessageTooLarge,
    NotConnected,
    OffsetOutOfRange,
    PositionError,
    SchemaOutOfDate,
    StreamReset,
    TransportError,
    Unsubscribed,
)
from ._event import Event
from ._subscriber import Subscriber
from .backends import BroadcastBackend
from .log import ChannelInfo, ConsumerInfo, EventLog, LogTotals, Retention

__version__ = "0.1.0"

__all__ = [
    "Broadcast",
    "BroadcastBackend",
    "BroadcastError",
    "ChannelInfo",
    "ConsumerBusy",
    "ConsumerInfo",
    "Event",
    "EventLog",
    "HistoryTruncated",
    "ImportConflict",
    "InvalidArgument",
    "InvalidMessage",
    "LogError",
    "LogTotals",
    "LogUnavailable",
    "MessageTooLarge",
    "NotConnected",
    "OffsetOutOfRange",
    "PositionError",
    "Retention",
    "SchemaOutOfDate",
    "StreamReset",
    "Subscriber",
    "TransportError",
    "Unsubscribed",
    "__version__",
]
