"""NATS names: channel to subject, and ``nats://`` URL to nats-py's server list."""

from __future__ import annotations

import functools
import re

from ._hosts import parse_hosts

_KEPT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_BYTE = [chr(b) if b in _KEPT else f"%{b:02X}" for b in range(256)]
# What a subject_prefix may be: dot-separated tokens of characters kept as they are.
PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
#: Longest subject_prefix: with the longest channel (3,060 escaped bytes), a SUB line
#: stays well under NATS's default 4 KiB ``max_control_line``.
MAX_PREFIX = 128


@functools.lru_cache(maxsize=4096)
def subject_for(channel: str, prefix: str = "bh") -> str:
    """The NATS subject that carries ``channel``.

    ``prefix`` + ``.`` + the channel's UTF-8 bytes, with ASCII letters, digits, ``-``
    and ``_`` kept and every other byte written ``%XX``: one token, never a wildcard,
    one-to-one (see the ``nats`` backend's docstring).
    """
    escaped = "".join(_BYTE[b] for b in channel.encode("utf-8", "surrogatepass"))
    return f"{prefix}.{escaped}"


def nats_servers(url: str) -> list[str]:
    """``nats://[user:password@]h1:p1,h2:p2`` as nats-py's list of server URLs.

    Raises:
        InvalidArgument: The URL names no server, or a port is not a number.
    """
    userinfo, servers = parse_hosts(url, ("nats",), 4222)
    at = "@" if userinfo else ""
    return [
        f"nats://{userinfo}{at}{f'[{host}]' if ':' in host else host}:{port}"
        for host, port in servers
    ]
