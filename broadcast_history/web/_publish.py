"""Publishing over HTTP: one set of body rules for the streaming app and the admin API.

The body is the message: ``text/*`` and ``application/json`` as ``str`` (UTF-8, or
the ``charset`` given), anything else as ``bytes``; ``Idempotency-Key`` is the
``key=`` (its bytes read as UTF-8 when they are, else as Latin-1, HTTP's own). The
answer says where the event is stored.
"""

from __future__ import annotations

import codecs
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .._broadcast import Broadcast
from .._errors import InvalidArgument, InvalidMessage, MessageTooLarge
from .._event import Event
from .._validation import check_key


def event_info(event: Event) -> dict[str, Any]:
    """Where a stored event is: ``{"id", "channel", "offset", "epoch", "timestamp"}``."""
    return {
        "id": f"{event.epoch}:{event.offset}",
        "channel": event.channel,
        "offset": event.offset,
        "epoch": event.epoch,
        "timestamp": event.timestamp.isoformat() if event.timestamp else None,
    }


class UnsupportedEncoding(InvalidArgument):
    """The body is compressed (``Content-Encoding``): HTTP 415."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes.

    Raises:
        MessageTooLarge: The body (or its declared ``Content-Length``) is over ``limit``.
        UnsupportedEncoding: It has a ``Content-Encoding`` (it would be stored as
            the compressed bytes).
        InvalidArgument: The client went away before sending all of it.
    """
    encoding = request.headers.get("content-encoding", "")
    if any(coding.strip().lower() not in ("", "identity") for coding in encoding.split(",")):
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise MessageTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise MessageTooLarge(f"the body is larger than {limit} bytes")
    except ClientDisconnect:
        # Nobody reads the answer; a 400 rather than a traceback in the server's log.
        raise InvalidArgument("the client went away before sending the whole body") from None
    return bytes(body)


def header_text(value: str | None) -> str | None:
    """A header's text: Starlette reads its bytes as Latin-1, clients send UTF-8."""
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def body_message(body: bytes, content_type: str) -> str | bytes:
    """The message a body stands for, by its ``Content-Type``.

    Raises:
        InvalidMessage: Text that does not decode in its charset.
    """
    media, *parameters = content_type.split(";")
    media = media.strip().lower()
    if not (media.startswith("text/") or media == "application/json"):
        return body
    charset = "utf-8"
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        known = codecs.lookup(charset).name in _CHARSETS
    except (LookupError, ValueError):  # unknown, or not a name at all (a NUL in it)
        known = False
    if not known:
        raise InvalidMessage(f"unsupported charset {charset!r}: send UTF-8 or another web charset")
    try:
        return body.decode(charset)
    except ValueError as exc:  # bad text (UnicodeError)
        raise InvalidMessage(f"the body is not valid {charset} text: {exc}") from None


# The charsets a body may name: the web's text encodings, by the name Python gives
# them. Not any Python codec: some are no text encoding of the web at all, and
# punycode's decoder takes time quadratic in the body (a megabyte held the event
# loop, every stream with it, for most of a minute).
_CHARSETS = frozenset(
    codecs.lookup(label).name
    for label in (
        "utf-8 utf-16 utf-16-le utf-16-be utf-32 utf-32-le utf-32-be ascii "
        "koi8-r koi8-u shift_jis euc-jp iso-2022-jp gb2312 gbk gb18030 big5 euc-kr "
        + " ".join(f"iso-8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16))
        + " "
        + " ".join(f"windows-{n}" for n in range(1250, 1259))
    ).split()
)


async def publish_request(broadcast: Broadcast, channel: str, request: Request) -> Event:
    """Publish the body of ``request`` on ``channel``.

    Raises:
        MessageTooLarge: The body is over ``broadcast.max_message_size`` (HTTP 413).
        InvalidArgument: Bad channel name, key or text (HTTP 400).
        LogUnavailable: The log could not store it (HTTP 503).
    """
    # The key is checked before the body is read: a request refused for its header
    # should not first take a body of up to max_message_size.
    key = check_key(header_text(request.headers.get("idempotency-key")))
    body = await read_body(request, broadcast.max_message_size)
    message = body_message(body, request.headers.get("content-type", ""))
    return await broadcast.publish(channel, message, key=key)
