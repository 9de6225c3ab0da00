"""An export sent over HTTP, and what its client sees when it fails midway."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Send

from .._errors import BroadcastError
from ._jsonl import error_line

logger = logging.getLogger("broadcast_history.admin")


class ExportResponse(StreamingResponse):
    """JSON lines of an export.

    The status (200) goes out with the first line. If the export fails later (a
    channel trimmed or deleted meanwhile, the log unreachable), the body ends with an
    error line saying why and without its last chunk: under uvicorn the client sees
    a broken transfer (``curl`` exits 18), the file itself says what happened (and no
    import takes it), and the server logs a warning, not a traceback.
    """

    media_type = "application/x-ndjson"

    @classmethod
    async def of(cls, lines: AsyncGenerator[str, None]) -> ExportResponse:
        """The export of ``lines``, its first line read before the status goes out:
        a channel missing (404) or a log that cannot be reached (503) is an answer of
        its own, not a 200 whose body stops at once."""
        try:
            first = await anext(lines)
        except BaseException:
            await lines.aclose()
            raise
        return cls(_then(first, lines))

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        except BroadcastError as exc:
            logger.warning("an export over HTTP stopped midway: %s", exc)
            await send(
                {
                    "type": "http.response.body",
                    "body": error_line(str(exc)).encode(),
                    "more_body": True,
                }
            )


async def _then(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for line in rest:
        yield line
