"""Lookups of channels' heads that must see everything stored before they were asked:
a subscription's start, a check after a hole in what arrived live."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from ._errors import LogUnavailable
from .log import ChannelInfo, EventLog

#: Channel names one query asks for (drivers cap a statement's parameters).
NAMES_AT_ONCE = 500
_GRACE = 0.1


class StartLookups:
    """Batches the fresh lookups of one broadcast's subscribers.

    Each subscription reads its channel's head once registered; with a query each,
    2,000 clients reconnecting at once to channels of their own cost 2,000 queries
    (~1 ms each on a SQLite file). Lookups asked in one loop turn, or while
    :attr:`ROUNDS_AT_ONCE` rounds are out, now go to the log together. Every round
    begins after each of its lookups was asked: none shares a query begun earlier.
    Idle checks, which may be a little stale, are not queued here, so a lone
    subscribe never waits behind a big round of theirs.
    """

    #: Rounds of lookups out at once: a lone lookup goes at once, as its own query.
    ROUNDS_AT_ONCE = 4

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._queued: dict[str, asyncio.Future[ChannelInfo | None]] = {}
        self._sending: asyncio.Future[None] | None = None
        self._rounds: asyncio.Semaphore | None = None
        self._out: set[asyncio.Future[None]] = set()  # rounds running (kept referenced)

    async def lookup(self, name: str) -> ChannelInfo | None:
        """Channel ``name``'s state, read by a query begun after this call.

        Raises:
            LogUnavailable: The log failed, or gave no answer within its read bound
                (counted from this call: waiting for a round counts too).
        """
        future = self._queued.get(name)
        if future is None:
            future = self._queued[name] = asyncio.get_running_loop().create_future()
        if self._sending is None:
            self._sending = asyncio.ensure_future(self._send())
        bound = self._log.read_timeout
        # asyncio.wait leaves the lookup alone when this caller is cancelled or gives
        # up: others may wait for it too. A little past the bound: a round that began
        # at once fails first, with the log's own error.
        await asyncio.wait({future}, timeout=None if bound is None else bound + _GRACE)
        if not future.done():
            raise LogUnavailable(
                f"the event log did not answer a read within {bound:.3g} s (the lookup "
                f"of {name!r}, its wait for a turn included)"
            )
        error = future.exception()
        if error is None:
            return future.result()
        # A copy per caller: the one error, raised again by every caller of a round,
        # grew its traceback at each raise (thousands of lines when logged).
        try:
            own = copy.copy(error)
        except Exception:  # an error type that cannot be copied: shared, then
            raise error from None
        raise own.with_traceback(None) from error

    async def _send(self) -> None:
        """Start a round of the queued lookups whenever a slot is free."""
        if self._rounds is None:
            self._rounds = asyncio.Semaphore(self.ROUNDS_AT_ONCE)
        rounds = self._rounds
        try:
            await asyncio.sleep(0)  # the lookups asked in this loop turn go together
            while self._queued:
                await rounds.acquire()
                queued, self._queued = self._queued, {}
                out = asyncio.ensure_future(look_up(self._log, queued))
                self._out.add(out)
                out.add_done_callback(self._out.discard)
                out.add_done_callback(lambda _: rounds.release())
        finally:
            self._sending = None
            # Stopped (the loop ends): nobody will answer them.
            _abandon(self._queued.values())
            self._queued = {}


async def look_up(log: EventLog, queued: dict[str, asyncio.Future[ChannelInfo | None]]) -> None:
    """Answer ``queued``'s lookups: a query per :data:`NAMES_AT_ONCE` names (one name
    alone, a lookup of its own); a failed query fails its names and those after."""
    names = list(queued)
    try:
        for at in range(0, len(names), NAMES_AT_ONCE):
            part = names[at : at + NAMES_AT_ONCE]
            try:
                if len(part) == 1:
                    found = {part[0]: await log.channel(part[0])}
                else:
                    found = dict(await log.channels_named(part))
            except Exception as exc:
                for name in names[at:]:
                    _settle(queued[name], exc)
                return
            for name in part:
                _settle(queued[name], found.get(name))
    finally:
        _abandon(queued.values())  # cut short (the loop ends): failed, typed


def _abandon(futures: Any) -> None:
    error = LogUnavailable("the lookup of a channel's head was abandoned")
    for future in futures:
        _settle(future, error)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
        future.exception()  # its callers get it; nobody else should warn
    else:
        future.set_result(outcome)
