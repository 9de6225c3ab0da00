"""The clock a holder counts its lease on: one that runs on while the host sleeps."""

from __future__ import annotations

import time

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def lease_clock() -> float:
    """Seconds on Linux's ``CLOCK_BOOTTIME``, elsewhere the monotonic clock.

    The event loop's monotonic clock stands still while the host is suspended (a
    laptop asleep, a paused virtual machine) while the log's clock goes on: a lease
    counted on the loop's clock looked valid for as long as the host slept. Stamps
    are taken before each statement is sent, so a sleep during its round trip counts
    against the lease too.
    """
    if _BOOTTIME is None:
        return time.monotonic()
    return time.clock_gettime(_BOOTTIME)
