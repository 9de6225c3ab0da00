"""What an app's clients are told when the log or the transport is down.

The error's own text names the database, its host and the driver's complaint: not
for the public. Clients get a fixed sentence; the server's log gets the detail (once
every :data:`LOG_EVERY` seconds, an outage is not a log flood).
"""

from __future__ import annotations

import logging

from .._sparse import Sparse

#: What clients read.
DETAIL = "the service is temporarily unavailable; try again later"
#: Seconds between two log lines of the detail.
LOG_EVERY = 10.0
_refusals = Sparse(logging.getLogger("broadcast_history.web"), LOG_EVERY)


def unavailable(exc: Exception) -> str:
    """Log ``exc`` (now and then) and return what a client may read of it."""
    _refusals.warning("refused a client, the event log or transport is down: %s", exc)
    return DETAIL
