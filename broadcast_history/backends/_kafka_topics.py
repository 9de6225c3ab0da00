"""Kafka names and topics: channel to topic, URL to brokers, topic creation."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from .._errors import InvalidArgument

_MAX_TOPIC = 249  # Kafka's limit on topic name length
_ILLEGAL = re.compile(r"[^a-zA-Z0-9._-]")
#: What a topic_prefix may be: legal topic characters, leaving room for the name.
PREFIX = re.compile(r"[a-zA-Z0-9._-]{0,128}")
# Transient trouble: the broker is away, restarting or slow. Worth another try.
TRANSIENT = (OSError, asyncio.TimeoutError)


def topic_for(channel: str, prefix: str = "bh.") -> str:
    """The Kafka topic that carries ``channel``.

    Topic names allow only ``[a-zA-Z0-9._-]`` and 249 characters, while channel names
    may hold any 255 characters; the readable part is sanitized and cut, and a hash
    of the whole name keeps distinct channels on distinct topics.
    """
    digest = hashlib.blake2b(channel.encode(), digest_size=8).hexdigest()
    room = _MAX_TOPIC - len(prefix) - len(digest) - 1
    return f"{prefix}{_ILLEGAL.sub('_', channel)[:room]}.{digest}"


def bootstrap_servers(urls: str | Sequence[str]) -> list[str]:
    """The ``host:port`` of every broker named in ``urls`` (port 9092 if none)."""
    servers: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls:
        netloc = urlsplit(url).netloc if "://" in url else url
        for host in filter(None, netloc.split(",")):
            servers.append(host if ":" in host.rsplit("]", 1)[-1] else f"{host}:9092")
    if not servers:
        raise InvalidArgument(f"no Kafka bootstrap server in {urls!r}")
    return servers


def retriable(exc: BaseException) -> bool:
    """Whether trying again later may succeed."""
    return isinstance(exc, TRANSIENT) or (isinstance(exc, KafkaError) and exc.retriable)


async def create_topics(
    admin: AIOKafkaAdminClient, topics: Iterable[str], known: set[str], **settings: Any
) -> None:
    """Create the topics not in ``known`` (an existing one is fine) and add them to it.

    Args:
        admin: The admin client that creates them.
        topics: The topics wanted.
        known: Topics known to exist; updated.
        **settings: ``NewTopic`` arguments (partitions, replication factor).
    """
    missing = [topic for topic in topics if topic not in known]
    if not missing:
        return
    response = await admin.create_topics([NewTopic(topic, **settings) for topic in missing])
    for topic, code, *_ in response.topic_errors:
        if code and code != TopicAlreadyExistsError.errno:
            raise for_code(code)(f"creating topic {topic!r}")
        known.add(topic)


async def partitions(
    admin: AIOKafkaAdminClient, topics: list[str]
) -> tuple[set[TopicPartition], set[str]]:
    """The partitions of ``topics`` and the topics the broker lacks (also a ping).

    Read from fresh metadata each time, so a topic re-created with another partition
    count is noticed.
    """
    described = await admin.describe_topics(topics)
    wanted: set[TopicPartition] = set()
    missing = set(topics)
    for info in described:
        topic = info["topic"]
        if topic in missing and not info["error_code"]:
            missing.discard(topic)
            wanted.update(TopicPartition(topic, p["partition"]) for p in info["partitions"])
    return wanted, missing
