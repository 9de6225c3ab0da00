"""The largest page an admin query returns, and its check."""

from __future__ import annotations

from .._errors import InvalidArgument

#: Largest page any query returns.
MAX_LIMIT = 10_000


def check_limit(limit: int) -> None:
    """Refuse a page size that is not an int from 1 to MAX_LIMIT."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be an int from 1 to {MAX_LIMIT}")
