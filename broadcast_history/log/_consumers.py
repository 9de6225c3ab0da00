"""Queries of durable consumers' rows: leases and positions (SQLAlchemy Core).

One row per (channel, consumer): the committed position with its epoch, and the
lease of the process holding the consumer. Every decision about a lease is taken
inside the statement that acts on it (the upsert that acquires, the update that
renews or commits), so two processes can never both believe they hold it: the row
lock orders them and the loser's condition no longer matches.

Lease times are microseconds on the log's clock. On Postgres that is the server's
``clock_timestamp()``, so holders on several hosts are judged by one clock; a SQLite
log is shared only by processes of one host, which share its clock. MySQL/MariaDB
has no ``UPDATE ... RETURNING``: its writes are in ``_consumers_mysql``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import Executable

from .._errors import ConsumerBusy
from .._event import from_micros
from .._validation import check_served
from . import _consumers_mysql as _mysql
from ._info import ConsumerInfo, ConsumerLags, LeaseAttempt, LeaseClaims
from ._rows import MYSQL_NOW_US, now_micros
from ._schema import channels, consumers
from ._shapes import padded, power_runs

_C = consumers.c
#: A held lease: (channel, consumer name, holder id).
Lease = tuple[str, str, str]
# Leases claimed or renewed per statement (SQLite: three parameters each, padded to
# 512): well under every database's limit on parameters.
_CHUNK = 500


class _Reads:
    """Statements every database runs as they are, given its clock ``now``."""

    def __init__(self, now: ColumnElement[int]) -> None:
        key = and_(_C.channel == bindparam("b_channel"), _C.name == bindparam("b_name"))
        # The stored row has no live holder.
        free = or_(_C.holder.is_(None), _C.lease_expires.is_(None), _C.lease_expires <= now)
        self.now, self.key, self.free = now, key, free
        self.remove = delete(consumers).where(key, free)
        self.exists = select(_C.name).where(key)
        live = and_(_C.holder.is_not(None), _C.lease_expires > now)
        stored = (_C.channel, _C.name, _C.epoch, _C.position, _C.updated_at)
        #: Consumer rows in (channel, name) order, with their live holder (their
        #: channels' heads are read apart: see _infos).
        self.listing = select(*stored, case((live, _C.holder), else_=None).label("live")).order_by(
            _C.channel, _C.name
        )
        self.listing_of = self.listing.where(_C.channel == bindparam("b_channel"))
        self.listing_one = self.listing.where(key)
        self.heads = select(channels.c.name, channels.c.epoch, channels.c.last_offset).where(
            channels.c.name.in_(bindparam("b_names", expanding=True))
        )
        # Events after a committed position, of channels that exist: for a position
        # of an earlier epoch (its worker stops at StreamReset), every event now.
        head = channels.c.last_offset
        lag = case(
            (_C.epoch != channels.c.epoch, head),
            (head > _C.position, head - _C.position),
            else_=0,
        ).label("lag")
        committed = consumers.join(channels, channels.c.name == _C.channel)
        self.lags = (
            select(_C.channel, _C.name, lag)
            .select_from(committed)
            .where(_C.position.is_not(None))
            .order_by(lag.desc(), _C.channel, _C.name)
            .limit(bindparam("b_limit", type_=BigInteger))
        )
        self.committed = select(func.count()).select_from(committed).where(_C.position.is_not(None))
        # Nobody holds it, and both its last commit and the end of its last lease
        # (given back, or run out: its holder died) are older than b_idle.
        committed_at = func.coalesce(_C.updated_at, 0)
        held_until = func.coalesce(_C.lease_expires, 0)
        last_used = case((committed_at >= held_until, committed_at), else_=held_until)
        idle = and_(free, last_used < now - bindparam("b_idle", type_=BigInteger))
        self.idle_keys = (
            select(_C.channel, _C.name)
            .where(idle)
            .order_by(_C.channel, _C.name)
            .limit(bindparam("b_limit", type_=BigInteger))
        )
        self.forget_idle = delete(consumers).where(idle)


class _Statements(_Reads):
    """The consumer statements of SQLite or Postgres: lease statements run often, and
    building an upsert costs more than running it."""

    def __init__(self, postgres: bool) -> None:
        dialect: Any = postgresql if postgres else sqlite
        now: ColumnElement[int]
        if postgres:
            seconds = func.extract("epoch", func.clock_timestamp())
            now = cast(func.round(seconds * 1_000_000), BigInteger)
        else:
            now = bindparam("b_now", type_=BigInteger)
        super().__init__(now)
        key, free, self.postgres = self.key, self.free, postgres
        mine = and_(key, _C.holder == bindparam("b_holder"))
        lease = bindparam("b_lease", type_=BigInteger)
        epoch = bindparam("b_epoch", type_=BigInteger)
        position = bindparam("b_position", type_=BigInteger)
        row: dict[str, Any] = {"channel": bindparam("b_channel"), "name": bindparam("b_name")}

        taking = dialect.insert(consumers).values(
            **row, holder=bindparam("b_holder"), lease_expires=now + lease
        )
        self.acquire = taking.on_conflict_do_update(
            index_elements=[_C.channel, _C.name],
            set_={"holder": taking.excluded.holder, "lease_expires": taking.excluded.lease_expires},
            where=free,
        ).returning(_C.epoch, _C.position)
        self.busy = select(_C.holder, _C.lease_expires - now).where(key)
        self.held = select(_C.channel, _C.name, _C.lease_expires - now).where(
            tuple_(_C.channel, _C.name).in_(bindparam("b_keys", expanding=True)),
            _C.holder.is_not(None),
            _C.lease_expires > now,
        )

        # A lease that ran out but that nobody took since is renewed too: the row
        # still names this holder, so nobody else held the consumer meanwhile. Rows
        # found by key, joined to the leases (one prepared statement on Postgres,
        # a primary key lookup each): by holder alone (no index has holders) every
        # renewal read the whole table, 35 ms with 200,000 consumers stored.
        self.renew: Executable | None = None
        if postgres:
            array = postgresql.ARRAY(String)
            keys = (
                func.unnest(
                    bindparam("b_channels", type_=array),
                    bindparam("b_names", type_=array),
                    bindparam("b_holders", type_=array),
                )
                .table_valued("channel", "name", "holder")
                .render_derived(name="k")
            )
            self.renew = (
                update(consumers)
                .where(
                    _C.channel == keys.c.channel,
                    _C.name == keys.c.name,
                    _C.holder == keys.c.holder,
                )
                .values(lease_expires=now + lease)
                .returning(_C.holder)
            )
        # Giving a lease back forgets a row that never got a position; the others
        # keep when it ended (no holder: free), for delete_idle_consumers.
        self.release: list[Executable] = [
            delete(consumers).where(mine, _C.position.is_(None)),
            update(consumers).where(mine).values(holder=None, lease_expires=now),
        ]
        if postgres:  # one round trip; each half touches rows the other does not
            self.release = [
                text(
                    f"WITH forgotten AS (DELETE FROM {consumers.name} WHERE channel = "
                    ":b_channel AND name = :b_name AND holder = :b_holder AND position "
                    f"IS NULL) UPDATE {consumers.name} SET holder = NULL, lease_expires = "
                    "CAST(ROUND(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000) AS BIGINT)"
                    " WHERE channel = :b_channel AND name = :b_name AND holder = :b_holder"
                    " AND position IS NOT NULL"
                )
            ]

        ahead = and_(_C.epoch == epoch, _C.position >= position)
        self.commit = (
            update(consumers)
            .where(mine, _C.lease_expires > now)
            .values(
                # SET expressions all read the row as it was: the CASE sees the old epoch.
                position=case((ahead, _C.position), else_=position),
                epoch=epoch,
                updated_at=now,
                lease_expires=now + lease,
            )
            .returning(_C.position)
        )

        setting = dialect.insert(consumers).values(
            **row, epoch=epoch, position=position, updated_at=now
        )
        # The row forgets a holder whose lease ran out: renewing late is safe only while
        # nobody changed the row meanwhile, and the operator just did.
        self.set_position = setting.on_conflict_do_update(
            index_elements=[_C.channel, _C.name],
            set_={
                **{c: setting.excluded[c] for c in ("epoch", "position", "updated_at")},
                "holder": None,
                "lease_expires": None,
            },
            where=free,
        ).returning(_C.name)


_BUILT: dict[str, _Statements] = {}
_MYSQL = "mysql"  # MariaDB's name too
_MYSQL_READS = _Reads(MYSQL_NOW_US)


def _statements(conn: AsyncConnection) -> tuple[_Statements, dict[str, Any]]:
    """The statements of ``conn``'s SQLite or Postgres, and the parameters they take."""
    name = conn.dialect.name
    built = _BUILT.get(name)
    if built is None:
        built = _BUILT[name] = _Statements(name == "postgresql")
    # SQLite's clock is the host's: every process sharing the file reads the same one.
    return built, ({} if name == "postgresql" else {"b_now": now_micros()})


def _reads(conn: AsyncConnection) -> tuple[_Reads, dict[str, Any]]:
    """:func:`_statements`, for the statements MySQL shares with the others."""
    return (_MYSQL_READS, {}) if conn.dialect.name == _MYSQL else _statements(conn)


async def acquire(
    conn: AsyncConnection, channel: str, name: str, holder: str, lease_us: int
) -> LeaseAttempt:
    """Take the lease of (channel, name) for ``holder`` if nobody holds it."""
    for _ in range(_TRIES):
        attempt = await _acquire_once(conn, channel, name, holder, lease_us)
        if attempt.acquired or attempt.holder is not None:
            return attempt
        # Held when tried, given back before its holder could be read: try again.
    return attempt


# Tries of a lease whose holder keeps giving it back between the two statements.
_TRIES = 5


async def _acquire_once(
    conn: AsyncConnection, channel: str, name: str, holder: str, lease_us: int
) -> LeaseAttempt:
    if conn.dialect.name == _MYSQL:
        return await _mysql.acquire(conn, channel, name, holder, lease_us)
    sql, params = _statements(conn)
    params.update(b_channel=channel, b_name=name, b_holder=holder, b_lease=lease_us)
    row = (await conn.execute(sql.acquire, params)).first()
    if row is not None:
        return LeaseAttempt(True, row[0], row[1])
    busy = (await conn.execute(sql.busy, params)).first()
    if busy is None:  # released and deleted meanwhile: tried again
        return LeaseAttempt(False)
    return LeaseAttempt(False, holder=busy[0], expires_in=max(0, busy[1] or 0) / 1e6)


async def acquire_many(
    conn: AsyncConnection, claims: Sequence[tuple[str, str, str]], lease_us: int
) -> LeaseClaims:
    """Take the free leases among ``claims`` (channel, name, holder; one per
    consumer): the stored (epoch, position) by holder, for those taken, and when the
    soonest of the others' leases runs out.

    Which consumers are held is read first, without locking them; only the others
    are tried, so waiting for busy consumers costs one read.
    """
    if conn.dialect.name == _MYSQL:
        return await _mysql.acquire_many(conn, claims, lease_us)
    sql, params = _statements(conn)
    taken: dict[str, tuple[int | None, int | None]] = {}
    expiries: list[int] = []
    for start in range(0, len(claims), _CHUNK):
        chunk = claims[start : start + _CHUNK]
        keys = padded([(channel, name) for channel, name, _ in chunk])
        held = await conn.execute(sql.held, {**params, "b_keys": keys})
        found = held.all()
        busy = {(channel, name) for channel, name, _ in found}
        expiries += [left for _, _, left in found]
        free = [claim for claim in chunk if (claim[0], claim[1]) not in busy]
        if not free:
            continue
        dialect: Any = postgresql if sql.postgres else sqlite
        expires = sql.now + lease_us
        for run in power_runs(free):  # rows of a few counts: statements of a few shapes
            rows = [
                {"channel": c, "name": n, "holder": h, "lease_expires": expires} for c, n, h in run
            ]
            taking = dialect.insert(consumers).values(rows)
            statement = taking.on_conflict_do_update(
                index_elements=[_C.channel, _C.name],
                set_={
                    "holder": taking.excluded.holder,
                    "lease_expires": taking.excluded.lease_expires,
                },
                where=sql.free,
            ).returning(_C.holder, _C.epoch, _C.position)
            for holder, epoch, position in await conn.execute(statement, params):
                taken[holder] = (epoch, position)
    return LeaseClaims.of(taken, expiries)


async def renew(conn: AsyncConnection, leases: Sequence[Lease], lease_us: int) -> set[str]:
    """Extend the ``leases`` (channel, name, holder) still held; returns their holders."""
    if conn.dialect.name == _MYSQL:
        return await _mysql.renew(conn, leases, lease_us)
    sql, params = _statements(conn)
    kept: set[str] = set()
    for start in range(0, len(leases), _CHUNK):
        chunk = leases[start : start + _CHUNK]
        result: Any
        if sql.renew is not None:  # Postgres: three arrays
            channels, names, holders = (list(column) for column in zip(*chunk, strict=True))
            keys = {"b_channels": channels, "b_names": names, "b_holders": holders}
            result = await conn.execute(sql.renew, {**keys, "b_lease": lease_us})
        else:
            # On the driver: SQLAlchemy's handling of a thousand named parameters
            # took longer than the statement.
            chunk = padded(chunk)
            flat = [value for lease in chunk for value in lease]
            sqlite_params = (params["b_now"], lease_us, *flat)
            result = await conn.exec_driver_sql(_sqlite_renewal(len(chunk)), sqlite_params)
        kept.update(row[0] for row in result)
    return kept


@functools.cache
def _sqlite_renewal(leases: int) -> str:
    """SQLite's renewal of ``leases`` leases: rows found by key, joined to the leases
    as a list of values (a list of keys in an IN is not looked up in an index).
    Parameters: now, the lease, then channel, name and holder of each."""
    rows = ", ".join(["(?, ?, ?)"] * leases)
    return (
        f"UPDATE {consumers.name} SET lease_expires = ? + ? FROM (VALUES {rows}) AS k "
        "WHERE channel = k.column1 AND name = k.column2 AND holder = k.column3 "
        "RETURNING holder"
    )


async def release(conn: AsyncConnection, channel: str, name: str, holder: str) -> None:
    """Give the lease up; a row that never got a position goes with it."""
    if conn.dialect.name == _MYSQL:
        await _mysql.release(conn, channel, name, holder)
        return
    sql, params = _statements(conn)
    params.update(b_channel=channel, b_name=name, b_holder=holder)
    for statement in sql.release:
        await conn.execute(statement, params)


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
    if conn.dialect.name == _MYSQL:
        return await _mysql.commit(conn, channel, name, holder, epoch, position, lease_us)
    sql, params = _statements(conn)
    params.update(b_channel=channel, b_name=name, b_holder=holder, b_lease=lease_us)
    params.update(b_epoch=epoch, b_position=position)
    stored = (await conn.execute(sql.commit, params)).scalar()
    return None if stored is None else int(stored)


async def listing(
    conn: AsyncConnection,
    channel: str | None,
    after: tuple[str, str] | None = None,
    limit: int | None = None,
) -> list[ConsumerInfo]:
    """Consumers (of ``channel``, or all) in (channel, name) order, with their lag:
    those after ``after`` (a channel and a name), at most ``limit``."""
    sql, params = _reads(conn)
    starting = _after(conn, channel, after)
    if starting is None:
        return []
    query = (sql.listing if channel is None else sql.listing_of).where(*starting)
    if limit is not None:
        query = query.limit(limit)
    return await _infos(conn, query, {**params, "b_channel": channel})


def _after(
    conn: AsyncConnection, channel: str | None, after: tuple[str, str] | None
) -> list[ColumnElement[bool]] | None:
    """The conditions on consumer rows (of ``channel`` if given) that come after the
    key ``after``; ``None`` if no row of the channel does."""
    if after is None:
        return []
    # Each written as its database reads a range of the primary key from it (the
    # other spelling scans the rows before the cursor: pages grew slower).
    if channel is not None:
        if after[0] > channel:
            return None
        return [_C.name > after[1]] if after[0] == channel else []
    if conn.dialect.name == _MYSQL:
        return [or_(_C.channel > after[0], and_(_C.channel == after[0], _C.name > after[1]))]
    return [tuple_(_C.channel, _C.name) > tuple_(*after)]


def _up_to(
    conn: AsyncConnection, channel: str | None, last: tuple[str, str]
) -> list[ColumnElement[bool]]:
    """The conditions on consumer rows (of ``channel`` if given) up to the key ``last``."""
    if channel is not None:
        return [_C.channel == channel, _C.name <= last[1]]
    if conn.dialect.name == _MYSQL:
        return [or_(_C.channel < last[0], and_(_C.channel == last[0], _C.name <= last[1]))]
    return [tuple_(_C.channel, _C.name) <= tuple_(*last)]


async def idle_keys(
    conn: AsyncConnection,
    channel: str | None,
    idle_us: int,
    after: tuple[str, str] | None,
    limit: int,
) -> list[tuple[str, str]]:
    """Up to ``limit`` consumers (of ``channel``) after ``after`` that nobody holds
    nor held or committed to for ``idle_us`` microseconds, in key order."""
    sql, params = _reads(conn)
    starting = _after(conn, channel, after)
    if starting is None:
        return []
    query = sql.idle_keys.where(*starting)
    if channel is not None:
        query = query.where(_C.channel == channel)
    params.update(b_idle=idle_us, b_limit=limit)
    return [(row[0], row[1]) for row in await conn.execute(query, params)]


async def forget_idle(
    conn: AsyncConnection,
    channel: str | None,
    idle_us: int,
    after: tuple[str, str] | None,
    last: tuple[str, str],
) -> int:
    """Delete the consumers that are idle (as :func:`idle_keys` says, checked again)
    after ``after`` up to ``last``: a range of the key, where the 500-key IN lists
    this replaced spent 70-80 % of the time."""
    sql, params = _reads(conn)
    statement = sql.forget_idle.where(*(_after(conn, channel, after) or []))
    statement = statement.where(*_up_to(conn, channel, last))
    params.update(b_idle=idle_us)
    return int((await conn.execute(statement, params)).rowcount)


async def _infos(
    conn: AsyncConnection, query: Executable, params: dict[str, Any]
) -> list[ConsumerInfo]:
    """The consumers ``query`` selects, with their lag.

    Their channels' heads are read by name afterwards: joined in one statement, a
    page deep in 250,000 consumers made Postgres merge it with the channel table
    read from its start (a subquery cut first fixed pages of 1,000, not of 10,000,
    and then not the next pages, planned alike), 125-350 ms a page.
    """
    rows = (await conn.execute(query, params)).all()
    sql, read_params = _reads(conn)
    heads: dict[str, tuple[int, int]] = {}
    names = sorted({row[0] for row in rows})
    for start in range(0, len(names), _CHUNK):
        chunk = padded(names[start : start + _CHUNK])
        found = await conn.execute(sql.heads, {**read_params, "b_names": chunk})
        heads.update((name, (epoch, head)) for name, epoch, head in found)
    infos = []
    for of, name, epoch, position, updated, holder in rows:
        lag = None
        channel_epoch, head = heads.get(of, (None, 0))
        if position is not None and epoch == channel_epoch:
            lag = max(0, head - position)
        when = None if updated is None else from_micros(updated)
        infos.append(ConsumerInfo(of, name, epoch, position, lag, when, holder))
    return infos


async def lags(conn: AsyncConnection, limit: int) -> ConsumerLags:
    """The ``limit`` largest lags of committed consumers, and how many there are."""
    sql, params = _reads(conn)
    count = (await conn.execute(sql.committed, params)).scalar_one()
    rows = await conn.execute(sql.lags, {**params, "b_limit": limit})
    return ConsumerLags(int(count), [(channel, name, int(lag)) for channel, name, lag in rows])


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
    found = result.first()
    if found is None:
        return None
    epoch, first, last = found
    check_served(channel, position, first, last, "position")
    if conn.dialect.name == _MYSQL:
        stored = await _mysql.store_position(conn, channel, name, epoch, position)
    else:
        sql, params = _statements(conn)
        params.update(b_channel=channel, b_name=name, b_epoch=epoch, b_position=position)
        stored = (await conn.execute(sql.set_position, params)).first() is not None
    if not stored:
        raise _busy(channel, name)
    reads, read_params = _reads(conn)
    read_params = {**read_params, "b_channel": channel, "b_name": name}
    [info] = await _infos(conn, reads.listing_one, read_params)
    return info


async def remove(conn: AsyncConnection, channel: str, name: str) -> bool:
    """Delete a consumer nobody holds; whether it existed.

    Raises:
        ConsumerBusy: A live holder has the consumer.
    """
    sql, params = _reads(conn)
    params.update(b_channel=channel, b_name=name)
    if (await conn.execute(sql.remove, params)).rowcount:
        return True
    if (await conn.execute(sql.exists, params)).first() is not None:
        raise _busy(channel, name)
    return False


def _busy(channel: str, name: str) -> ConsumerBusy:
    return ConsumerBusy(
        f"consumer {name!r} of {channel!r} is held by a running process: stop it first "
        "(or wait until its lease runs out)"
    )
