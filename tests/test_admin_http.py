"""The admin HTTP API, over SQLite and Postgres logs.

Plain routes go through httpx's ASGI transport. The event stream runs under a real
uvicorn server on a free port, because the ASGI transport buffers whole responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from broadcast_history import Broadcast, InvalidArgument
from broadcast_history.admin import create_app
from tests.support.admin_support import LOG_KINDS, fresh_log_url

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def path(channel: str, suffix: str = "") -> str:
    return f"/channels/{quote(channel, safe='')}{suffix}"


@pytest.fixture(params=LOG_KINDS)
async def broadcast(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broadcast]:
    url = await fresh_log_url(request.param, tmp_path)
    async with Broadcast("memory://", log=url, idle_check=0.2) as b:
        yield b


@pytest.fixture
async def client(broadcast: Broadcast) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(broadcast, token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin", headers=AUTH) as c:
        yield c


# -- construction and auth -------------------------------------------------------------


async def test_refuses_to_build_without_token(broadcast: Broadcast) -> None:
    with pytest.raises(InvalidArgument, match="token"):
        create_app(broadcast)
    with pytest.raises(InvalidArgument):
        create_app(broadcast, token="")
    app = create_app(broadcast, allow_no_token=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000") as c:
        assert (await c.get("/channels")).status_code == 200


async def test_without_a_token_the_rest_of_the_web_is_refused(broadcast: Broadcast) -> None:
    """Served without a token, the app took writes from any web page open in the
    operator's browser (a form posting text/plain), and answered any Host, which a
    DNS-rebinding page uses to read it too (found by a security probe)."""
    app = create_app(broadcast, allow_no_token=True)
    transport = httpx.ASGITransport(app=app)
    publish = path("local/1", "/events")
    for base in ("http://localhost:8000", "http://127.0.0.1", "http://[::1]:9"):
        async with httpx.AsyncClient(transport=transport, base_url=base) as c:
            assert (await c.get("/channels")).status_code == 200
            assert (await c.post(publish, content="cli")).status_code == 201  # no Origin
            console = {"Origin": base}  # the console, served by the app itself
            assert (await c.post(publish, content="ui", headers=console)).status_code == 201
            page = {"Origin": "http://localhost:3000"}
            refused = await c.post(publish, content="x", headers=page)
            assert refused.status_code == 403 and "no writes from" in refused.json()["detail"]
            assert (await c.delete(path("local/1"), headers=page)).status_code == 403
    async with httpx.AsyncClient(transport=transport, base_url="http://evil.example:8000") as c:
        rebound = await c.get("/channels")
        assert rebound.status_code == 403 and "only requests to localhost" in rebound.text
    assert [e.message for e in await broadcast.log.read("local/1", after=0)] == [b"cli", b"ui"] * 3


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ],
)
async def test_auth_failures(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    client.headers.pop("Authorization")
    for method, url in [("GET", "/channels"), ("GET", path("c")), ("DELETE", path("c"))]:
        response = await client.request(method, url, headers=headers)
        assert response.status_code == 401, (method, url)
        assert response.headers["www-authenticate"] == "Bearer"
    # The schema is public: it tells nothing about the data.
    assert (await client.get("/openapi.json", headers=headers)).status_code == 200


async def test_console_is_public_and_stays_in_its_directory() -> None:
    """/ui serves the console's static files without the token, nothing else."""
    app = create_app(Broadcast("memory://"), token=TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        redirect = await c.get("/ui")
        assert redirect.status_code == 308
        assert redirect.headers["location"] == "ui/"  # relative: works under a mount prefix
        page = await c.get("/ui/")
        assert page.status_code == 200
        assert "broadcast_history console" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        script = await c.get("/ui/main.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")  # ES module
        # The API behind it still wants the token.
        assert (await c.get("/channels")).status_code == 401
        assert (await c.get("/ui/../channels")).status_code == 401
        # Escapes from the directory: the target exists, but is not served.
        assert (Path(__file__).parents[1] / "broadcast_history/admin/_http.py").exists()
        for escape in [
            "/ui/%2e%2e/%2e%2e/_http.py",
            "/ui/%2e%2e%2f%2e%2e%2f_http.py",
            "/ui/..%2F..%2F_http.py",
            "/ui//etc/passwd",
            "/ui/%2Fetc%2Fpasswd",
        ]:
            assert (await c.get(escape)).status_code == 404, escape
    assert all("/ui" not in route for route in app.openapi()["paths"])

    # Under a prefix the redirect still lands on the console (the page finds the API
    # relative to its own address too).
    host = Starlette(routes=[Mount("/admin", app)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=host), base_url="http://a") as c:
        page = await c.get("/admin/ui", follow_redirects=True)
        assert (page.status_code, page.url.path) == (200, "/admin/ui/")


# -- channels -----------------------------------------------------------------------------


async def test_channels_list_and_pages(broadcast: Broadcast, client: httpx.AsyncClient) -> None:
    for name in ["room/1", "room/2", "room/3", "lobby"]:
        await broadcast.publish(name, "x")
    names: list[str] = []
    params: dict[str, Any] = {"prefix": "room/", "limit": 2}
    while True:
        body = (await client.get("/channels", params=params)).json()
        names += [c["name"] for c in body["channels"]]
        if body["next_cursor"] is None:
            break
        params["after"] = body["next_cursor"]
    assert names == ["room/1", "room/2", "room/3"]
    assert (await client.get("/channels", params={"limit": 0})).status_code == 422
    response = await client.get("/channels", params={"prefix": "a\x01"})
    assert response.status_code == 400 and "control character" in response.json()["detail"]


@pytest.mark.parametrize("name", ["a/b c é", "a/events", "x/stream", "100%", "ünï/☃/ "])
async def test_channel_names_need_no_care(
    broadcast: Broadcast, client: httpx.AsyncClient, name: str
) -> None:
    await broadcast.publish(name, "hi")
    if "/" in name:  # the channel a greedy route would wrongly pick
        await broadcast.publish(name.split("/")[0], "other")
    stats = (await client.get(path(name))).json()
    assert (stats["name"], stats["count"], stats["first_offset"]) == (name, 1, 1)
    events = (await client.get(path(name, "/events"))).json()
    assert [(e["channel"], e["message"]) for e in events["events"]] == [(name, "hi")]
    assert (await client.get(path(name, "/events/1"))).json()["message"] == "hi"


async def test_channel_not_found_and_bad_name(client: httpx.AsyncClient) -> None:
    for url in [path("nope"), path("nope", "/events"), path("nope", "/events/1")]:
        response = await client.get(url)
        assert response.status_code == 404 and "nope" in response.json()["detail"]
    assert (await client.delete(path("nope"))).status_code == 404
    assert (await client.get(path("bad\x00name"))).status_code == 400
    assert (await client.get(path("x" * 256))).status_code == 400


# -- events -------------------------------------------------------------------------------


async def test_events_pages_both_ways(broadcast: Broadcast, client: httpx.AsyncClient) -> None:
    for i in range(1, 8):
        await broadcast.publish("chat", f"m{i}")
    for order, cursor_name, expected in [
        ("asc", "after", [1, 2, 3, 4, 5, 6, 7]),
        ("desc", "before", [7, 6, 5, 4, 3, 2, 1]),
    ]:
        offsets: list[int] = []
        params: dict[str, Any] = {"limit": 3, "order": order}
        while True:
            body = (await client.get(path("chat", "/events"), params=params)).json()
            assert body["order"] == order
            offsets += [e["offset"] for e in body["events"]]
            if body["next_cursor"] is None:
                break
            params[cursor_name] = body["next_cursor"]
        assert offsets == expected
    body = (await client.get(path("chat", "/events"), params={"after": 2, "before": 5})).json()
    assert [e["offset"] for e in body["events"]] == [3, 4]


async def test_events_time_filters(broadcast: Broadcast, client: httpx.AsyncClient) -> None:
    early = [await broadcast.publish("t", "a") for _ in range(2)]
    await asyncio.sleep(0.01)
    middle = datetime.now(timezone.utc)
    await asyncio.sleep(0.01)
    late = [await broadcast.publish("t", b"\x00b") for _ in range(2)]
    zulu = middle.isoformat().replace("+00:00", "Z")
    body = (await client.get(path("t", "/events"), params={"since": zulu})).json()
    assert [e["offset"] for e in body["events"]] == [3, 4]
    assert body["events"][0] == {
        "channel": "t",
        "offset": 3,
        "epoch": late[0].epoch,
        "timestamp": late[0].timestamp.isoformat().replace("+00:00", "Z"),
        "key": None,
        "encoding": "base64",
        "message": "AGI=",
    }
    params = {"until": middle.isoformat(), "order": "desc"}
    body = (await client.get(path("t", "/events"), params=params)).json()
    assert [e["offset"] for e in body["events"]] == [2, 1]
    params = {"since": early[1].timestamp.isoformat(), "until": late[1].timestamp.isoformat()}
    body = (await client.get(path("t", "/events"), params=params)).json()
    assert [e["offset"] for e in body["events"]] == [2, 3]
    # since and until read times alike: a date with a zone, an hours-only zone (until
    # used pydantic's parser, which refused both).
    day = early[0].timestamp.date().isoformat()
    for params in ({"since": f"{day}Z"}, {"until": f"{day}+02"}, {"until": f"{day}T23:59+02"}):
        assert (await client.get(path("t", "/events"), params=params)).status_code == 200, params


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
        {"after": -1},
        {"before": 2**63},
        {"order": "sideways"},
        {"since": "2024-01-01T00:00:00"},  # no timezone
        {"until": "yesterday"},
        {"until": "1714564860"},  # not Unix seconds: since=<digits> is an offset
        {"until": "100"},
    ],
)
async def test_events_bad_parameters(
    broadcast: Broadcast, client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    await broadcast.publish("c", "x")
    response = await client.get(path("c", "/events"), params=params)
    assert response.status_code == 422
    assert response.json()["detail"]


# -- changes ------------------------------------------------------------------------------


async def test_trim(broadcast: Broadcast, client: httpx.AsyncClient) -> None:
    for i in range(5):
        await broadcast.publish("tr", str(i))
    response = await client.post(path("tr", "/trim"), json={"before": 3})
    assert response.json() == {"channel": "tr", "removed": 2, "first_offset": 3}
    later = datetime.now(timezone.utc).isoformat()
    response = await client.post(path("tr", "/trim"), json={"before_time": later})
    assert response.json()["removed"] == 3
    assert (await client.post(path("tr", "/trim"), json={})).status_code == 400
    assert (await client.post(path("tr", "/trim"), json={"before": -2})).status_code == 422
    for bad in ("5", True, 5.0):  # not offsets (the Python API refuses them too)
        response = await client.post(path("tr", "/trim"), json={"before": bad})
        assert response.status_code == 422, bad
    for number in (99_999_999_999, "99999999999"):  # not Unix seconds (year 5138)
        response = await client.post(path("tr", "/trim"), json={"before_time": number})
        assert response.status_code == 422, response.text
    assert (await client.post(path("zz", "/trim"), json={"before": 1})).status_code == 404
    assert (await client.get(path("tr", "/events/1"))).status_code == 404
    stats = (await client.get("/stats")).json()
    assert (stats["channels"], stats["events"], stats["trimmed"]) == (1, 0, 5)


async def test_totals_of_a_costly_log_are_read_again_when_their_cost_allows(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/stats reads every channel row (a million: 0.35 s of Postgres' time, 1.35 s
    before the first timestamps were looked up for stored channels only), and each
    open console asked for it every 2 s. An answer now serves the requests that come
    within 20 times as long as it took."""
    totals = broadcast.log.totals
    reads: list[float] = []

    async def costly() -> Any:
        reads.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.05)  # a log of very many channels
        return await totals()

    monkeypatch.setattr(broadcast.log, "totals", costly)
    app = create_app(broadcast, token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as c:
        await broadcast.publish("one", "x")
        assert (await c.get("/stats")).json()["events"] == 1
        await broadcast.publish("one", "y")
        for _ in range(5):  # consoles polling: the same answer
            assert (await c.get("/stats")).json()["events"] == 1
        assert len(reads) == 1
        await asyncio.sleep(0.8)  # less than 20 times the read (0.05 s at least)
        assert (await c.get("/stats")).json()["events"] == 1
        for _ in range(60):  # at 20 times the read, and the log's own time (loaded: ~2 s)
            await asyncio.sleep(0.1)
            if (await c.get("/stats")).json()["events"] == 2:
                break
        assert len(reads) == 2
    monkeypatch.undo()
    transport = httpx.ASGITransport(app=create_app(broadcast, token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as c:
        assert (await c.get("/stats")).json()["events"] == 2
        await broadcast.publish("one", "z")  # a quick read: answered afresh soon
        for _ in range(30):  # (a loaded machine's quick read is slower, spaced more)
            await asyncio.sleep(0.1)
            if (await c.get("/stats")).json()["events"] == 3:
                break
        assert (await c.get("/stats")).json()["events"] == 3


async def test_delete_changes_epoch(broadcast: Broadcast, client: httpx.AsyncClient) -> None:
    first = await broadcast.publish("a b/c", "x")
    response = await client.delete(path("a b/c"))
    assert response.status_code == 204
    assert (await client.get(path("a b/c"))).status_code == 404
    again = await broadcast.publish("a b/c", "y")
    stats = (await client.get(path("a b/c"))).json()
    assert stats["epoch"] == again.epoch != first.epoch
    assert stats["last_offset"] == 1


async def test_export_and_import(broadcast: Broadcast, client: httpx.AsyncClient) -> None:
    await broadcast.publish("ex/1", b"\xff\x00")
    await broadcast.publish("ex/1", "two", key="k")
    await broadcast.publish("ex/2", "other")
    one = await client.get(path("ex/1", "/export"))
    assert one.headers["content-type"].startswith("application/x-ndjson")
    lines = one.text.splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["channel", "event", "event", "end"]
    assert json.loads(lines[-1]) == {"type": "end", "format": 2, "channels": 1, "events": 2}
    everything = (await client.get("/export", params={"prefix": "ex/"})).text
    assert len(everything.splitlines()) == 6
    assert (await client.get(path("missing", "/export"))).status_code == 404

    conflict = await client.post("/import", content=everything)
    assert conflict.status_code == 409 and "already exists" in conflict.json()["detail"]
    await client.delete(path("ex/1"))
    await client.delete(path("ex/2"))
    imported = await client.post("/import", content=everything)
    assert imported.status_code == 201
    assert imported.json() == {"channels": ["ex/1", "ex/2"], "events": 3}
    assert (await client.get("/export", params={"prefix": "ex/"})).text == everything
    bad = await client.post("/import", content=b'{"type": "channel"}\n')
    assert bad.status_code == 400 and "line 1" in bad.json()["detail"]


async def test_an_export_the_log_cannot_start_is_a_503(
    broadcast: Broadcast, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export whose first read failed answered 200 with a body of one error line:
    the status went out before anything was read. The first line is read first."""
    from broadcast_history import LogUnavailable

    await broadcast.publish("ex/1", "one")

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise LogUnavailable("the event log did not answer a read within 5 s")

    monkeypatch.setattr(broadcast.log, "channels", down)
    monkeypatch.setattr(broadcast.log, "channel", down)
    for url in ("/export", path("ex/1", "/export")):
        answer = await client.get(url)
        assert answer.status_code == 503, (url, answer.text)
        assert "did not answer" in answer.json()["detail"]


async def test_publish_text_json_bytes_and_keys(
    broadcast: Broadcast, client: httpx.AsyncClient
) -> None:
    url = path("pub/1", "/events")
    text = await client.post(url, content="héllo", headers={"content-type": "text/plain"})
    assert text.status_code == 201
    body = text.json()
    assert (body["offset"], body["channel"]) == (1, "pub/1")
    assert body["id"] == f"{body['epoch']}:1"
    assert (await client.post(url, json={"a": 1})).status_code == 201
    raw = await client.post(url, content=b"\x00\xff")  # no content type: bytes
    keyed = [
        await client.post(url, content=b"once", headers={"Idempotency-Key": "k-1"})
        for _ in range(2)
    ]
    assert keyed[0].json() == keyed[1].json()
    # A key of 255 characters is one however many bytes its UTF-8 takes (the header's
    # length was checked in bytes: 400 here).
    wide = await client.post(url, content=b"w", headers={"Idempotency-Key": ("é" * 255).encode()})
    assert wide.status_code == 201
    too_long = await client.post(url, content=b"w", headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400 and "key" in too_long.json()["detail"]
    # Refused for its header before its body is read (a 413 when the body came first).
    bad_key_big_body = await client.post(
        url,
        content=b"x" * (broadcast.max_message_size + 1),
        headers={"Idempotency-Key": "k" * 256},
    )
    assert bad_key_big_body.status_code == 400
    stored = [(e.message, e.key) for e in await broadcast.log.read("pub/1", after=0)]
    assert stored == [
        ("héllo", None),
        ('{"a":1}', None),
        (b"\x00\xff", None),
        (b"once", "k-1"),
        (b"w", "é" * 255),
    ]
    assert raw.json()["offset"] == 3
    big = await client.post(url, content=b"x" * (broadcast.max_message_size + 1))
    assert big.status_code == 413
    compressed = await client.post(url, content=b"\x1f\x8b", headers={"content-encoding": "gzip"})
    assert compressed.status_code == 415 and "uncompressed" in compressed.json()["detail"]
    assert (await client.post(path("x" * 256, "/events"), content=b"x")).status_code == 400
    bad = await client.post(url, content=b"\xff", headers={"content-type": "text/plain"})
    assert bad.status_code == 400
    unauthorized = await client.post(url, content=b"x", headers={"Authorization": "no"})
    assert unauthorized.status_code == 401


async def test_an_export_that_fails_midway_ends_broken_and_says_why(
    broadcast: Broadcast, caplog: pytest.LogCaptureFixture
) -> None:
    """A channel trimmed while its export was sent over HTTP broke the response with
    a traceback in the server's log ("Caught handled exception, but response already
    started"). The client still gets a broken transfer, the body's last line says
    why (and the import refuses the file with it), and the log has one warning."""
    from broadcast_history.admin import HistoryAdmin, InvalidExport

    channel = "ex/big"
    for _ in range(20):
        await asyncio.gather(*(broadcast.publish(channel, "x" * 1000) for _ in range(500)))
    lines: list[str] = []
    async with serving(broadcast) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("GET", path(channel, "/export")) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    lines.append(line)
                    if len(lines) == 10:
                        await HistoryAdmin.of(broadcast).trim(channel, before=9_000)
    last = json.loads(lines[-1])
    assert last == {
        "type": "error",
        "detail": f"{channel!r} was trimmed during the export: export again",
    }
    assert 10 <= len(lines) < 9_000
    with pytest.raises(InvalidExport, match=f"line {len(lines)}: the export stopped here"):
        await HistoryAdmin.of(broadcast).import_jsonl([*lines[:-1], lines[-1]])
    warnings = [r.getMessage() for r in caplog.records if r.name == "broadcast_history.admin"]
    assert warnings == [f"an export over HTTP stopped midway: {last['detail']}"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# -- event stream -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(broadcast: Broadcast) -> AsyncIterator[str]:
    """The admin app under uvicorn on a free port, in this event loop."""
    app = create_app(broadcast, token=TOKEN, heartbeat=0.5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def sse_messages(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """SSE messages (comments skipped) as dicts of field -> value."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if fields.get("event") in ("message", "reset"):  # not the opening `start`
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def read_messages(
    base: str,
    url: str,
    count: int,
    headers: dict[str, str] | None = None,
    after_first: Callable[[], Awaitable[object]] | None = None,
) -> list[dict[str, str]]:
    """The first ``count`` messages; ``after_first`` is awaited once the first came."""
    found: list[dict[str, str]] = []
    async with (
        httpx.AsyncClient(base_url=base, headers=AUTH, timeout=20) as http,
        http.stream("GET", url, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for message in sse_messages(response):
            found.append(message)
            if len(found) == count:
                break
            if len(found) == 1 and after_first is not None:
                await after_first()
    return found


async def test_stream_catch_up_then_live(broadcast: Broadcast) -> None:
    name = "live/é chan"
    first = [await broadcast.publish(name, f"m{i}") for i in range(1, 4)]
    epoch = first[0].epoch
    async with serving(broadcast) as base:
        reader = asyncio.create_task(
            read_messages(base, path(name, "/stream"), 4, {"Last-Event-ID": f"{epoch}:1"})
        )
        await asyncio.sleep(0.3)
        await broadcast.publish(name, b"\x01live")
        await broadcast.publish(name, "m5")
        messages = await asyncio.wait_for(reader, 20)
        assert [m["id"] for m in messages] == [f"{epoch}:{o}" for o in (2, 3, 4, 5)]
        assert {m["event"] for m in messages} == {"message"}
        data = [json.loads(m["data"]) for m in messages]
        assert [(d["encoding"], d["message"]) for d in data][:3] == [
            ("text", "m2"),
            ("text", "m3"),
            ("base64", "AWxpdmU="),
        ]

        # ?since= as an offset and as a time; Last-Event-ID without an epoch.
        got = await read_messages(base, path(name, "/stream") + "?since=4", 1)
        assert got[0]["id"] == f"{epoch}:5"
        since = quote(first[2].timestamp.isoformat())
        got = await read_messages(base, path(name, "/stream") + f"?since={since}", 2)
        assert [m["id"] for m in got] == [f"{epoch}:3", f"{epoch}:4"]
        got = await read_messages(base, path(name, "/stream"), 1, {"Last-Event-ID": "3"})
        assert got[0]["id"] == f"{epoch}:4"


async def test_stream_resets_say_why_then_go_on_live(broadcast: Broadcast) -> None:
    old = await broadcast.publish("gone", "x")
    for _ in range(3):
        await broadcast.publish("trimmed", "x")
    await broadcast.log.trim("trimmed", before=3)
    await broadcast.log.delete_channel("gone")
    new = await broadcast.publish("gone", "new incarnation")
    trimmed = await broadcast.log.channel("trimmed")
    assert trimmed is not None
    async with serving(broadcast) as base:
        stale = {"Last-Event-ID": f"{old.epoch}:1"}
        # Published once the reset came: sooner, the reset would name a later head.
        reset, after = await asyncio.wait_for(
            read_messages(
                base,
                path("gone", "/stream"),
                2,
                stale,
                after_first=lambda: broadcast.publish("gone", "after the reset"),
            ),
            20,
        )
        assert (reset["event"], reset["id"]) == ("reset", f"{new.epoch}:1")
        assert json.loads(reset["data"]) == {"reason": "StreamReset", "epoch": new.epoch, "head": 1}
        assert (after["id"], json.loads(after["data"])["message"]) == (
            f"{new.epoch}:2",
            "after the reset",
        )
        for query, reason in [("?since=0", "HistoryTruncated"), ("?since=9", "OffsetOutOfRange")]:
            (message,) = await read_messages(base, path("trimmed", "/stream") + query, 1)
            assert message["id"] == f"{trimmed.epoch}:3"
            assert json.loads(message["data"])["reason"] == reason
        async with httpx.AsyncClient(base_url=base, headers=AUTH) as http:
            for query, headers in [
                ("?since=soon", {}),
                ("?since=2024-01-01T00:00", {}),
                ("?since=1&history=2", {}),
                ("", {"Last-Event-ID": "x:y"}),
                ("?since=9223372036854775808", {}),
            ]:
                # Like FastAPI's own validation of query parameters.
                response = await http.get(path("gone", "/stream") + query, headers=headers)
                assert response.status_code == 422, query
            response = await http.get(path("gone", "/stream"), headers={"Authorization": "no"})
            assert response.status_code == 401


# -- small holes ------------------------------------------------------------------------


async def test_control_characters_in_a_channel_path_are_400(client: httpx.AsyncClient) -> None:
    for raw in ("/channels/a%0Ab", "/channels/a%0Ab/events", "/channels/%00"):
        response = await client.get(raw)
        assert response.status_code == 400, raw
        assert "control character" in response.json()["detail"]


async def test_a_channel_path_that_is_not_utf8_is_400(
    broadcast: Broadcast, client: httpx.AsyncClient
) -> None:
    """Servers decode ``%FF`` to U+FFFD: every invalid spelling would be one channel."""
    for raw in ("/channels/a%FFb", "/channels/a%FEb/events", "/channels/%C3"):
        response = await client.get(raw)
        assert response.status_code == 400, raw
        assert "not valid UTF-8" in response.json()["detail"]
    await broadcast.publish("a\ufffdb", "x")  # U+FFFD itself, sent as such, is a name
    response = await client.get("/channels/a%EF%BF%BDb")
    assert (response.status_code, response.json()["name"]) == (200, "a\ufffdb")


async def test_a_token_that_headers_cannot_carry_is_refused(broadcast: Broadcast) -> None:
    for token in ("pässwort", "two words", "tab\there"):
        with pytest.raises(InvalidArgument, match="printable ASCII"):
            create_app(broadcast, token=token)


async def test_since_means_the_same_in_events_and_stream(
    broadcast: Broadcast, client: httpx.AsyncClient
) -> None:
    for i in range(5):
        await broadcast.publish("c", f"m{i}")
    page = (await client.get(path("c", "/events") + "?since=3")).json()
    assert [e["offset"] for e in page["events"]] == [4, 5]  # an offset, as in /stream
    first = page["events"][0]["timestamp"]
    page = (await client.get(path("c", "/events"), params={"since": first})).json()
    assert page["events"][0]["offset"] <= 4  # an ISO time: at or after
    # Paging keeps since as it was and puts next_cursor in after: both bound the page.
    for query in ("?since=3&after=1", "?since=1&after=3"):
        page = (await client.get(path("c", "/events") + query)).json()
        assert [e["offset"] for e in page["events"]] == [4, 5], query
    seen, after = [], None
    while True:
        params: dict[str, Any] = {"since": 1, "limit": 2, **({"after": after} if after else {})}
        page = (await client.get(path("c", "/events"), params=params)).json()
        seen += [e["offset"] for e in page["events"]]
        if (after := page["next_cursor"]) is None:
            break
    assert seen == [2, 3, 4, 5]
    for query in ("?since=soon", f"?since={2**64}", f"?after={2**63}"):
        assert (await client.get(path("c", "/events") + query)).status_code == 422, query


async def test_refused_parameters_are_shaped_as_the_schema_says(
    broadcast: Broadcast, client: httpx.AsyncClient
) -> None:
    """The library's own parsers answered 422 with a string detail, where the OpenAPI
    schema (and FastAPI's own validation) has a list of problems; 503 was undeclared."""
    await broadcast.publish("c", "x")
    cases = [
        (path("c", "/events") + "?since=soon", {}, ["query", "since"]),
        (path("c", "/events") + "?until=100", {}, ["query", "until"]),
        (path("c", "/stream") + "?since=soon", {}, ["query", "since"]),
        (path("c", "/stream"), {"Last-Event-ID": "x:y"}, ["header", "last-event-id"]),
    ]
    for url, headers, loc in cases:
        response = await client.get(url, headers=headers)
        assert response.status_code == 422, url
        [problem] = response.json()["detail"]
        assert problem["loc"] == loc and problem["msg"], (url, problem)
    schema = (await client.get("/openapi.json")).json()
    events = schema["paths"]["/channels/{channel}/events"]["get"]["responses"]
    assert events["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/HTTPValidationError"
    )
    assert "503" in events
