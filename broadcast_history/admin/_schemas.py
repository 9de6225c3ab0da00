"""Pydantic models of the HTTP API: its JSON bodies and its OpenAPI schema."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime, BaseModel, BeforeValidator, Field

from .._event import Event
from .._parse import parse_time
from ..log import ChannelInfo, ConsumerInfo
from ._jsonl import event_json
from ._models import EventPage, RetentionStats

MAX_OFFSET = 2**63 - 1
#: The request body of a publish: text, JSON (stored as text) or bytes.
MESSAGE_BODY = {
    "text/plain": {"schema": {"type": "string"}},
    "application/json": {"schema": {}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}


def _iso_time(value: Any) -> Any:
    # Pydantic takes numbers (and digit strings) as Unix seconds: `until=100` would
    # mean 1970, where since=100 is an offset. Those are refused; the rest is read as
    # `since` is (pydantic's own parser refused "2026-11-28Z" and "+02" zones there).
    if isinstance(value, datetime):
        return value
    text = value.strip() if isinstance(value, str) else ""
    if not text or text.lstrip("+-").replace(".", "", 1).isdigit():
        raise ValueError("must be an ISO 8601 time with a timezone, not a number")
    return parse_time(text, "time")


#: An aware time given as ISO 8601 text (query parameters and request bodies).
IsoTime = Annotated[AwareDatetime, BeforeValidator(_iso_time)]


def invalid_parameter(where: str, name: str, value: Any, error: Exception) -> Exception:
    """A parameter the library's own parser refused, as FastAPI's validation errors
    are shaped (a 422 whose ``detail`` is a list): what the OpenAPI schema says."""
    problem = {"type": "value_error", "loc": (where, name), "msg": str(error), "input": value}
    return RequestValidationError([problem])


class ChannelOut(BaseModel):
    """A channel and what the log holds of it."""

    name: str
    epoch: int = Field(description="Incarnation; changes when the channel is deleted and reused")
    first_offset: int = Field(description="Oldest stored offset (last_offset + 1 if none)")
    last_offset: int
    count: int = Field(description="Stored events")
    first_timestamp: AwareDatetime | None
    last_timestamp: AwareDatetime | None
    trimmed: int = Field(description="Events removed by trimming or retention")
    trimmed_timestamp: AwareDatetime | None

    @classmethod
    def of(cls, stats: ChannelInfo) -> ChannelOut:
        return cls.model_validate(stats, from_attributes=True)


class ChannelList(BaseModel):
    """A page of channels in name order."""

    channels: list[ChannelOut]
    next_cursor: str | None = Field(description="Pass as `after` for the next page")


class EventOut(BaseModel):
    """A stored event; `bytes` payloads are base64 (`encoding`)."""

    channel: str
    offset: int
    epoch: int
    timestamp: AwareDatetime
    key: str | None
    encoding: Literal["text", "base64"]
    message: str

    @classmethod
    def of(cls, event: Event) -> EventOut:
        return cls.model_validate(event_json(event))


class PublishedOut(BaseModel):
    """Where a published event is stored."""

    id: str = Field(description="`epoch:offset`, the id event streams send")
    channel: str
    offset: int
    epoch: int
    timestamp: AwareDatetime


class EventList(BaseModel):
    """A page of events."""

    channel: str
    order: Literal["asc", "desc"]
    events: list[EventOut]
    next_cursor: int | None = Field(
        description="Pass as `after` (order=asc) or `before` (order=desc) for the next page"
    )

    @classmethod
    def of(cls, page: EventPage) -> EventList:
        return cls(
            channel=page.channel,
            order=page.order,
            events=[EventOut.of(event) for event in page.events],
            next_cursor=page.next_cursor,
        )


class TrimIn(BaseModel):
    """Trim bounds: remove offsets below `before` and/or events older than `before_time`."""

    # Strict, as PositionIn: "5", true or 5.0 is not an offset.
    before: int | None = Field(default=None, ge=0, le=MAX_OFFSET, strict=True)
    before_time: IsoTime | None = None


class TrimOut(BaseModel):
    """Result of a trim."""

    channel: str
    removed: int
    first_offset: int


class IdleDeletedOut(BaseModel):
    """Result of deleting idle consumers."""

    deleted: int


class ImportOut(BaseModel):
    """Result of an import."""

    channels: list[str]
    events: int


class StatsOut(BaseModel):
    """Totals over every channel, and the broadcast's retention settings."""

    channels: int
    events: int
    trimmed: int
    oldest_timestamp: AwareDatetime | None
    newest_timestamp: AwareDatetime | None
    max_events: int | None
    max_age_seconds: float | None

    @classmethod
    def of(cls, stats: RetentionStats) -> StatsOut:
        max_age = None if stats.max_age is None else stats.max_age.total_seconds()
        return cls.model_validate(
            {**asdict(stats), "max_age_seconds": max_age}, from_attributes=True
        )


class ErrorOut(BaseModel):
    """An error: `detail` says what is wrong."""

    detail: str


class ConsumerOut(BaseModel):
    """A durable consumer: its stored position, its lag and who holds it."""

    channel: str
    name: str
    epoch: int | None = Field(description="The channel's epoch its position belongs to")
    position: int | None = Field(description="Offset of the last event it committed")
    lag: int | None = Field(
        description="Events published after its position, trimmed ones included "
        "(null: no position yet, or one of an earlier epoch of the channel)"
    )
    updated_at: AwareDatetime | None = Field(description="When its position was stored")
    holder: str | None = Field(description="The process holding it (host:pid:id); null: free")

    @classmethod
    def of(cls, info: ConsumerInfo) -> ConsumerOut:
        return cls.model_validate(info, from_attributes=True)


class ConsumerList(BaseModel):
    """A page of durable consumers, by channel and name."""

    consumers: list[ConsumerOut]
    next_cursor: str | None = Field(
        description="Pass as `after`, as it is, for the next page; null: the last page"
    )


class PositionIn(BaseModel):
    """A consumer's new position: its next holder starts after this offset."""

    # Strict: true or "3" is not an offset (the Python API refuses them too).
    position: int = Field(ge=0, le=MAX_OFFSET, strict=True)
