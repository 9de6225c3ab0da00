"""Log lines that repeat, written now and then: an outage is not a log flood."""

from __future__ import annotations

import logging
import time


class Sparse:
    """Writes a warning at most once every ``every`` seconds, telling how many like it
    were held back since the last one written."""

    def __init__(self, logger: logging.Logger, every: float) -> None:
        self.logger = logger
        self.every = every
        self._last = -every
        self._held = 0

    def warning(self, message: str, *args: object, exc_info: bool = False) -> None:
        """Log ``message % args`` as a warning (with the exception being handled, if
        ``exc_info``), unless one was logged less than ``every`` seconds ago (then
        count it)."""
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return
        if self._held:
            message += " (and %d more like it since the last such line)"
            args = (*args, self._held)
        self._last, self._held = now, 0
        self.logger.warning(message, *args, exc_info=exc_info)
