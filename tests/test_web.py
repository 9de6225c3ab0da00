"""The streaming app (``broadcast_history.web``) through real clients on a real server.

Server-Sent Events are read with httpx, WebSockets with the ``websockets`` client,
from uvicorn serving the app on a free port in this event loop. Every start position
form, every position that cannot be served (a reset, then live), every refusal.
Load, slow and killed clients: ``test_web_load.py``; browsers: ``test_web_browser.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from starlette.exceptions import HTTPException
from starlette.requests import Request
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import broadcast_history.web
from broadcast_history import Broadcast, Event, InvalidArgument
from broadcast_history.web import allow_all, create_stream_app
from broadcast_history.web._serving import StreamServer

Frames = list[dict[str, str]]


@pytest.fixture
async def broadcast(tmp_path: Path) -> AsyncIterator[Broadcast]:
    log = f"sqlite+aiosqlite:///{tmp_path / 'web.db'}"
    async with Broadcast("memory://", log=log, idle_check=0.2) as b:
        yield b


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """``app`` under uvicorn on a free port, in this event loop; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    async with running(server) as (port, _):
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def running(server: uvicorn.Server) -> AsyncIterator[tuple[int, asyncio.Task[None]]]:
    """``server`` on a free port, in this event loop; yields the port and the server's
    task (done once it stopped); stops it at the end if it still runs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1], task
    finally:
        server.should_exit = server.force_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@pytest.fixture
async def base(broadcast: Broadcast) -> AsyncIterator[str]:
    app = create_stream_app(broadcast, authorize=allow_all, publish=True, keepalive=0.3)
    async with serving(app) as url:
        yield url


async def sse(
    url: str,
    count: int,
    headers: dict[str, str] | None = None,
    then: Callable[[], Awaitable[Any]] | None = None,
) -> Frames:
    """The first ``count`` frames of a stream (comments skipped, ``retry`` included);
    ``then`` runs once the stream is open."""
    frames: Frames = []
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", url, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["x-accel-buffering"] == "no"
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = fields[name] + "\n" + value if name in fields else value
                continue
            if not fields:
                continue  # the end of a comment (a keepalive ping on a slow machine)
            frames.append(fields)
            fields = {}
            if len(frames) == 1 and then is not None:
                await then()
            if len(frames) == count:
                break
    return frames


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def ids(frames: Frames) -> list[str]:
    return [f.get("id", "") for f in frames]


async def seed(broadcast: Broadcast) -> list[Event]:
    return [
        await broadcast.publish("c", message)
        for message in ("one", "two\nlines\r\nthree", b"\x00bin", "four")
    ]


# -- Server-Sent Events ------------------------------------------------------------------


async def test_sse_frames_and_every_start_position(broadcast: Broadcast, base: str) -> None:
    events = await seed(broadcast)
    e = events[0].epoch
    url = f"{base}/c"
    frames = await sse(url, 4, {"Last-Event-ID": f"{e}:1"})
    start = {"epoch": e, "offset": 1}
    assert frames[0] == {"retry": "1000", "id": f"{e}:1", "event": "start", "data": dumps(start)}
    assert frames[1:] == [
        {"id": f"{e}:2", "event": "message", "data": "two\nlines\nthree"},
        {"id": f"{e}:3", "event": "binary", "data": "AGJpbg=="},
        {"id": f"{e}:4", "event": "message", "data": "four"},
    ]
    positions: list[tuple[str, dict[str, str]]] = [
        ("", {"Last-Event-ID": "2"}),  # a bare offset: any epoch
        (f"?last_event_id={e}:2", {}),  # what client.js sends on a fresh page
        (f"?last_event_id={e}:0", {"Last-Event-ID": f"{e}:2"}),  # the header wins
        ("?since=2", {}),
        (f"?since={quote(events[2].timestamp.isoformat())}", {}),  # at or after a time
        ("?history=2", {}),
    ]
    for query, headers in positions:
        assert ids(await sse(url + query, 3, headers)) == [f"{e}:2", f"{e}:3", f"{e}:4"], query

    async def publish_five() -> None:
        await broadcast.publish("c", "five")

    for query in ("", "?history=0"):  # live only: subscribed before the response starts
        frames = await sse(url + query, 2, then=publish_five)
        assert frames[1]["data"] == "five"
        assert frames[1]["id"] == f"{e}:{5 if query == '' else 6}"


async def test_a_client_that_saw_no_event_resumes_from_where_its_stream_started(
    broadcast: Broadcast, base: str
) -> None:
    """A stream started live on a quiet channel, the server restarted, an event was
    published meanwhile: the client had no id to resume from, so it asked for live
    again and never got that event (found by a probe, in the console's tail). The
    stream now opens with its start position's id."""
    await seed(broadcast)
    for query in ("", "?history=0"):
        (opening,) = await sse(f"{base}/c{query}", 1)
        missed = await broadcast.publish("c", "while away")
        (_, event) = await sse(f"{base}/c", 2, {"Last-Event-ID": opening["id"]})
        assert (event["id"], event["data"]) == (f"{missed.epoch}:{missed.offset}", "while away")
    # A channel with no history yet starts at "0": from its first event.
    (opening,) = await sse(f"{base}/quiet", 1)
    assert (opening["id"], json.loads(opening["data"])) == ("0", {"epoch": None, "offset": 0})
    first = await broadcast.publish("quiet", "first")
    (_, event) = await sse(f"{base}/quiet", 2, {"Last-Event-ID": opening["id"]})
    assert event["id"] == f"{first.epoch}:1"
    # A start that is reset says where it goes on in the reset, and opens without one.
    frames = await sse(f"{base}/c?since=99", 2)
    assert frames[0] == {"retry": "1000"} and frames[1]["event"] == "reset"
    # So does a time later than the newest event: resuming after the head would
    # deliver what is stamped before that time (found by a review).
    later = quote((datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat())
    (opening,) = await sse(f"{base}/c?since={later}", 1)
    assert opening == {"retry": "1000"}


async def test_sse_positions_that_cannot_be_served_reset_then_go_on(
    broadcast: Broadcast, base: str
) -> None:
    old = await broadcast.publish("gone", "x")
    await broadcast.log.delete_channel("gone")
    for _ in range(3):
        trimmed = await broadcast.publish("trimmed", "x")
    await broadcast.log.trim("trimmed", before=3)
    e = trimmed.epoch
    cases = [
        ("gone", {"Last-Event-ID": f"{old.epoch}:1"}, "StreamReset", None, 0),
        ("trimmed", {"Last-Event-ID": f"{e + 1}:1"}, "StreamReset", e, 3),
        ("trimmed", {"Last-Event-ID": f"{e}:1"}, "HistoryTruncated", e, 3),
        ("trimmed", {"Last-Event-ID": "0"}, "HistoryTruncated", e, 3),
        ("trimmed", {"Last-Event-ID": f"{e}:99"}, "OffsetOutOfRange", e, 3),
    ]
    for channel, headers, reason, epoch, head in cases:
        (_, reset) = await sse(f"{base}/{channel}", 2, headers)
        assert reset["event"] == "reset"
        assert reset["id"] == ("0" if epoch is None else f"{epoch}:{head}")
        assert json.loads(reset["data"]) == {"reason": reason, "epoch": epoch, "head": head}

    # Then live from the head: the next event is the one published next.
    async def publish() -> None:
        await broadcast.publish("trimmed", "after")

    frames = await sse(f"{base}/trimmed?since=99", 3, then=publish)
    assert [f.get("event") for f in frames] == [None, "reset", "message"]
    assert (frames[2]["id"], frames[2]["data"]) == (f"{e}:4", "after")


async def test_sse_a_channel_reset_under_a_stream_is_said(broadcast: Broadcast, base: str) -> None:
    first = await broadcast.publish("c", "old epoch")

    async def recreate() -> None:
        await broadcast.log.delete_channel("c")
        await broadcast.publish("c", "new epoch 1")
        await asyncio.sleep(0.5)  # the reset is noticed (live, or by the idle check)
        await broadcast.publish("c", "new epoch 2")

    frames = await sse(f"{base}/c", 3, {"Last-Event-ID": f"{first.epoch}:1"}, then=recreate)
    reset, message = frames[1], frames[2]
    info = await broadcast.log.channel("c")
    assert info is not None and info.epoch != first.epoch
    assert reset["event"] == "reset"
    assert json.loads(reset["data"])["reason"] == "StreamReset"
    assert (message["id"], message["data"]) == (f"{info.epoch}:2", "new epoch 2")


async def test_sse_refusals(broadcast: Broadcast) -> None:
    async def only_public(connection: Any, channel: str, action: str) -> bool:
        assert isinstance(connection, Request)
        return channel.startswith("public/")

    app = create_stream_app(broadcast, authorize=only_public)
    async with serving(app) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/private/x")).status_code == 403
        # /public/a%0A was channel "public/a": a route's $ matches before a final \n.
        for path in ("/a%01b", "/" + "x" * 256, "/", "/public/a%FFb", "/public/a%0A"):
            assert (await http.get(path)).status_code == 400, path
        answer = await http.get("/public/a%FEb")
        assert "not valid UTF-8" in answer.json()["detail"]
        for query, headers in [
            ("?since=soon", {}),
            ("?since=2024-01-01T00:00", {}),  # no timezone
            ("?since=1&history=2", {}),
            ("?history=-1", {}),
            ("", {"Last-Event-ID": "x:y"}),
            (f"?since={2**63}", {}),
            (f"?last_event_id={2**63}:1", {}),
        ]:
            response = await http.get("/public/x" + query, headers=headers)
            assert response.status_code == 422, query
            assert response.json()["detail"]
        negative = await http.get("/public/x?since=-1")
        assert negative.status_code == 422
        assert negative.json()["detail"].startswith("since must be an offset from 0 to")
        head = await http.head("/public/x")
        assert (head.status_code, head.content) == (200, b"")
        # Publishing is off unless asked for.
        assert (await http.post("/public/x", content=b"x")).status_code == 405


async def test_sse_replay_goes_out_in_chunks_of_bounded_size(broadcast: Broadcast) -> None:
    """Replayed events in hand went out up to 64 frames in one chunk, whatever their
    size: a client reading slowly held that chunk built, and its copy in the
    transport, besides the pages (three times its budget with 1 MiB messages)."""
    for _ in range(6):
        await broadcast.publish("big", "x" * 100_000)
    for i in range(40):
        await broadcast.publish("big", f"small {i}")
    app = create_stream_app(broadcast, authorize=allow_all)
    chunks: list[bytes] = []
    done = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if b"small 39\n" in chunks[-1]:
                done.set()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/big",
        "raw_path": b"/big",
        "root_path": "",
        "query_string": b"since=0",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    serving = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    frames = [chunk.count(b"\nevent: ") for chunk in chunks]
    assert sum(frames) == 47  # the start, then 46 events
    assert all(len(c) <= 64 * 1024 for c, n in zip(chunks, frames, strict=True) if n > 1)


async def test_sse_keepalive_pings_idle_streams(broadcast: Broadcast, base: str) -> None:
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", f"{base}/idle") as response,
    ):
        lines = response.aiter_lines()
        opening = ["retry: 1000", "id: 0", "event: start", 'data: {"epoch":null,"offset":0}', ""]
        assert [await anext(lines) for _ in range(7)] == [*opening, ": ping", ""]


# -- publishing over HTTP ----------------------------------------------------------------


async def test_post_publishes_by_content_type(broadcast: Broadcast, base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        answers = [
            await http.post("/p", content="héllo", headers={"content-type": "text/plain"}),
            await http.post("/p", json={"a": [1]}),
            await http.post("/p", content=b"\x00\xff"),
            await http.post(
                "/p",
                content="é".encode("latin-1"),
                headers={"content-type": "text/x; charset=latin-1"},
            ),
        ]
        assert [a.status_code for a in answers] == [201] * 4
        # Charsets whose codec fails with a bare UnicodeError (not a decode error), and
        # Python codecs that are no text encoding of the web (punycode's decoder is
        # quadratic: a megabyte held the event loop for most of a minute).
        for charset in ("undefined", "bogus", "hex", "punycode", "unicode_escape", "idna"):
            refused = await http.post(
                "/p", content=b"x", headers={"content-type": f"text/plain; charset={charset}"}
            )
            assert refused.status_code == 400, (charset, refused.text)
        body = answers[0].json()
        assert set(body) == {"id", "channel", "offset", "epoch", "timestamp"}
        assert (body["id"], body["channel"]) == (f"{body['epoch']}:1", "p")
        stored = [e.message for e in await broadcast.log.read("p", after=0)]
        assert stored == ["héllo", '{"a":[1]}', b"\x00\xff", "é"]

        keyed = [
            await http.post("/p", content=b"once", headers={"Idempotency-Key": "order-17"})
            for _ in range(2)
        ]
        assert keyed[0].json() == keyed[1].json()
        assert keyed[0].json()["offset"] == 5

        too_big = b"x" * (broadcast.max_message_size + 1)
        assert (await http.post("/p", content=too_big)).status_code == 413
        # A compressed body was stored as its compressed bytes (or refused as bad text).
        for coding in ("gzip", "br", "identity, gzip"):
            gzipped = gzip.compress(b"text")
            compressed = await http.post(
                "/p", content=gzipped, headers={"content-encoding": coding}
            )
            assert compressed.status_code == 415, (coding, compressed.text)
        plain = await http.post("/p", content=b"x", headers={"content-encoding": "identity"})
        assert plain.status_code == 201
        for path, content, headers in [
            ("/a%01b", b"x", {}),
            ("/a%FFb", b"x", {}),  # servers decode it to U+FFFD: refused, not renamed
            ("/" + "x" * 256, b"x", {}),
            ("/p", b"x", {"Idempotency-Key": "k" * 256}),
            ("/p", b"\xff", {"content-type": "text/plain"}),
            ("/p", b"x", {"content-type": "text/plain; charset=nonesuch"}),
        ]:
            response = await http.post(path, content=content, headers=headers)
            assert response.status_code == 400, (path, headers)
        assert (await broadcast.log.channel("p")).last_offset == 6  # type: ignore[union-attr]
        assert await broadcast.log.channel("a\ufffdb") is None
        # A key sent as UTF-8 is the same key as in Python (not its Latin-1 reading).
        direct = await broadcast.publish("p", "direct", key="clé")
        again = await http.post("/p", content=b"x", headers={"Idempotency-Key": "clé".encode()})
        assert again.json()["offset"] == direct.offset


async def test_publish_is_authorized_per_message(broadcast: Broadcast) -> None:
    calls: list[tuple[str, str, str]] = []

    def read_only(connection: Any, channel: str, action: str) -> bool:  # a plain function
        calls.append((type(connection).__name__, channel, action))
        return action == "subscribe"

    app = create_stream_app(broadcast, authorize=read_only, publish=True)
    async with serving(app) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.post("/c", content=b"x")).status_code == 403
        ws_url = base.replace("http", "ws") + "/c/ws"
        async with ws_stream(ws_url) as ws:
            await ws.send(json.dumps({"type": "publish", "data": "x"}))
            assert json.loads(await ws.recv()) == {
                "type": "error",
                "detail": "not allowed to publish on this channel",
            }
    assert calls == [
        ("Request", "c", "publish"),
        ("WebSocket", "c", "subscribe"),
        ("WebSocket", "c", "publish"),
    ]
    assert await broadcast.log.channel("c") is None


async def test_authorize_is_required_and_checked(broadcast: Broadcast) -> None:
    with pytest.raises(TypeError):
        create_stream_app(broadcast)  # type: ignore[call-arg]
    with pytest.raises(InvalidArgument, match="allow_all"):
        create_stream_app(broadcast, authorize=None)  # type: ignore[arg-type]
    for keepalive in (0, -1, True, "15", 1e-9, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="keepalive"):
            create_stream_app(broadcast, authorize=allow_all, keepalive=keepalive)  # type: ignore[arg-type]
    assert broadcast_history.web.__all__ == [
        "Action",
        "Authorize",
        "Feed",
        "Position",
        "Reset",
        "allow_all",
        "create_stream_app",
    ]


async def test_recheck_ends_streams_authorize_no_longer_allows(broadcast: Broadcast) -> None:
    """authorize was asked once, when a stream opened: a user revoked (or whose token
    expired) went on receiving for as long as the connection lasted."""
    revoked: dict[str, str] = {}  # token -> how it is refused
    calls: list[str] = []

    async def by_token(connection: Any, channel: str, action: str) -> bool:
        token = connection.query_params["token"]
        calls.append(token)
        if revoked.get(token) == "expired":
            raise HTTPException(401, "token expired")
        if revoked.get(token) == "failing":
            raise RuntimeError("the session store is down")
        return token not in revoked

    app = create_stream_app(broadcast, authorize=by_token, recheck=0.1, keepalive=5)
    async with serving(app) as base:
        http_streams = [
            asyncio.create_task(sse(f"{base}/c?token={token}", 10)) for token in ("a", "b", "c")
        ]
        ws_url = base.replace("http", "ws") + "/c/ws?token="
        async with ws_stream(ws_url + "d") as ws_d, ws_stream(ws_url + "e") as ws_e:
            await wait_for_subscriptions(broadcast, 5)
            await broadcast.publish("c", "before")
            revoked.update(a="revoked", b="expired", d="revoked")
            done, _ = await asyncio.wait(http_streams[:2], timeout=5)
            assert len(done) == 2
            for task, detail in zip(
                http_streams, ("not allowed to subscribe on this channel", "token expired")
            ):
                frames = task.result()  # the stream ended: fewer frames than asked
                assert len(frames) < 10  # ("before" may come first, or not: a tick's race)
                assert frames[-1] == {"event": "refused", "data": dumps({"detail": detail})}
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    assert json.loads(await asyncio.wait_for(ws_d.recv(), 5))["type"] != "reset"
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1008,
                "not allowed to subscribe on this channel",
            )
            # authorize failing: the stream is not kept on trust (1011, as on a publish).
            async with ws_stream(ws_url + "f") as ws_f:
                revoked["f"] = "failing"
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws_f.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
            await broadcast.publish("c", "after")
            # The others go on, asked again and again.
            assert not http_streams[2].done()
            while (frame := json.loads(await asyncio.wait_for(ws_e.recv(), 5)))[
                "type"
            ] != "message" or frame["data"] != "after":
                pass
            count = calls.count("c")
            await asyncio.sleep(0.35)
            assert calls.count("c") >= count + 2
        http_streams[2].cancel()
        await asyncio.gather(http_streams[2], return_exceptions=True)
    for value in (0, -1, True, "60", float("inf")):
        with pytest.raises(InvalidArgument, match="recheck"):
            create_stream_app(broadcast, authorize=allow_all, recheck=value)  # type: ignore[arg-type]


async def refused_during_publish(
    broadcast: Broadcast, on_publish: Callable[[], Awaitable[object]], data: str
) -> tuple[list[dict[str, Any]], int]:
    """A WebSocket client publishes ``data``; authorize, asked for that publish, runs
    ``on_publish`` while the recheck (every 50 ms) refuses the stream. Returns the
    frames the client got and the code its socket closed with."""
    refused = False

    async def authorize(connection: Any, channel: str, action: str) -> bool:
        nonlocal refused
        if action == "publish":
            refused = True
            await on_publish()
            return True
        return not refused

    app = create_stream_app(broadcast, authorize=authorize, publish=True, recheck=0.05)
    frames: list[dict[str, Any]] = []
    async with serving(app) as base:
        async with ws_stream(base.replace("http", "ws") + "/c/ws") as ws:
            await ws.send(json.dumps({"type": "publish", "data": data}))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert closed.value.rcvd is not None
    return frames, closed.value.rcvd.code


async def test_a_publish_under_way_when_authorize_refuses_is_answered_first(
    broadcast: Broadcast,
) -> None:
    """A WebSocket refused by the recheck while a publish of its client was under way
    had that publish cancelled: stored or not, never acknowledged (a client retrying
    without a key stores it twice)."""
    # A few recheck ticks while the publish is under way.
    frames, code = await refused_during_publish(broadcast, lambda: asyncio.sleep(0.5), "m")
    assert [(f["type"], f.get("offset")) for f in frames] == [("ack", 1)] and code == 1008
    assert [e.message for e in await broadcast.log.read("c", after=0)] == ["m"]


async def test_a_publish_that_hangs_when_authorize_refuses_is_given_up(
    broadcast: Broadcast, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish under way is answered before a refused socket closes; authorize
    hanging on that publish kept the socket open for as long as it hung."""
    from broadcast_history.web import _ws

    monkeypatch.setattr(_ws, "ANSWER_WAIT", 0.3)
    # Its session store never answers.
    frames, code = await refused_during_publish(broadcast, asyncio.Event().wait, "m")
    assert frames == [] and code == 1008
    assert [r for r in caplog.records if "still unanswered" in r.getMessage()]
    assert await broadcast.log.read("c", after=0) == []


@pytest.mark.parametrize("failure", [LookupError, TimeoutError])
async def test_a_publish_that_fails_as_authorize_refuses_is_logged(
    broadcast: Broadcast, caplog: pytest.LogCaptureFixture, failure: type[Exception]
) -> None:
    """authorize raising on a publish frame while the recheck refused the stream: the
    socket closed with 1008 and the publish's failure was told nowhere (a TimeoutError,
    an OSError, was taken for the client leaving even after that was fixed)."""

    async def failing() -> None:
        await asyncio.sleep(0.5)  # the recheck refuses meanwhile
        raise failure("session store: no such session")

    frames, code = await refused_during_publish(broadcast, failing, "m")
    assert frames == [] and code == 1008
    told = [r.getMessage() for r in caplog.records if failure.__name__ in r.getMessage()]
    assert len(told) == 1 and "ended on authorize's recheck" in told[0]
    assert await broadcast.log.read("c", after=0) == []


async def test_recheck_that_cannot_tell_ends_streams_without_refusing_them(
    broadcast: Broadcast,
) -> None:
    """authorize's HTTPException 503 (its session store away) on a recheck refused the
    stream for good, as a 403 does: client.js gave up on the user."""
    down = False

    async def store(connection: Any, channel: str, action: str) -> bool:
        if down:
            raise HTTPException(503, "session store unavailable")
        return True

    app = create_stream_app(broadcast, authorize=store, recheck=0.05, keepalive=5)
    async with serving(app) as base:
        streaming = asyncio.create_task(sse(f"{base}/c", 10))
        async with ws_stream(base.replace("http", "ws") + "/c/ws") as ws:
            await wait_for_subscriptions(broadcast, 2)
            down = True
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1013,
                "session store unavailable",
            )
        frames = await asyncio.wait_for(streaming, 5)  # the body ended
        assert all(frame.get("event") != "refused" for frame in frames)


# -- WebSocket ---------------------------------------------------------------------------


async def test_an_oserror_of_authorize_on_a_recheck_is_said_and_ends_the_body(
    broadcast: Broadcast, caplog: pytest.LogCaptureFixture
) -> None:
    """authorize raising an OSError on a recheck (its session store refusing
    connections) was taken for the client leaving: nothing was logged, and the body
    was cut off mid-chunk."""
    down = False

    async def store(connection: Any, channel: str, action: str) -> bool:
        if down:
            raise ConnectionRefusedError(111, "session store: connection refused")
        return True

    app = create_stream_app(broadcast, authorize=store, recheck=0.05, keepalive=5)
    async with serving(app) as base, httpx.AsyncClient(timeout=10) as http:
        with caplog.at_level("WARNING"):
            async with http.stream("GET", f"{base}/c") as response:
                await wait_for_subscriptions(broadcast, 1)
                down = True
                async for _ in response.aiter_bytes():  # the body ends cleanly
                    pass
    assert "authorize failed" in caplog.text and "session store" in caplog.text


async def test_a_send_uvicorn_refuses_once_the_client_left_is_no_error(
    broadcast: Broadcast, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn answers a send to a client that has just left with "RuntimeError:
    Unexpected ASGI message 'websocket.send', after sending 'websocket.close'": the
    stream took it for a failure of its own, closed with 1011 and raised it, and
    uvicorn logged an ERROR with its traceback for a client that merely went away."""
    app = create_stream_app(broadcast, authorize=allow_all)

    async def client_leaves_after_the_start(scope: Any, receive: Any, send: Any) -> None:
        sent = 0

        async def send_until_gone(message: dict[str, Any]) -> None:
            nonlocal sent
            if message["type"] == "websocket.send":
                sent += 1
                if sent > 1:  # what uvicorn's websockets implementation raises
                    raise RuntimeError(
                        "Unexpected ASGI message 'websocket.send', after sending "
                        "'websocket.close' or response already completed."
                    )
            await send(message)

        await app(scope, receive, send_until_gone)

    await broadcast.publish("c", "one")
    async with serving(client_leaves_after_the_start) as base:
        with caplog.at_level("WARNING"):
            async with ws_connect(base.replace("http", "ws") + "/c/ws?history=1") as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "start"
                await asyncio.sleep(0.3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@contextlib.asynccontextmanager
async def ws_stream(url: str) -> AsyncIterator[ClientConnection]:
    """A WebSocket stream, past the frame that says where it starts."""
    async with ws_connect(url) as ws:
        start = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert start["type"] == "start", start
        yield ws


async def ws_frames(url: str, count: int) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with ws_connect(url) as ws:
        while len(frames) < count:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] != "ping":
                frames.append(frame)
    return frames


async def test_ws_frames_and_every_start_position(broadcast: Broadcast, base: str) -> None:
    events = await seed(broadcast)
    e = events[0].epoch
    url = base.replace("http", "ws") + "/c/ws"
    frames = await ws_frames(url + f"?last_event_id={e}:1", 4)
    assert frames.pop(0) == {"type": "start", "id": f"{e}:1", "epoch": e, "offset": 1}
    assert frames[0] == {
        "type": "message",
        "id": f"{e}:2",
        "channel": "c",
        "offset": 2,
        "epoch": e,
        "timestamp": events[1].timestamp.isoformat(),  # type: ignore[union-attr]
        "data": "two\nlines\r\nthree",  # exact: JSON carries any text
        "encoding": "text",
    }
    assert (frames[1]["data"], frames[1]["encoding"]) == ("AGJpbg==", "base64")
    stamp = quote(events[2].timestamp.isoformat())  # type: ignore[union-attr]
    for query in ("?last_event_id=2", "?since=2", f"?since={stamp}", "?history=2"):
        got = [f["id"] for f in await ws_frames(url + query, 3)]
        assert got == [f"{e}:2", f"{e}:3", f"{e}:4"], query

    async with ws_stream(url) as ws:  # live only: subscribed before the handshake ends
        await broadcast.publish("c", "five")
        frame = json.loads(await ws.recv())
        assert (frame["type"], frame["offset"], frame["data"]) == ("message", 5, "five")


async def test_ws_resets_then_live(broadcast: Broadcast, base: str) -> None:
    for _ in range(3):
        last = await broadcast.publish("t", "x")
    await broadcast.log.trim("t", before=3)
    e = last.epoch
    url = base.replace("http", "ws") + "/t/ws"
    head = 3
    for query, reason in [
        (f"?last_event_id={e + 1}:1", "StreamReset"),
        ("?since=0", "HistoryTruncated"),
        ("?since=99", "OffsetOutOfRange"),
    ]:
        async with ws_connect(url + query) as ws:
            reset = json.loads(await ws.recv())
            assert reset == {
                "type": "reset",
                "id": f"{e}:{head}",
                "channel": "t",
                "reason": reason,
                "epoch": e,
                "head": head,
                "detail": reset["detail"],
            }
            await broadcast.publish("t", "next")
            head += 1
            frame = json.loads(await ws.recv())
            assert (frame["type"], frame["id"]) == ("message", f"{e}:{head}")


async def test_ws_publish_ack_errors_and_pings(broadcast: Broadcast, base: str) -> None:
    url = base.replace("http", "ws") + "/w/ws"
    async with ws_stream(url) as ws:

        async def answer(frame: Any) -> dict[str, Any]:
            await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
            while True:  # our own publishes come back as messages too
                got: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if got["type"] in ("ack", "error"):
                    return got

        ack = await answer({"type": "publish", "data": "hi", "key": "k1"})
        assert (ack["type"], ack["offset"], ack["id"]) == ("ack", 1, f"{ack['epoch']}:1")
        assert (await answer({"type": "publish", "data": "hi", "key": "k1"}))["offset"] == 1
        ack = await answer({"type": "publish", "data": "AAE=", "encoding": "base64"})
        assert ack["offset"] == 2
        for bad in [
            "not json",
            "[" * 5000 + "]" * 5000,  # deeper than the JSON parser goes
            {"type": "subscribe"},
            {"type": "publish", "data": 5},
            {"type": "publish", "data": "%%", "encoding": "base64"},
            {"type": "publish", "data": "x", "encoding": "utf-16"},
            {"type": "publish", "data": "x", "key": ""},
            {"type": "publish", "data": "x" * (broadcast.max_message_size + 1)},
        ]:
            error = await answer(bad)
            assert error["type"] == "error" and error["detail"], bad
        await ws.send(b"\x00binary frame")
        while (frame := json.loads(await ws.recv()))["type"] == "message":
            pass
        assert frame == {"type": "error", "detail": "send JSON text frames"}
        pings = 0
        while pings < 2:  # idle: a ping every keepalive (0.3 s)
            pings += json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "ping"
    assert [e.message for e in await broadcast.log.read("w", after=0)] == ["hi", b"\x00\x01"]


async def test_ws_publish_takes_any_message_under_the_size_limit_however_escaped(
    tmp_path: Path,
) -> None:
    """A JSON encoder may write a character as six (``\\u00e9`` for é): a message the size
    limit allows is taken however its frame escapes it, as ``POST`` takes it."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'ws.db'}"
    async with Broadcast("memory://", log=log, max_message_size=10_000) as b:
        app = create_stream_app(b, authorize=allow_all, publish=True)
        async with serving(app) as url, ws_stream(url.replace("http", "ws") + "/e/ws") as ws:
            answers = []
            for data in ["\u00e9" * 5_000, "\x01" * 10_000, "\u00e9" * 5_000 + "x"]:
                await ws.send(json.dumps({"type": "publish", "data": data}))  # ensure_ascii
                while (got := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] not in (
                    "ack",
                    "error",
                ):
                    pass
                answers.append(got)
        assert [a["type"] for a in answers] == ["ack", "ack", "error"]
        assert "larger than 10000 bytes" in answers[2]["detail"]
        assert [len(e.message) for e in await b.log.read("e", after=0)] == [5_000, 10_000]


async def test_ws_refusals_close_with_codes(broadcast: Broadcast) -> None:
    async def only_public(connection: Any, channel: str, action: str) -> bool:
        return channel.startswith("public/")

    app = create_stream_app(broadcast, authorize=only_public)
    async with serving(app) as base:
        url = base.replace("http", "ws")
        for path, code in [
            ("/private/x/ws", 1008),
            ("/public/x/ws?since=soon", 4400),
            ("/public/x/ws?since=1&history=1", 4400),
            ("/a%01b/ws", 4400),
            ("/public/a%FFb/ws", 4400),
            ("/public/a/ws%0A", 4400),
        ]:
            async with ws_connect(url + path) as ws:
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert error["type"] == "error"
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code, path
        async with ws_stream(url + "/public/x/ws") as ws:
            await ws.send(json.dumps({"type": "publish", "data": "x"}))
            assert "not enabled" in json.loads(await ws.recv())["detail"]


async def test_ws_an_http_exception_of_authorize_is_a_refusal_or_a_try_later(
    broadcast: Broadcast,
) -> None:
    """An HTTPException of authorize at a WebSocket's door was left to Starlette, which
    denied the handshake (1006 in a browser: client.js tried again for ever); on a
    publish frame it closed the socket with 1011. Now as on a recheck: 401 and 403
    refuse (1008, an error frame for a publish), another status says try later (1013)
    (found by a review)."""
    from starlette.exceptions import HTTPException

    async def by_token(connection: Any, channel: str, action: str) -> bool:
        token = connection.query_params.get("token")
        if token == "down":
            raise HTTPException(503, "the authorization service is down")
        if token in ("gone", "busy"):
            raise HTTPException(404 if token == "gone" else 429, token)
        if token != "ok" or (action == "publish" and channel == "read-only"):
            raise HTTPException(401, "token expired")
        return True

    app = create_stream_app(broadcast, authorize=by_token, publish=True)
    async with serving(app) as base:
        url = base.replace("http", "ws")
        for token, code in [("old", 1008), ("gone", 1008), ("down", 1013), ("busy", 1013)]:
            async with ws_connect(f"{url}/c/ws?token={token}") as ws:
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert error["type"] == "error" and closed.value.rcvd is not None
            assert closed.value.rcvd.code == code, token
        async with ws_stream(f"{url}/read-only/ws?token=ok") as ws:
            await ws.send(json.dumps({"type": "publish", "data": "x"}))
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert answer == {"type": "error", "detail": "token expired"}
            await ws.send(json.dumps({"type": "publish", "data": "y"}))  # still open
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "error"


async def test_stream_headers_and_heartbeat_checked(broadcast: Broadcast, base: str) -> None:
    """Compression layers that honour only no-transform buffered the stream; the admin
    app took any heartbeat, and 0 pinged in a tight loop (found by a review)."""
    from broadcast_history.admin import create_app

    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", base + "/c") as response:
            assert "no-transform" in response.headers["cache-control"]
    for heartbeat in (0, -1, None, float("inf")):
        with pytest.raises(InvalidArgument, match="heartbeat"):
            create_app(broadcast, allow_no_token=True, heartbeat=heartbeat)  # type: ignore[arg-type]


async def test_a_log_outage_tells_clients_nothing_of_the_database(
    broadcast: Broadcast, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error's text (the database's host, user, the driver's complaint) went to
    the public in the 503 body, the WebSocket close reason and the publish frame's
    error; it goes to the server's log."""
    from broadcast_history import LogUnavailable
    from broadcast_history.web import _unavailable

    secret = "event log failure: password authentication failed for user app at 10.9.8.7"

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise LogUnavailable(secret)

    monkeypatch.setattr(_unavailable._refusals, "_last", -_unavailable.LOG_EVERY)
    caplog.set_level(logging.WARNING, logger="broadcast_history")
    app = create_stream_app(broadcast, authorize=allow_all, publish=True)
    async with serving(app) as base, httpx.AsyncClient(timeout=10) as http:
        async with ws_stream(base.replace("http", "ws") + "/c/ws") as ws:
            monkeypatch.setattr(broadcast, "publish", down)
            await ws.send(json.dumps({"type": "publish", "data": "x"}))
            frame = json.loads(await ws.recv())
        assert frame["type"] == "error" and "10.9.8.7" not in frame["detail"]
        posted = await http.post(base + "/c", content=b"x")
        monkeypatch.setattr(broadcast.log, "channel", down)
        streamed = await http.get(base + "/c")
        async with ws_connect(base.replace("http", "ws") + "/c/ws") as ws:
            said = await ws.recv()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    for response in (posted, streamed):
        assert response.status_code == 503
        assert "unavailable" in response.json()["detail"] and "10.9.8.7" not in response.text
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    assert "10.9.8.7" not in str(said) + closed.value.rcvd.reason
    logged = [r.getMessage() for r in caplog.records if "10.9.8.7" in r.getMessage()]
    assert len(logged) == 1  # once: an outage is not a log flood


@pytest.mark.parametrize("failure", [RuntimeError, TimeoutError, ConnectionRefusedError])
async def test_ws_an_authorize_that_fails_on_a_publish_frame_closes_with_1011(
    broadcast: Broadcast, failure: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    """The connection was dropped without a close frame (the client saw 1006); then
    an OSError (TimeoutError, ConnectionRefusedError) still was, and logged nowhere:
    taken for the client leaving."""

    async def broken_for_publish(connection: Any, channel: str, action: str) -> bool:
        if action == "publish":
            raise failure("authorization service down")
        return True

    app = create_stream_app(broadcast, authorize=broken_for_publish, publish=True)
    async with serving(app) as base:
        async with ws_stream(base.replace("http", "ws") + "/c/ws") as ws:
            await ws.send(json.dumps({"type": "publish", "data": "x"}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert [r for r in caplog.records if "authorization service down" in r.getMessage()]


# -- lifetimes ---------------------------------------------------------------------------


def live_subscriptions(broadcast: Broadcast) -> int:
    return sum(len(group) for group in broadcast._subscribers.values())


async def wait_for_subscriptions(broadcast: Broadcast, count: int) -> None:
    for _ in range(200):
        if live_subscriptions(broadcast) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{live_subscriptions(broadcast)} subscriptions, expected {count}")


async def test_a_disconnect_ends_the_subscription_at_once(broadcast: Broadcast, base: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(3):
            async with http.stream("GET", f"{base}/c") as response:
                await anext(response.aiter_lines())
                assert live_subscriptions(broadcast) == 1
            await wait_for_subscriptions(broadcast, 0)  # within 2 s, keepalive or not
    async with ws_connect(base.replace("http", "ws") + "/c/ws"):
        assert live_subscriptions(broadcast) == 1
    await wait_for_subscriptions(broadcast, 0)


async def test_close_streams_ends_every_stream(broadcast: Broadcast) -> None:
    app = create_stream_app(broadcast, authorize=allow_all)
    async with serving(app) as base, httpx.AsyncClient(timeout=10) as http:
        async with (
            http.stream("GET", f"{base}/c") as response,
            ws_stream(base.replace("http", "ws") + "/c/ws") as ws,
        ):
            lines = response.aiter_lines()
            opening = [await anext(lines) for _ in range(4)]
            assert opening[:3] == ["retry: 1000", "id: 0", "event: start"]
            await wait_for_subscriptions(broadcast, 2)
            app.state.close_streams()
            assert [line async for line in lines] == [""]  # the body ends
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    await wait_for_subscriptions(broadcast, 0)


def _upgrade(path: str) -> bytes:
    """A WebSocket handshake request for ``path``."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _stuck_client(
    base: str, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sent ``request`` and reads little more: the server's writes
    to it back up once a few hundred kB are on their way."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request)
    return reader, writer


async def test_close_streams_ends_streams_whose_clients_stopped_reading(
    broadcast: Broadcast,
) -> None:
    """A stream blocked writing to a client that reads nothing never saw the stop:
    its last write (the end of the body, the 1001 close) waited for the client, so
    the subscription stayed and the server never exited."""
    app = create_stream_app(broadcast, authorize=allow_all, keepalive=0.2)
    async with serving(app) as base:
        clients = [
            await _stuck_client(base, b"GET /stop HTTP/1.1\r\nHost: x\r\n\r\n"),
            await _stuck_client(base, _upgrade("/stop/ws")),
        ]
        try:
            await wait_for_subscriptions(broadcast, 2)
            for _ in range(80):
                await broadcast.publish("stop", "x" * 100_000)
            await asyncio.sleep(0.5)  # past a keepalive: the pings wait behind the writes
            app.state.close_streams()
            await wait_for_subscriptions(broadcast, 0)
        finally:
            for _, writer in clients:
                writer.transport.abort()


def _slow_appends(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.5
) -> None:
    """Every append of ``broadcast``'s log takes ``seconds`` more."""
    append = broadcast.log.append

    async def slow(items: Any) -> Any:
        await asyncio.sleep(seconds)
        return await append(items)

    monkeypatch.setattr(broadcast.log, "append", slow)


async def test_a_websocket_publish_in_flight_at_stop_is_acknowledged(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close_streams() cancelled the answer to a publish frame under way: the message
    was stored and never acknowledged, and a client without a key sent it again."""
    app = create_stream_app(broadcast, authorize=allow_all, publish=True)
    _slow_appends(broadcast, monkeypatch)
    async with serving(app) as base, ws_stream(base.replace("http", "ws") + "/c/ws") as ws:
        await wait_for_subscriptions(broadcast, 1)
        await ws.send(json.dumps({"type": "publish", "data": "m"}))
        await asyncio.sleep(0.1)  # the publish is under way
        app.state.close_streams()
        frames = [json.loads(frame) async for frame in ws]
        assert "ack" in [frame["type"] for frame in frames]


async def test_a_websocket_publish_in_flight_at_shutdown_is_acknowledged(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's shutdown closed every WebSocket with 1012 at once: a publish frame
    under way was stored and never acknowledged (the stop signal reached the session
    only once its publish was done, after the socket was gone)."""
    app = create_stream_app(broadcast, authorize=allow_all, publish=True)
    _slow_appends(broadcast, monkeypatch)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=3)
    server = StreamServer(config)
    async with running(server) as (port, task):
        async with ws_stream(f"ws://127.0.0.1:{port}/c/ws") as ws:
            await wait_for_subscriptions(broadcast, 1)
            await ws.send(json.dumps({"type": "publish", "data": "m"}))
            await asyncio.sleep(0.1)  # the publish is under way
            server.should_exit = True  # what SIGTERM does
            frames = [json.loads(frame) async for frame in ws]
            assert "ack" in [frame["type"] for frame in frames]
            assert ws.close_code == 1001
        await asyncio.wait_for(task, 10)
    assert [event.message for event in await broadcast.log.read("c")] == ["m"]


async def test_an_app_serves_streams_again_after_close_streams(broadcast: Broadcast) -> None:
    """close_streams() ends the open streams, not the app: served again (another
    TestClient, another server in the same process), its streams stay open (a review
    caught a version where every later stream ended at once)."""
    app = create_stream_app(broadcast, authorize=allow_all)
    async with serving(app) as base:
        app.state.close_streams()
        assert await app.state.finish_streams(1)
        async with ws_stream(base.replace("http", "ws") + "/c/ws") as ws:
            await wait_for_subscriptions(broadcast, 1)
            await broadcast.publish("c", "still open")
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert frame["data"] == "still open"


@pytest.mark.parametrize("kind", ["sse", "ws", "admin", "demo"])
async def test_a_stream_still_subscribing_when_the_server_stops_ends_too(
    kind: str,
    broadcast: Broadcast,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request still subscribing when the server's streams had finished (clients
    reconnecting as it stopped) streamed on until uvicorn's graceful timeout cut it,
    logged as an error: hundreds in a black-box probe. It ends with the others, on
    the stream app (SSE, WebSocket), the admin app and the demo's mounted streams."""
    if kind == "admin":
        from broadcast_history.admin import create_app as admin_app

        app, path = admin_app(broadcast, allow_no_token=True), "/channels/c/stream"
    elif kind == "demo":
        from broadcast_history.demo import create_app as demo_app

        app, path = demo_app(broadcast), "/api/stream/chat.x"
    else:
        app = create_stream_app(broadcast, authorize=allow_all)
        path = "/c/ws" if kind == "ws" else "/c"
    lookup = broadcast.log.channel

    async def slow(name: str) -> object:  # the subscribe is under way a while
        await asyncio.sleep(1)
        return await lookup(name)

    monkeypatch.setattr(broadcast.log, "channel", slow)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=4)
    server = StreamServer(config)
    async with running(server) as (port, task):

        async def client() -> None:  # until its stream ends: it reconnects elsewhere
            if kind == "ws":
                with contextlib.suppress(Exception):  # refused as the server stops
                    async with ws_connect(f"ws://127.0.0.1:{port}{path}") as ws:
                        async for _ in ws:
                            pass
                return
            async with (
                httpx.AsyncClient(timeout=10) as http,
                http.stream("GET", f"http://127.0.0.1:{port}{path}") as response,
            ):
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    pass

        opening = asyncio.ensure_future(client())
        await asyncio.sleep(0.3)  # its subscribe waits for the log
        began = asyncio.get_running_loop().time()
        server.should_exit = True  # what SIGTERM does
        await asyncio.wait_for(opening, 10)
        await asyncio.wait_for(task, 10)
        took = asyncio.get_running_loop().time() - began
    assert took < 2.5, took  # not cut at the 4 s timeout
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_stream_server_keeps_one_budget_and_a_second_ctrl_c(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review fixes: the streams' wait and uvicorn's share timeout_graceful_shutdown
    (a stop took twice the setting), force_exit (a second Ctrl-C) ends the wait, and
    an app given as an import string or without finish_streams still stops."""
    app = create_stream_app(broadcast, authorize=allow_all, publish=True)
    _slow_appends(broadcast, monkeypatch, seconds=4)

    async def stop_during_a_publish(server: StreamServer, force: bool) -> float:
        async with running(server) as (port, task):
            async with ws_stream(f"ws://127.0.0.1:{port}/c/ws") as ws:
                await ws.send(json.dumps({"type": "publish", "data": "m"}))
                await asyncio.sleep(0.2)  # the publish is under way
                began = asyncio.get_running_loop().time()
                server.should_exit = True
                if force:
                    await asyncio.sleep(0.3)
                    server.force_exit = True
                await asyncio.wait_for(task, 10)
                return asyncio.get_running_loop().time() - began

    def server(target: Any) -> StreamServer:
        config = uvicorn.Config(
            target, log_level="critical", lifespan="off", timeout_graceful_shutdown=1
        )
        return StreamServer(config)

    assert await stop_during_a_publish(server(app), force=False) < 1.9
    assert await stop_during_a_publish(server(app), force=True) < 0.9
    server("tests.support.nowhere:app").handle_exit(0, None)  # no AttributeError


async def test_a_websocket_client_gone_mid_send_is_no_server_error(
    base: str, broadcast: Broadcast, caplog: pytest.LogCaptureFixture
) -> None:
    """A WebSocket client that stopped reading, then vanished (reset): the send under
    way failed with Starlette's WebSocketDisconnected, which escaped as an ASGI error."""
    reader, writer = await _stuck_client(base, _upgrade("/stuck/ws"))
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    for _ in range(80):  # the client reads nothing: the server's sends back up
        await broadcast.publish("stuck", "x" * 100_000)
    await asyncio.sleep(0.3)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()  # a reset, as from a killed process
    for _ in range(50):
        if not any(broadcast.subscriber_modes().values()):
            break
        await asyncio.sleep(0.05)
    assert not any(broadcast.subscriber_modes().values())
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_client_gone_mid_body_is_no_server_error(
    base: str, broadcast: Broadcast, caplog: pytest.LogCaptureFixture
) -> None:
    """A POST whose client leaves before sending the whole body publishes nothing and
    logs no traceback (Starlette's ClientDisconnect escaped as an ASGI error)."""
    host, port = base.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await broadcast.log.channel("gone") is None
