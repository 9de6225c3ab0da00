"""What keeps one chat client from filling the server: size caps and a rate limit."""

from __future__ import annotations

import time
from collections import OrderedDict

#: Largest request body or WebSocket frame a page may send, in bytes.
MAX_BODY = 16 * 1024


class RateLimit:
    """A token bucket: ``burst`` messages at once, then ``rate`` per second."""

    def __init__(self, rate: float = 5.0, burst: float = 10.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        """Take a token if one is there."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class RateLimits:
    """One :class:`RateLimit` per client address, for the newest ``size`` addresses."""

    def __init__(self, size: int = 10_000, rate: float = 5.0, burst: float = 10.0) -> None:
        self._limits: OrderedDict[str, RateLimit] = OrderedDict()
        self._size, self._rate, self._burst = size, rate, burst

    def allow(self, client: str) -> bool:
        limit = self._limits.pop(client, None) or RateLimit(self._rate, self._burst)
        self._limits[client] = limit
        if len(self._limits) > self._size:
            self._limits.popitem(last=False)
        return limit.allow()
