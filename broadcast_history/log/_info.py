"""Plain values the log takes and returns besides events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from .._errors import InvalidArgument
from .._validation import check_int, check_seconds


class Pending(NamedTuple):
    """A validated message waiting to be appended."""

    channel: str
    message: str | bytes
    key: str | None


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """State of one channel in the log.

    Attributes:
        name: Channel name.
        epoch: Incarnation; changes when the channel is deleted and used again.
        last_offset: Offset of the newest event (0 before the first publish).
        first_offset: Offset of the oldest event still stored (``last_offset + 1``
            when retention removed everything).
        last_timestamp: Timestamp of the newest event.
        trimmed_timestamp: Timestamp of the newest event removed by trimming.
        first_timestamp: Timestamp of the oldest event still stored.
    """

    name: str
    epoch: int
    last_offset: int
    first_offset: int
    last_timestamp: datetime | None
    trimmed_timestamp: datetime | None = None
    first_timestamp: datetime | None = None

    @property
    def count(self) -> int:
        """Number of events stored."""
        return max(0, self.last_offset - self.first_offset + 1)

    @property
    def trimmed(self) -> int:
        """Number of events removed by trimming or retention."""
        return max(0, self.first_offset - 1)


@dataclass(frozen=True, slots=True)
class LogTotals:
    """How much history the whole log holds.

    Attributes:
        channels: Number of channels.
        events: Events stored.
        trimmed: Events removed by trimming or retention, over every channel.
        oldest_timestamp: Timestamp of the oldest stored event.
        newest_timestamp: Timestamp of the newest event.
    """

    channels: int
    events: int
    trimmed: int
    oldest_timestamp: datetime | None
    newest_timestamp: datetime | None


@dataclass(frozen=True, slots=True)
class Retention:
    """How much history to keep per channel.

    Args:
        max_events: Keep at most this many newest events per channel.
        max_age: Remove events older than this.
        interval: Seconds between automatic retention passes of a connected broadcast
            (at least: passes wait 20 times as long as their search for channels
            takes, up to 60 s; a log of a million channels waits 2 to 9 s).
    """

    max_events: int | None = None
    max_age: timedelta | None = None
    interval: float = 1.0

    def __post_init__(self) -> None:
        if self.max_events is not None:
            check_int("max_events", self.max_events, minimum=1)
        if self.max_age is not None and (
            not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0)
        ):
            raise InvalidArgument("max_age must be a positive timedelta")
        check_seconds("interval", self.interval)


class RetentionPass(NamedTuple):
    """What one retention pass did (``EventLog.retention_pass``)."""

    #: Events removed.
    removed: int
    #: Seconds spent finding the channels to trim (the database reads every channel
    #: row: 0.1 to 0.5 s for a million on 2 cores, see docs/performance.md).
    searching: float


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """A durable consumer of a channel: its stored position and who holds it.

    Attributes:
        channel: The channel it reads.
        name: Its name (``subscribe(channel, consumer=name)``).
        epoch: The channel's epoch its position belongs to (``None`` before its first
            commit).
        position: Offset of the last event it committed (``None`` before its first
            commit).
        lag: Events published after its position (the channel's last offset minus
            it, trimmed ones included); ``None`` without a position, or when
            the position belongs to an earlier epoch of the channel (resuming it
            raises :class:`StreamReset`).
        updated_at: When its position was last stored.
        holder: The process holding its lease now (``host:pid:id``), ``None`` when
            free.
    """

    channel: str
    name: str
    epoch: int | None
    position: int | None
    lag: int | None
    updated_at: datetime | None
    holder: str | None


class ConsumerLags(NamedTuple):
    """The lags of durable consumers, as ``EventLog.consumer_lags`` reads them."""

    #: Consumers with a committed position, of a channel that exists.
    committed: int
    #: (channel, consumer, lag) of the largest lags, largest first.
    largest: list[tuple[str, str, int]]


class LeaseClaims(NamedTuple):
    """The outcome of ``EventLog.acquire_leases``.

    Attributes:
        taken: For each holder that got its lease: the stored (epoch, position), both
            ``None`` when none is stored.
        next_expiry: Seconds until the soonest lease of the consumers found held runs
            out unless renewed (``None``: none was held).
    """

    taken: dict[str, tuple[int | None, int | None]]
    next_expiry: float | None

    @classmethod
    def of(
        cls, taken: dict[str, tuple[int | None, int | None]], expiries: list[int]
    ) -> LeaseClaims:
        """``taken``, and the soonest of the held leases' ``expiries`` (microseconds)."""
        return cls(taken, max(0, min(expiries)) / 1e6 if expiries else None)


class LeaseAttempt(NamedTuple):
    """The outcome of ``EventLog.acquire_lease``.

    Attributes:
        acquired: Whether the lease is now the caller's.
        epoch: When acquired: the epoch of the stored position (``None``: none stored).
        position: When acquired: the stored position (``None``: none stored).
        holder: When not acquired: who holds the lease.
        expires_in: When not acquired: seconds until that lease runs out unless
            renewed.
    """

    acquired: bool
    epoch: int | None = None
    position: int | None = None
    holder: str | None = None
    expires_in: float = 0.0
