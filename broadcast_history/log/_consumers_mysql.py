"""Durable consumers' leases and positions on MySQL/MariaDB (see ``_consumers``).

The same decisions as on Postgres, without ``UPDATE ... RETURNING`` (MySQL 8 has
none, MariaDB only on INSERT and DELETE). Each lease decision is the WHERE clause of
one conditional UPDATE in autocommit mode: the row lock orders concurrent statements
and the loser's condition no longer matches; whether it applied is the statement's
row count (asyncmy counts matched rows, not changed ones, and every condition here
is in the WHERE clause). No lock is held between statements, so a holder paused
between two of them blocks nobody. What the decision needs next is read by a second
statement, about rows the lease makes the holder's alone:

- acquire: an UPDATE takes an existing row that is free, else an INSERT creates a
  missing one (a duplicate key: another process created it first, and the UPDATE
  decides again); then the stored position is read;
- commit: one UPDATE, its row count says whether the lease was held; the stored
  position comes back in the same statement through ``LAST_INSERT_ID(expr)``, which
  the server returns with the statement's result;
- renew: an UPDATE of the leases' rows (by key), then those that name their holders.

Times are microseconds of the server's clock (UTC), one clock for every host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ._info import LeaseAttempt, LeaseClaims
from ._rows import MYSQL_NOW_US as NOW  # the server's clock, as for event timestamps
from ._schema import consumers
from ._shapes import padded

_C = consumers.c
# Holders per statement, as on the other databases.
_CHUNK = 500
# MySQL's "duplicate entry" error.
_DUPLICATE = 1062
# InnoDB's "deadlock found" (a lease taken as another is given back and its row
# deleted): the statement was rolled back, and in autocommit it is all there was.
_DEADLOCK = 1213
_ATTEMPTS = 5

_KEY = and_(_C.channel == bindparam("b_channel"), _C.name == bindparam("b_name"))
_MINE = and_(_KEY, _C.holder == bindparam("b_holder"))
_LEASE = bindparam("b_lease", type_=BigInteger)
_EPOCH = bindparam("b_epoch", type_=BigInteger)
_POSITION = bindparam("b_position", type_=BigInteger)
# The stored row has no live holder.
_FREE = or_(_C.holder.is_(None), _C.lease_expires.is_(None), _C.lease_expires <= NOW)
_ROW: dict[str, Any] = {"channel": bindparam("b_channel"), "name": bindparam("b_name")}

# MySQL assigns SET clauses left to right, each seeing the columns already assigned:
# every UPDATE below lists its clauses in order (ordered_values), and none reads a
# column assigned before it in the same statement.
_TAKE = (
    update(consumers)
    .where(_KEY, _FREE)
    .ordered_values((_C.holder, bindparam("b_holder")), (_C.lease_expires, NOW + _LEASE))
)
_CREATE = insert(consumers).values(**_ROW, holder=bindparam("b_holder"), lease_expires=NOW + _LEASE)
_TAKEN = select(_C.epoch, _C.position).where(_MINE)
_BUSY = select(_C.holder, _C.lease_expires - NOW).where(_KEY)
_HELD = select(_C.channel, _C.name, _C.lease_expires - NOW).where(
    tuple_(_C.channel, _C.name).in_(bindparam("b_keys", expanding=True)),
    _C.holder.is_not(None),
    _C.lease_expires > NOW,
)

# The leases' rows, each by its key and holder (a range of the primary key): by holder
# alone the UPDATE read every row (no index has holders), and under the default
# REPEATABLE READ locked each until it ended. The statement alone, 1,000 leases and
# 200,000 consumers stored on MariaDB 10.11: 75 ms by holder, 7 ms by key.
_HOLDERS = tuple_(_C.channel, _C.name, _C.holder).in_(bindparam("b_leases", expanding=True))
# A lease that ran out but that nobody took since is renewed too, as elsewhere.
_RENEW = update(consumers).where(_HOLDERS).values(lease_expires=NOW + _LEASE)
_RENEWED = select(_C.holder).where(_HOLDERS)
# Giving a lease back forgets a row that never got a position; the others keep when
# it ended (no holder: free), for delete_idle_consumers.
_RELEASE = (
    delete(consumers).where(_MINE, _C.position.is_(None)),
    update(consumers).where(_MINE).values(holder=None, lease_expires=NOW),
)

_AHEAD = and_(_C.epoch == _EPOCH, _C.position >= _POSITION)
_COMMIT = (
    update(consumers)
    .where(_MINE, _C.lease_expires > NOW)
    .ordered_values(
        # First, while epoch and position are still the stored ones; LAST_INSERT_ID
        # hands the position stored back to the client with the statement's result.
        (_C.position, func.last_insert_id(case((_AHEAD, _C.position), else_=_POSITION))),
        (_C.epoch, _EPOCH),
        (_C.updated_at, NOW),
        (_C.lease_expires, NOW + _LEASE),
    )
)

# Forgets a holder whose lease ran out, as the other logs' statement does.
_STORE = (
    update(consumers)
    .where(_KEY, _FREE)
    .ordered_values(
        (_C.epoch, _EPOCH),
        (_C.position, _POSITION),
        (_C.updated_at, NOW),
        (_C.holder, None),
        (_C.lease_expires, None),
    )
)
_STORE_NEW = insert(consumers).values(**_ROW, epoch=_EPOCH, position=_POSITION, updated_at=NOW)


async def _decide(
    conn: AsyncConnection, params: dict[str, Any], update_: Any, insert_: Any, *, alone: bool
) -> bool:
    """Run ``update_`` (conditional on a free row); if it matched nothing, create the
    row with ``insert_``; if another process created it first, ``update_`` decides
    again. Whether one of them applied. ``alone``: each statement commits by itself
    (autocommit), so one a deadlock rolled back runs again."""
    if (await _write(conn, update_, params, alone)).rowcount:
        return True
    try:
        await _write(conn, insert_, params, alone)
        return True
    except IntegrityError as exc:
        if _errno(exc) != _DUPLICATE:
            raise
    return bool((await _write(conn, update_, params, alone)).rowcount)


async def _write(conn: AsyncConnection, statement: Any, params: Any, alone: bool = True) -> Any:
    """``conn.execute``, run again after a deadlock if the statement is ``alone``."""
    for attempt in range(_ATTEMPTS):
        try:
            return await conn.execute(statement, params)
        except DBAPIError as exc:
            if not alone or _errno(exc) != _DEADLOCK or attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _take(
    conn: AsyncConnection, params: dict[str, Any]
) -> tuple[int | None, int | None] | None:
    """The lease of ``params``' consumer for its holder if nobody holds it: the stored
    (epoch, position), or ``None`` if it is held."""
    if not await _decide(conn, params, _TAKE, _CREATE, alone=True):
        return None
    # The row is the holder's now: nobody else writes its position meanwhile.
    row = (await conn.execute(_TAKEN, params)).first()
    if row is None:  # lost already: a lease shorter than a round trip
        return None
    return row[0], row[1]


async def acquire(
    conn: AsyncConnection, channel: str, name: str, holder: str, lease_us: int
) -> LeaseAttempt:
    """``_consumers.acquire`` on MySQL (``conn`` in autocommit mode)."""
    params = {"b_channel": channel, "b_name": name, "b_holder": holder, "b_lease": lease_us}
    taken = await _take(conn, params)
    if taken is not None:
        return LeaseAttempt(True, *taken)
    busy = (await conn.execute(_BUSY, params)).first()
    if busy is None:  # released and deleted meanwhile: tried again (_consumers.acquire)
        return LeaseAttempt(False)
    return LeaseAttempt(False, holder=busy[0], expires_in=max(0, busy[1] or 0) / 1e6)


async def acquire_many(
    conn: AsyncConnection, claims: Sequence[tuple[str, str, str]], lease_us: int
) -> LeaseClaims:
    """``_consumers.acquire_many`` on MySQL: the held consumers are read at once;
    each free one is then taken as ``acquire`` does."""
    taken: dict[str, tuple[int | None, int | None]] = {}
    expiries: list[int] = []
    for start in range(0, len(claims), _CHUNK):
        chunk = claims[start : start + _CHUNK]
        keys = padded([(channel, name) for channel, name, _ in chunk])
        rows = (await conn.execute(_HELD, {"b_keys": keys})).all()
        busy = {(channel, name) for channel, name, _ in rows}
        expiries += [int(left) for _, _, left in rows]
        for channel, name, holder in chunk:
            if (channel, name) in busy:
                continue
            params = {"b_channel": channel, "b_name": name, "b_holder": holder}
            stored = await _take(conn, {**params, "b_lease": lease_us})
            if stored is not None:
                taken[holder] = stored
    return LeaseClaims.of(taken, expiries)


async def renew(
    conn: AsyncConnection, leases: Sequence[tuple[str, str, str]], lease_us: int
) -> set[str]:
    """``_consumers.renew`` on MySQL: the rows that still name a holder after the
    UPDATE are the ones it renewed (only a holder's own acquisition names it)."""
    kept: set[str] = set()
    for start in range(0, len(leases), _CHUNK):
        chunk = leases[start : start + _CHUNK]
        params = {"b_leases": padded(list(chunk))}
        await _write(conn, _RENEW, {**params, "b_lease": lease_us})
        kept.update(row[0] for row in await conn.execute(_RENEWED, params))
    return kept


async def release(conn: AsyncConnection, channel: str, name: str, holder: str) -> None:
    """``_consumers.release`` on MySQL."""
    params = {"b_channel": channel, "b_name": name, "b_holder": holder}
    for statement in _RELEASE:
        await _write(conn, statement, params)


async def commit(
    conn: AsyncConnection,
    channel: str,
    name: str,
    holder: str,
    epoch: int,
    position: int,
    lease_us: int,
) -> int | None:
    """``_consumers.commit`` on MySQL: one statement."""
    params = {"b_channel": channel, "b_name": name, "b_holder": holder, "b_lease": lease_us}
    result = await _write(conn, _COMMIT, {**params, "b_epoch": epoch, "b_position": position})
    if not result.rowcount:
        return None
    return int(result.lastrowid)


async def store_position(
    conn: AsyncConnection, channel: str, name: str, epoch: int, position: int
) -> bool:
    """Store (epoch, position) for a consumer nobody holds, creating its row if
    needed (``conn`` in a transaction); ``False`` if a live holder has it."""
    params = {"b_channel": channel, "b_name": name, "b_epoch": epoch, "b_position": position}
    return await _decide(conn, params, _STORE, _STORE_NEW, alone=False)


def deadlocked(exc: DBAPIError) -> bool:
    """Whether ``exc`` is InnoDB's "deadlock found" (its transaction was rolled back)."""
    return _errno(exc) == _DEADLOCK


def _errno(exc: DBAPIError) -> object:
    args = getattr(exc.orig, "args", ())
    return args[0] if args else None
