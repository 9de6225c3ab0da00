"""Property-based run of the admin API against its own OpenAPI schema: no 5xx, ever.

Every operation but the event stream (which never ends by design; its own tests are
in test_admin_http.py) gets generated valid and invalid requests, with the token,
on SQLite and on Postgres (which is stricter: NUL characters, 64-bit integers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

try:  # schemathesis >= 4.3x: stop the app (and disconnect its broadcast) after the test
    from schemathesis.python.asgi import shutdown_lifespans
except ImportError:  # pragma: no cover - older 4.x: the lifespan ends with the process

    def shutdown_lifespans() -> None:
        pass


from broadcast_history import Broadcast
from broadcast_history.admin import create_app
from tests.support.admin_support import LOG_KINDS, fresh_log_url

TOKEN = "schemathesis"


@schemathesis.serializer("application/x-ndjson")
def _ndjson(_ctx: Any, value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


async def _seed(url: str) -> None:
    async with Broadcast("memory://", log=url) as broadcast:
        for name in ("a", "room/1", "é x"):
            for i in range(3):
                await broadcast.publish(name, f"message {i}")
        await broadcast.publish("a", b"\x00\xff")


@pytest.fixture(params=LOG_KINDS)
def api_schema(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    url = asyncio.run(fresh_log_url(request.param, tmp_path))
    asyncio.run(_seed(url))
    # The app's lifespan connects the broadcast in schemathesis' own event loop.
    app = create_app(Broadcast("memory://", log=url), token=TOKEN)
    yield schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path_regex=r".*/stream$")
    shutdown_lifespans()


def test_no_server_error(api_schema: Any) -> None:
    # Operation by operation with plain Hypothesis: schemathesis' pytest integration
    # (`from_fixture(...).parametrize()`) does not run under pytest 9.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            # Every answer is one the schema declares, shaped as it says.
            checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks)

        check()
