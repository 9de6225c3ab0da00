"""Exceptions raised by broadcast_history.

Every exception the library raises on purpose derives from :class:`BroadcastError`::

    BroadcastError
    ├── InvalidArgument (also ValueError)     bad channel name, position or option
    │   ├── InvalidMessage (also TypeError)   message is neither str nor bytes
    │   └── MessageTooLarge                   message over the configured size limit
    ├── PositionError                         a start position that cannot be served
    │   ├── OffsetOutOfRange                  beyond the channel head, or negative
    │   ├── HistoryTruncated                  events after it were removed by retention
    │   └── StreamReset                       it belongs to an earlier epoch of the channel
    ├── LogError                              the durable log failed
    │   ├── LogUnavailable                    the database could not be reached
    │   └── SchemaOutOfDate                   the database schema needs `db upgrade`
    ├── ImportConflict                        a restored channel already exists in the log
    ├── ConsumerBusy                          another process holds the durable consumer
    ├── TransportError                        the live transport failed for good
    ├── NotConnected                          used before connect() or after disconnect()
    └── Unsubscribed                          the subscription ended (disconnect, or left)
"""

from __future__ import annotations


class BroadcastError(Exception):
    """Root of every error raised by broadcast_history."""


class InvalidArgument(BroadcastError, ValueError):
    """An argument (channel name, position, option) is not acceptable."""


class InvalidMessage(InvalidArgument, TypeError):
    """A message is neither ``str`` nor ``bytes``."""


class MessageTooLarge(InvalidArgument):
    """A message is larger than the broadcast's ``max_message_size``."""


class PositionError(BroadcastError):
    """A subscription's start position cannot be served."""


class OffsetOutOfRange(PositionError):
    """``since`` is negative or beyond the channel's last offset."""


class HistoryTruncated(PositionError):
    """Events the caller asked for were removed by retention or trimming."""


class StreamReset(PositionError):
    """The caller's position belongs to an earlier incarnation (epoch) of the channel."""


class LogError(BroadcastError):
    """The durable event log failed."""


class LogUnavailable(LogError):
    """The log database could not be reached or refused the operation."""


class SchemaOutOfDate(LogError):
    """The log database's schema is missing or older than this version expects."""


class ImportConflict(BroadcastError):
    """A channel being restored (imported) already exists in the log: nothing was stored."""


class ConsumerBusy(BroadcastError):
    """Another holder has the lease of a durable consumer, or took it over from this one.

    Raised by ``subscribe(..., consumer=..., wait=False)`` while another process holds
    the consumer, and by ``commit``/``get`` of a holder whose lease ran out: its work
    since its last commit will be done again by the next holder.
    """


class TransportError(BroadcastError):
    """The live transport failed and could not recover."""


class NotConnected(BroadcastError):
    """The broadcast is not connected."""


class Unsubscribed(BroadcastError):
    """The subscription has ended: the broadcast disconnected under it (or, for a
    consumer's ``commit``, its block was left and the lease given back)."""
