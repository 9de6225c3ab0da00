"""A subscriber's budgets: how many events and bytes it may hold, live and per page."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ._event import Event
from ._validation import check_int, check_seconds

# Memory of an Event and its bookkeeping, besides the message itself.
_EVENT_OVERHEAD = 200


@dataclass(frozen=True, slots=True)
class SubscriberOptions:
    """Tuning shared by the subscribers of one broadcast (see ``Broadcast``)."""

    buffer_size: int = 10_000
    page_size: int = 1000
    idle_check: float = 1.0
    reorder_window: float = 0.05
    buffer_bytes: int = 16 * 1024 * 1024
    page_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        # Up to 2**63 - 1 like every other integer: a page size goes into SQL LIMIT.
        for name in ("buffer_size", "page_size", "buffer_bytes", "page_bytes"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("idle_check", "reorder_window"):  # finite: NaN and inf are refused
            check_seconds(name, getattr(self, name))


def weight(event: Event) -> int:
    """Approximate memory held by ``event``, in bytes."""
    return sys.getsizeof(event.message) + _EVENT_OVERHEAD


def weigh(events: Sequence[Event]) -> int:
    """Approximate memory held by ``events``, in bytes."""
    return sum([sys.getsizeof(event.message) for event in events]) + _EVENT_OVERHEAD * len(events)


def page_was_cut(page: Sequence[Event], page_bytes: int) -> bool:
    """Whether a replay page stopped at its byte budget (the log may hold more).

    The log stops at the first event whose payload reaches the budget, so a page
    that reaches it may have been cut; one that does not, was not.
    """
    total = 0
    for event in page:
        message = event.message
        total += len(message.encode() if isinstance(message, str) else message)
        if total >= page_bytes:
            return True
    return False
