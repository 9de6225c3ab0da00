"""URLs that name several servers: ``scheme://[user:password@]h1:p1,h2:p2``."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from .._errors import InvalidArgument
from .._redact import redacted


class Hosts(NamedTuple):
    """The servers of a URL, and its ``user:password`` part (``""`` if none)."""

    userinfo: str
    servers: list[tuple[str, int]]


def parse_hosts(url: str, schemes: tuple[str, ...], default_port: int) -> Hosts:
    """The servers a multi-host URL names, ``default_port`` where it gives none.

    Raises:
        InvalidArgument: Another scheme, no server, or a bad host or port.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in schemes:
        raise InvalidArgument(f"not a {schemes[0]}:// URL: {redacted(url)!r}")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in rest.split("?", 1)[0] and "@" not in netloc:
        # A password holding a "/" or "?": cut there, its first part was read as a
        # server and quoted in the error.
        raise InvalidArgument(
            f"cannot read the servers of {redacted(url)!r}: percent-encode any '/', '?' "
            "or '@' in the user name and password"
        )
    userinfo, _, hosts = netloc.rpartition("@")
    servers: list[tuple[str, int]] = []
    for item in filter(None, hosts.split(",")):
        try:
            parts = urlsplit("//" + item)
            host, port = parts.hostname, parts.port or default_port
        except ValueError as exc:
            detail = "" if "@" in rest else f": {exc}"  # the text may quote the item
            raise InvalidArgument(
                f"bad server {_quoted(item, rest)} in {redacted(url)!r}{detail}"
            ) from exc
        if not host:
            raise InvalidArgument(f"bad server {_quoted(item, rest)} in {redacted(url)!r}")
        servers.append((host, port))
    if not servers:
        raise InvalidArgument(
            f"no server in {redacted(url)!r}: use {schemes[0]}://host:port[,host:port]"
        )
    return Hosts(userinfo, servers)


def _quoted(item: str, rest: str) -> str:
    """``item`` for an error, unless the URL has user information (with an unencoded
    "?" in a password, a piece of it may be what was taken for a server)."""
    return "(not shown: the URL holds a password)" if "@" in rest else repr(item)
