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
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

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
) -> dict[str, KafkaError]:
    """Create the topics not in ``known`` (an existing one is fine) and add them to it.

    Args:
        admin: The admin client that creates them.
        topics: The topics wanted.
        known: Topics known to exist; updated.
        **settings: ``NewTopic`` arguments (partitions, replication factor, configs).

    Returns:
        The topics the broker refused to create and that do not exist, each with
        the broker's error (its reason in the message).
    """
    missing = [topic for topic in topics if topic not in known]
    if not missing:
        return {}
    response = await admin.create_topics([NewTopic(topic, **settings) for topic in missing])
    refused: dict[str, tuple[int, str | None]] = {}
    for topic, code, *message in response.topic_errors:
        if code and code != TopicAlreadyExistsError.errno:
            refused[topic] = (code, message[0] if message else None)
        else:
            known.add(topic)
    denied = [topic for topic, (code, _) in refused.items() if code in _NOT_ALLOWED]
    if denied:
        # Kafka checks the right to create before whether the topic exists: a client
        # that may only read and write topics an operator made beforehand is told
        # "not authorized" for those too. Describing needs a lesser right.
        _, absent = await partitions(admin, denied)
        for topic in denied:
            if topic not in absent:
                known.add(topic)
                del refused[topic]
    errors: dict[str, KafkaError] = {}
    for topic, (code, message) in refused.items():
        reason = f": {message}" if message else ""
        hint = (
            " (create it beforehand, or allow this client to create topics)"
            if code in _NOT_ALLOWED
            else ""
        )
        errors[topic] = for_code(code)(f"creating topic {topic!r}{reason}{hint}")
    return errors


#: What a broker answers a client that may not create a topic (Kafka's ACLs).
_NOT_ALLOWED = frozenset(
    {TopicAuthorizationFailedError.errno, ClusterAuthorizationFailedError.errno}
)


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
