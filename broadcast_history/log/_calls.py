"""How the log calls its database: to the end, and with its errors translated once.

Every driver error leaves the log as a :class:`LogError` (or, for values the
database refused, :class:`InvalidArgument`); callers never see SQLAlchemy's.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from .._cancel import cancel_count, raise_if_cancelled_since, wait_for
from .._errors import InvalidArgument, LogUnavailable
from ._info import Pending

# MySQL errors that refuse values without a SQLSTATE of class 22: a packet over the
# server's max_allowed_packet (an event too large for it; the server disconnects),
# a string the column's character set cannot hold.
_MYSQL_DATA_ERRORS = frozenset({1153, 1366})
# MySQL client errors of a connection lost (CR_SERVER_GONE_ERROR, CR_SERVER_LOST...).
_MYSQL_LOST = frozenset({2006, 2013, 2055})

_S = TypeVar("_S")
_P = ParamSpec("_P")
_T = TypeVar("_T")


_Method = Callable[Concatenate[_S, _P], Coroutine[Any, Any, _T]]


def finish_on_cancel(method: _Method[_S, _P, _T]) -> _Method[_S, _P, _T]:
    """Let a database call run to its end even if its caller is cancelled.

    Cancelling an aiosqlite or asyncpg call midway can leave the connection unusable,
    and for an in-memory SQLite database (one connection) that would lose the data.
    Subscribers are cancelled routinely (a client goes away), so the call finishes in
    the background and only the caller stops waiting. An object with a ``_running``
    set gets each call's task in it while it runs. A call that failed without
    sending anything (see :func:`never_sent`) runs once more.
    """
    return _call(method, never_sent)


def finish_repeatable(method: _Method[_S, _P, _T]) -> _Method[_S, _P, _T]:
    """:func:`finish_on_cancel` for a call that may run twice (a read; a write whose
    second run changes and answers nothing else): one that lost its connection
    (see :func:`connection_lost`) runs once more.

    A pooled connection the server ended (a restart, an idle timeout, a pooler)
    fails the call that takes it before the driver has noticed, however briefly.
    """
    return _call(method, connection_lost)


def _call(
    method: _Method[_S, _P, _T], again: Callable[[BaseException], bool]
) -> _Method[_S, _P, _T]:
    async def call(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(self, *args, **kwargs)
        except LogUnavailable as exc:
            if not again(exc):
                raise
        return await method(self, *args, **kwargs)

    @functools.wraps(method)
    async def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        task = asyncio.ensure_future(call(self, *args, **kwargs))
        running: set[asyncio.Future[Any]] | None = getattr(self, "_running", None)
        if running is not None:  # for disconnect(), which lets them end first
            running.add(task)
            task.add_done_callback(running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_ignore_outcome)
            raise

    return wrapper


def never_sent(exc: BaseException) -> bool:
    """Whether ``exc`` comes from asyncpg refusing a statement before sending it.

    A pooled connection the server terminated while it sat idle can be checked out
    before asyncpg has read the socket's end; its first statement then fails with
    ``InternalClientError`` without reaching the server. The pool counts that as a
    disconnect and drops its connections (see ``discard_broken_connections``), so
    the call can run again on a fresh one: nothing of the first attempt happened.
    """
    asyncpg = sys.modules.get("asyncpg")  # never imported: not an asyncpg error
    if asyncpg is None:
        return False

    def refused(error: BaseException) -> bool:
        # Raised as an operation starts (its state switch, or no connection), before
        # anything is written; asyncpg raises the same class later on for other faults.
        return isinstance(error, asyncpg.InternalClientError) and (
            str(error).startswith("cannot switch to state") or str(error) == "not connected"
        )

    return _in_chain(exc, refused)


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection died (before or during the statement)."""
    asyncpg = sys.modules.get("asyncpg")
    dead: tuple[type[BaseException], ...] = (ConnectionError,)
    if asyncpg is not None:
        dead += (asyncpg.InternalClientError, asyncpg.ConnectionDoesNotExistError)

    def lost(current: BaseException) -> bool:
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        code = _mysql_code(current)
        if code is not None:
            # asyncmy's own errors (replay pages call it directly): gone away, lost
            # during a query, lost reading the handshake.
            return code in _MYSQL_LOST
        return isinstance(current, dead)

    return _in_chain(exc, lost)


def _in_chain(exc: BaseException, test: Callable[[BaseException], bool]) -> bool:
    """Whether ``exc`` or an error it wraps (its causes, a DBAPI error's ``orig``:
    drivers' errors come wrapped several times) passes ``test``."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if test(current):
            return True
        seen.add(id(current))
        pending += [current.__cause__, getattr(current, "orig", None)]
    return False


def _mysql_code(exc: BaseException) -> int | None:
    """The error number of one of asyncmy's errors (``None`` for other errors)."""
    if type(exc).__module__.startswith("asyncmy") and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Driver errors inside become :class:`LogUnavailable` (integrity errors pass)."""
    try:
        yield
    except IntegrityError:
        raise
    except DBAPIError as exc:
        raise LogUnavailable(f"event log failure: {exc.orig!r}") from exc
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
        # The SQLite store's hot paths call sqlite3 itself.
        raise LogUnavailable(f"event log failure: {exc!r}") from exc


class Conflict(Exception):
    """An append lost a race on an idempotency key or a new channel row; nothing was
    stored, and a retry finds the other writer's row."""


def unreachable(exc: BaseException) -> LogUnavailable:
    """What a call raises when no connection to the database could be had (refused,
    the server starting or shutting down, the pool exhausted): no statement was sent,
    so an append stored nothing."""
    detail = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return LogUnavailable(f"cannot reach the event log, nothing was sent: {detail!r}")


def append_error(exc: BaseException, *, ambiguous: bool | None = None) -> Exception:
    """What a failed append raises, from the driver's error ``exc``.

    Args:
        exc: The error.
        ambiguous: Whether the batch may have been committed anyway (the connection
            died after sending it); by default, any driver error from SQLAlchemy.
    """
    if is_data_error(exc):
        # Refused before anything was stored: safe to retry without the offending
        # item (the appender does, one item at a time).
        return InvalidArgument(f"the event log refused the data: {exc}")
    if ambiguous is None:
        ambiguous = isinstance(exc, DBAPIError)
    if ambiguous:
        # Not retried: if the connection died after the server committed, a retry
        # would store the batch twice. The caller decides, ideally by publishing
        # again with the same key.
        detail = exc.orig if isinstance(exc, DBAPIError) else exc
        return LogUnavailable(
            f"event log failure, the publish may or may not be stored: {detail!r}"
        )
    return LogUnavailable(f"event log failure: {exc!r}")


#: Longest an append may wait for the database (plus a second per 10 MB of
#: messages): a server gone silent (a paused VM, a partition dropping packets) must
#: not hold every publisher, and ``disconnect``, for as long as it lasts. Past it the
#: batch fails with ``LogUnavailable``, stored or not (a frozen server may still run
#: the statement it received when it resumes; publish again with the same key); its
#: connection is discarded.
APPEND_TIMEOUT = 30.0
_BYTES_PER_SECOND = 10_000_000


class Sending:
    """Whether an append has sent the statement that stores its batch (until then, a
    timeout stored nothing: the time went to taking a connection or to reads)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


async def bounded_append(
    append: Awaitable[_T], items: Sequence[Pending], sending: Sending | None = None
) -> _T:
    """``append`` of ``items``, cancelled past :data:`APPEND_TIMEOUT` (see there).

    With ``sending``, a timeout before the storing statement went out says so."""
    limit = APPEND_TIMEOUT + sum(len(item.message) for item in items) / _BYTES_PER_SECOND
    try:
        return await wait_for(append, limit)
    except asyncio.TimeoutError as exc:
        if sending is not None and not sending.sent:
            raise LogUnavailable(
                f"the event log did not answer within {limit:.3g} s, nothing was stored"
            ) from exc
        raise LogUnavailable(
            f"the event log did not answer within {limit:.3g} s: the publish may or may "
            "not be stored"
        ) from exc


#: Longest a Postgres or MySQL read (a replay page, a page of events, a channel's
#: head, an offset by time) may wait for the database. A server gone silent to this
#: host (a paused VM, a partition dropping packets) would hold the subscriber reading
#: it, and the broadcast's turn at reading pages, until TCP gives up (15 minutes on
#: Linux defaults); past it the read fails with ``LogUnavailable`` and its connection
#: is discarded.
READ_TIMEOUT = 30.0


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is the failure of a read that got no answer in time."""
    return isinstance(exc, LogUnavailable) and isinstance(exc.__cause__, asyncio.TimeoutError)


#: asyncio.timeout (Python 3.11+): bounds an await in the caller's own task.
_timeout = getattr(asyncio, "timeout", None)


async def bounded_read(read: Awaitable[_T], what: str = "a read") -> _T:
    """``read`` (taking its connection included), cancelled past :data:`READ_TIMEOUT`.

    ``what`` names it in the error (lease statements are bounded the same way)."""
    timeout = READ_TIMEOUT
    if _timeout is None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            return await wait_for(read, timeout)
        except asyncio.TimeoutError as exc:
            if loop.time() - began < timeout:
                raise  # the read's own (a driver's command_timeout): an ordinary failure
            raise _no_answer(what, timeout) from exc
    # No task of its own for the read (asyncio.wait_for makes one): a replay reads a
    # page every few milliseconds, and the task's extra loop turns cost a fifth of the
    # Postgres replay rate (full run 18; bisected to 74ffeae).
    count = cancel_count()
    bound = _timeout(timeout)
    try:
        async with bound:
            result = await read
    except asyncio.TimeoutError as exc:
        if not bound.expired():
            raise  # the read's own (a driver's command_timeout): an ordinary failure
        raise _no_answer(what, timeout) from exc
    # A cancellation of this task that the read swallowed (a driver's connect using
    # 3.11's wait_for can) still ends the caller, as wait_for above makes sure of.
    raise_if_cancelled_since(count)
    return result


def _no_answer(what: str, timeout: float) -> LogUnavailable:
    return LogUnavailable(f"the event log did not answer {what} within {timeout:.3g} s")


def is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the database refused the values (nothing was stored).

    Searched through the wrapped errors: an encoding or integer-size failure, SQLSTATE class 22
    ("data exception") from Postgres or MySQL, or one of MySQL's errors that refuse
    a value under another SQLSTATE.
    """

    def refused(current: BaseException) -> bool:
        # OverflowError: sqlite3 refusing an int past 64 bits (an offset past the
        # largest), before sending anything.
        if isinstance(current, (UnicodeError, sqlite3.DataError, OverflowError)):
            return True
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state.startswith("22"):
            return True
        return _mysql_code(current) in _MYSQL_DATA_ERRORS

    return _in_chain(exc, refused)
