"""Queries of durable consumers' rows: leases and positions (SQLAlchemy Core).

One row per (channel, consumer): the committed position with its epoch, and the
lease of the process holding the consumer. Every decision about a lease is taken
inside the statement that acts on it (the upsert that acquires, the update that
renews or commits), so two processes can never both believe they hold it: the row
lock orders them and the loser's condition no longer matches.

Lease times are microseconds on the log's clock. On Postgres that is the server's
``clock_timestamp()``, so holders on several hosts are judged by one clock; a SQLite
log is shared only by processes of one host, which share its clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    and_,
    case,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from .._errors import ConsumerBusy, HistoryTruncated, OffsetOutOfRange
from .._event import from_micros
from ._info import ConsumerInfo, LeaseAttempt
from ._rows import now_micros
from ._schema import channels, consumers

_C = consumers.c
# Holders renewed per statement: well under every database's limit on parameters.
_CHUNK = 500


def _now(conn: AsyncConnection) -> ColumnElement[int]:
    """The current time on the log's clock, in microseconds."""
    if conn.dialect.name == "postgresql":
        seconds = func.extract("epoch", func.clock_timestamp())
        return cast(func.round(seconds * 1_000_000), BigInteger)
    return literal(now_micros(), BigInteger)


def _free(now: ColumnElement[int]) -> ColumnElement[bool]:
    """The stored row has no live holder."""
    return or_(_C.holder.is_(None), _C.lease_expires.is_(None), _C.lease_expires <= now)


def _key(channel: str, name: str) -> ColumnElement[bool]:
    return and_(_C.channel == channel, _C.name == name)


def _upsert(
    conn: AsyncConnection, channel: str, name: str, values: dict[str, Any], now: ColumnElement[int]
) -> Any:
    """Insert the row of (channel, name) with ``values``, or set them on the stored
    row if no live holder has it."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(consumers).values(channel=channel, name=name, **values)
    return insert.on_conflict_do_update(
        index_elements=[_C.channel, _C.name],
        set_={column: insert.excluded[column] for column in values},
        where=_free(now),
    )


async def acquire(
    conn: AsyncConnection, channel: str, name: str, holder: str, lease_us: int
) -> LeaseAttempt:
    """Take the lease of (channel, name) for ``holder`` if nobody holds it."""
    now = _now(conn)
    values = {"holder": holder, "lease_expires": now + lease_us}
    upsert = _upsert(conn, channel, name, values, now)
    result = await conn.execute(upsert.returning(_C.epoch, _C.position))
    row = result.first()
    if row is not None:
        return LeaseAttempt(True, row[0], row[1])
    found = await conn.execute(select(_C.holder, _C.lease_expires - now).where(_key(channel, name)))
    busy = found.first()
    if busy is None:  # released and deleted meanwhile: the caller tries again
        return LeaseAttempt(False)
    return LeaseAttempt(False, holder=busy[0], expires_in=max(0, busy[1] or 0) / 1e6)


async def renew(conn: AsyncConnection, holders: Sequence[str], lease_us: int) -> set[str]:
    """Extend the unexpired leases of ``holders``; returns the holders still holding."""
    kept: set[str] = set()
    for start in range(0, len(holders), _CHUNK):
        now = _now(conn)
        result = await conn.execute(
            update(consumers)
            .where(_C.holder.in_(holders[start : start + _CHUNK]), _C.lease_expires > now)
            .values(lease_expires=now + lease_us)
            .returning(_C.holder)
        )
        kept.update(row[0] for row in result)
    return kept


async def release(conn: AsyncConnection, channel: str, name: str, holder: str) -> None:
    """Give the lease up; a row that never got a position goes with it."""
    mine = and_(_key(channel, name), _C.holder == holder)
    await conn.execute(delete(consumers).where(mine, _C.position.is_(None)))
    await conn.execute(update(consumers).where(mine).values(holder=None, lease_expires=None))


async def commit(
    conn: AsyncConnection,
    channel: str,
    name: str,
    holder: str,
    epoch: int,
    position: int,
    lease_us: int,
) -> int | None:
    """Store ``position`` if ``holder`` still holds an unexpired lease (which the
    commit extends); never moves a position of the same epoch backwards.

    Returns the stored position, or ``None`` when the lease is not held: then nothing
    was written.
    """
    now = _now(conn)
    ahead = and_(_C.epoch == epoch, _C.position >= position)
    result = await conn.execute(
        update(consumers)
        .where(_key(channel, name), _C.holder == holder, _C.lease_expires > now)
        .values(
            # SET expressions all read the row as it was: the CASE sees the old epoch.
            position=case((ahead, _C.position), else_=position),
            epoch=epoch,
            updated_at=now,
            lease_expires=now + lease_us,
        )
        .returning(_C.position)
    )
    stored = result.scalar()
    return None if stored is None else int(stored)


async def listing(conn: AsyncConnection, channel: str | None) -> list[ConsumerInfo]:
    """Consumers (of ``channel``, or all) in (channel, name) order, with their lag."""
    now = _now(conn)
    live = and_(_C.holder.is_not(None), _C.lease_expires > now)
    query = (
        select(
            _C.channel,
            _C.name,
            _C.epoch,
            _C.position,
            _C.updated_at,
            case((live, _C.holder), else_=None),
            channels.c.epoch,
            channels.c.last_offset,
        )
        .select_from(consumers.outerjoin(channels, channels.c.name == _C.channel))
        .order_by(_C.channel, _C.name)
    )
    if channel is not None:
        query = query.where(_C.channel == channel)
    found = []
    for row in await conn.execute(query):
        of, name, epoch, position, updated, holder, channel_epoch, head = row
        lag = None
        if position is not None and epoch == channel_epoch:
            lag = max(0, head - position)
        when = None if updated is None else from_micros(updated)
        found.append(ConsumerInfo(of, name, epoch, position, lag, when, holder))
    return found


async def set_position(
    conn: AsyncConnection, channel: str, name: str, position: int
) -> ConsumerInfo | None:
    """Store ``position`` (of the channel's current epoch) for a consumer nobody holds.

    Returns ``None`` if the channel does not exist.

    Raises:
        ConsumerBusy: A live holder has the consumer.
        OffsetOutOfRange: ``position`` is beyond the channel's head.
        HistoryTruncated: The events after ``position`` were trimmed.
    """
    result = await conn.execute(
        select(channels.c.epoch, channels.c.first_offset, channels.c.last_offset).where(
            channels.c.name == channel
        )
    )
    row = result.first()
    if row is None:
        return None
    epoch, first, last = row
    if position > last:
        raise OffsetOutOfRange(f"position {position} is beyond the head of {channel!r} ({last})")
    if position + 1 < first:
        raise HistoryTruncated(
            f"events {position + 1}..{first - 1} of {channel!r} were trimmed; "
            f"the lowest position still served is {first - 1}"
        )
    now = _now(conn)
    values = {"epoch": epoch, "position": position, "updated_at": now}
    written = await conn.execute(_upsert(conn, channel, name, values, now).returning(_C.name))
    if written.first() is None:
        raise _busy(channel, name)
    [info] = [c for c in await listing(conn, channel) if c.name == name]
    return info


async def remove(conn: AsyncConnection, channel: str, name: str) -> bool:
    """Delete a consumer nobody holds; whether it existed.

    Raises:
        ConsumerBusy: A live holder has the consumer.
    """
    now = _now(conn)
    result = await conn.execute(delete(consumers).where(_key(channel, name), _free(now)))
    if result.rowcount:
        return True
    exists = await conn.execute(select(_C.name).where(_key(channel, name)))
    if exists.first() is not None:
        raise _busy(channel, name)
    return False


def _busy(channel: str, name: str) -> ConsumerBusy:
    return ConsumerBusy(
        f"consumer {name!r} of {channel!r} is held by a running process: stop it first "
        "(or wait until its lease runs out)"
    )
