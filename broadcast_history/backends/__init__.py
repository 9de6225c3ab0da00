"""Live transports, chosen by URL scheme and imported only when used."""

from __future__ import annotations

import importlib
from typing import NamedTuple
from urllib.parse import urlsplit

from .._errors import InvalidArgument
from .base import BroadcastBackend


class _Entry(NamedTuple):
    module: str
    cls: str
    extra: str | None


# One table for every scheme; modules are imported lazily so that a user of one
# transport never needs the drivers of the others.
_SCHEMES: dict[str, _Entry] = {
    "memory": _Entry("memory", "MemoryBackend", None),
    "redis": _Entry("redis", "RedisBackend", "redis"),
    "rediss": _Entry("redis", "RedisBackend", "redis"),
    "redis-stream": _Entry("redis_stream", "RedisStreamBackend", "redis"),
    "redis-streams": _Entry("redis_stream", "RedisStreamBackend", "redis"),
    "rediss-stream": _Entry("redis_stream", "RedisStreamBackend", "redis"),
    "postgres": _Entry("postgres", "PostgresBackend", "postgres"),
    "postgresql": _Entry("postgres", "PostgresBackend", "postgres"),
    "kafka": _Entry("kafka", "KafkaBackend", "kafka"),
    "nats": _Entry("nats", "NatsBackend", "nats"),
    "redis-cluster": _Entry("redis_cluster", "RedisClusterBackend", "redis"),
    "rediss-cluster": _Entry("redis_cluster", "RedisClusterBackend", "redis"),
}


def backend_from_url(url: str) -> BroadcastBackend:
    """Build the transport for ``url``.

    Raises:
        InvalidArgument: The scheme is unknown (a ``ValueError``, as in broadcaster).
        ImportError: The transport's driver is not installed; the message names the
            extra to install.
    """
    scheme = urlsplit(url).scheme
    entry = _SCHEMES.get(scheme)
    if entry is None:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        # Worded as broadcaster's, which code and tests may match.
        raise InvalidArgument(f"Unsupported backend: URL scheme {scheme!r}; use one of {known}")
    try:
        module = importlib.import_module(f"{__name__}.{entry.module}")
    except ModuleNotFoundError as exc:
        if entry.extra is None or exc.name is None or exc.name.startswith(__name__):
            raise
        raise ImportError(
            f"The {scheme}:// transport needs {exc.name!r}: "
            f"pip install 'broadcast-history[{entry.extra}]'"
        ) from exc
    backend: BroadcastBackend = getattr(module, entry.cls)(url)
    return backend


__all__ = ["BroadcastBackend", "backend_from_url"]
