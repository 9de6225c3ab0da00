"""URLs with their secrets hidden, for messages, banners and pages."""

from __future__ import annotations

import re

_SECRET_QUERY = re.compile(r"(?i)((?:password|token|secret)[^=&]*=)[^&]*")


def redacted(url: str) -> str:
    """``url`` with its secrets hidden (any scheme, several hosts): the password, a
    user name alone (NATS reads it as a token) and password or token query values."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, rest = rest.rpartition("@")  # a password may hold "/" or "@"
    if at:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:***" if colon else "***"
    where, question, query = rest.partition("?")
    if question:
        query = _SECRET_QUERY.sub(r"\1***", query)
    return f"{scheme}{sep}{userinfo}{at}{where}{question}{query}"
