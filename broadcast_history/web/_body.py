"""Request bodies: read with a size cap, and turned into a message by content type."""

from __future__ import annotations

from starlette.requests import Request

from .._errors import InvalidMessage, MessageTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes.

    Raises:
        MessageTooLarge: The body (or its declared ``Content-Length``) is over ``limit``.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise MessageTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise MessageTooLarge(f"the body is larger than {limit} bytes")
    return bytes(body)


def is_text(content_type: str) -> bool:
    """Whether a body of this media type is published as ``str``."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media == "application/json"


def body_message(body: bytes, content_type: str) -> str | bytes:
    """The message a ``POST`` body stands for: ``text/*`` and ``application/json`` as
    ``str`` (UTF-8, or the ``charset`` given), anything else as ``bytes``.

    Raises:
        InvalidMessage: Text that does not decode in its charset.
    """
    if not is_text(content_type):
        return body
    charset = "utf-8"
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        return body.decode(charset)
    except (LookupError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"the body is not valid {charset} text: {exc}") from None
