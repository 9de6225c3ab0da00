"""The chat demo's HTTP API: publishing, history pages, SSE and WebSocket catch-up.

The browser test (``test_browser.py``) checks the page; these check the API
underneath it against a real server on a free port (the memory transport and a
SQLite file log), and two demo processes sharing rooms over Redis + Postgres. The
streams are broadcast_history.web's (``test_web.py`` tests them in depth): here, that
the demo serves its rooms through them, read-only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from broadcast_history import Broadcast
from broadcast_history.demo import create_app
from tests.conftest import POSTGRES_URL, REDIS_URL, require_postgres, require_redis
from tests.support.demo_support import wait_for_server
from tests.support.ports import free_port


def room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def demo_app(path: Path, **options: Any) -> Any:
    # One client address posts for every test here: lift the per-client rate limit.
    options.setdefault("message_rate", (1000.0, 1000.0))
    return create_app(Broadcast("memory://", log=f"sqlite+aiosqlite:///{path}"), **options)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo app (memory transport, SQLite file log) on a free port."""
    app = demo_app(tmp_path_factory.mktemp("demo") / "demo.db", heartbeat=0.5)
    with serve_in_thread(app) as base:
        yield base


def post(base: str, name: str, text: str, author: str = "ann") -> dict[str, Any]:
    response = httpx.post(
        f"{base}/api/rooms/{name}/messages", json={"author": author, "text": text}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def stream_url(base: str, name: str) -> str:
    return f"{base}/api/stream/chat.{name}"


def read_sse(
    base: str, name: str, count: int, *, headers: dict[str, str] | None = None, query: str = ""
) -> list[tuple[str, str, str]]:
    """(id, event, data) of the first ``count`` events of one SSE stream of a room."""
    frames: list[tuple[str, str, str]] = []
    with httpx.stream("GET", stream_url(base, name) + query, headers=headers, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in r.iter_lines():
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if fields.get("event") not in (None, "start"):  # the opening says where it starts
                frames.append((fields["id"], fields["event"], fields["data"]))
                if len(frames) == count:
                    break
            fields = {}
    return frames


def text_of(data: str) -> str:
    text: str = json.loads(data)["text"]
    return text


def test_demo_command_is_registered_in_the_cli() -> None:
    from typer.testing import CliRunner

    from broadcast_history.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--host", "--port", "--data-dir", "--live", "--log"):
        assert option in result.output


def test_demo_with_an_unreachable_log_fails_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from broadcast_history.cli import app

    # A SQLite file in a directory that does not exist cannot be opened.
    log = f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'demo.db'}"
    result = CliRunner().invoke(app, ["demo", "--log", log, "--port", "8099"])
    assert result.exit_code == 3, result.output
    assert "cannot start the demo: cannot open the event log" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert "chat demo:" not in result.output  # nothing was served


def test_demo_refuses_bad_ports_and_data_dirs_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from broadcast_history.cli import app

    for port in ("0", "-1", "99999"):  # was a bogus URL, then an OverflowError traceback
        result = CliRunner().invoke(app, ["demo", "--port", port])
        assert result.exit_code == 2, result.output
    (tmp_path / "file").touch()
    result = CliRunner().invoke(app, ["demo", "--data-dir", str(tmp_path / "file" / "d")])
    assert result.exit_code == 2, result.output
    assert "cannot create the data directory" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_publish_validates(server: str) -> None:
    url = f"{server}/api/rooms/{room()}/messages"
    refused = httpx.post(url, content=b"not json")
    assert (refused.status_code, refused.json()["detail"]) == (
        422,
        "send a JSON object {author, text}",
    )
    assert httpx.post(url, content=b"[" * 5000 + b"]" * 5000).status_code == 422  # too deep
    assert httpx.post(url, json={"text": ""}).status_code == 422
    assert httpx.post(url, json={"text": "x" * 2001}).status_code == 422
    assert (
        httpx.post(f"{server}/api/rooms/bad%20name/messages", json={"text": "x"}).status_code == 404
    )
    event = post(server, room(), "hello", author="bea")
    assert (event["offset"], event["author"], event["text"]) == (1, "bea", "hello")
    assert httpx.post(url, json={"text": "x", "author": "   "}).json()["author"] == "anonymous"
    assert httpx.post(url, json={"text": "x", "author": 0}).status_code == 422
    assert event["id"] == f"{event['epoch']}:1"


def test_the_page_is_served_with_a_strict_policy(server: str) -> None:
    """The page shows what anyone wrote; no inline script, nothing from elsewhere,
    no framing, as the console (it had no policy at all)."""
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        response = httpx.get(server + path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"


def test_rooms_and_history_pages(server: str) -> None:
    name = room()
    for i in range(1, 6):
        post(server, name, f"m{i}")
    rooms = {r["room"]: r for r in httpx.get(f"{server}/api/rooms").json()}
    assert rooms[name]["messages"] == 5
    newest = httpx.get(f"{server}/api/rooms/{name}/history?limit=2").json()
    assert [m["offset"] for m in newest] == [5, 4]
    older = httpx.get(f"{server}/api/rooms/{name}/history?before=4&limit=2").json()
    assert [m["text"] for m in older] == ["m3", "m2"]
    assert httpx.get(f"{server}/api/rooms/{name}/history?before=x").status_code == 422


def test_sse_starts_with_recent_history_then_live(server: str) -> None:
    name = room()
    epoch = post(server, name, "one")["epoch"]
    url = stream_url(server, name) + "?history=50"
    with httpx.stream("GET", url, timeout=10) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(7)] == [
            "retry: 1000",
            f"id: {epoch}:0",  # where the stream starts
            "event: start",
            f'data: {{"epoch":{epoch},"offset":0}}',
            "",
            f"id: {epoch}:1",
            "event: message",
        ]
        assert text_of(next(lines).removeprefix("data: ")) == "one"
        post(server, name, "two")  # subscribed before the response started: delivered
        for line in lines:
            if line.startswith("data: "):
                assert text_of(line[6:]) == "two"
                break


def test_sse_resumes_after_last_event_id(server: str) -> None:
    name = room()
    events = [post(server, name, f"m{i}") for i in range(1, 5)]
    epoch = events[0]["epoch"]
    # What EventSource sends by itself when it reconnects:
    frames = read_sse(server, name, 2, headers={"Last-Event-ID": f"{epoch}:2"})
    assert [(i, text_of(d)) for i, _, d in frames] == [(f"{epoch}:3", "m3"), (f"{epoch}:4", "m4")]
    # What the page sends after "Drop connection" then "Reconnect":
    frames = read_sse(server, name, 1, query=f"?last_event_id={epoch}:3")
    assert [text_of(d) for _, _, d in frames] == ["m4"]


def test_sse_tells_a_page_from_another_epoch_to_start_over(server: str) -> None:
    name = room()
    real = post(server, name, "only")["epoch"]
    stale = real + 1 if real < 2**53 - 1 else real - 1
    for last, reason in [(f"{stale}:7", "StreamReset"), (f"{real}:99", "OffsetOutOfRange")]:
        ((event_id, kind, data),) = read_sse(server, name, 1, headers={"Last-Event-ID": last})
        assert (event_id, kind) == (f"{real}:1", "reset")
        assert json.loads(data) == {"reason": reason, "epoch": real, "head": 1}


def test_streams_serve_rooms_only_and_read_only(server: str) -> None:
    assert httpx.get(f"{server}/api/stream/not-a-room").status_code == 403
    assert httpx.get(f"{server}/api/stream/chat.bad%20name").status_code == 403
    assert httpx.post(stream_url(server, room()), content=b"x").status_code == 405
    script = httpx.get(f"{server}/api/stream/client.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "export function connect" in script.text


def test_websocket_catch_up_then_live(server: str) -> None:
    ws_client = pytest.importorskip("websockets.sync.client", reason="websockets not installed")
    name = room()
    epoch = post(server, name, "m1")["epoch"]
    post(server, name, "m2")
    post(server, name, "m3")
    url = stream_url(server, name).replace("http://", "ws://") + f"/ws?last_event_id={epoch}:1"
    with ws_client.connect(url, open_timeout=10) as ws:

        def receive() -> dict[str, Any]:
            while True:
                item: dict[str, Any] = json.loads(ws.recv(timeout=10))
                if item["type"] != "ping":
                    return item

        assert receive() == {"type": "start", "id": f"{epoch}:1", "epoch": epoch, "offset": 1}
        got = [receive() for _ in range(2)]
        assert [(m["type"], m["offset"], text_of(m["data"])) for m in got] == [
            ("message", 2, "m2"),
            ("message", 3, "m3"),
        ]
        post(server, name, "after", author="wes")
        live = receive()
        assert (live["id"], json.loads(live["data"])["author"]) == (f"{epoch}:4", "wes")
        # Messages go through the checked POST, not the socket.
        ws.send(json.dumps({"type": "publish", "data": "sneaky"}))
        assert receive()["type"] == "error"


def test_close_streams_ends_open_streams(tmp_path: Path) -> None:
    app = demo_app(tmp_path / "close.db")
    with serve_in_thread(app) as base:
        with httpx.stream("GET", stream_url(base, room()), timeout=10) as response:
            lines = response.iter_lines()
            assert [next(lines) for _ in range(3)] == ["retry: 1000", "id: 0", "event: start"]
            next(lines)  # its data
            app.state.close_streams()  # what Ctrl-C does before the server stops
            assert list(lines) == [""]


def test_two_demo_processes_share_rooms_over_redis_and_postgres(tmp_path: Path) -> None:
    require_redis()
    require_postgres()
    pytest.importorskip("redis", reason="the redis extra is not installed")
    pytest.importorskip("asyncpg", reason="the postgres extra is not installed")
    processes: list[subprocess.Popen[Any]] = []
    bases: list[str] = []
    try:
        for _ in range(2):
            port = free_port()
            command = [sys.executable, "-m", "broadcast_history.demo", "--port", str(port)]
            command += ["--live", REDIS_URL, "--log", POSTGRES_URL, "--data-dir", str(tmp_path)]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            processes.append(process)
            bases.append(f"http://127.0.0.1:{port}")
        for base, process in zip(bases, processes):
            wait_for_server(base, process)
        a, b = bases
        name = room()
        first = post(a, name, "from a")
        epoch = first["epoch"]
        url = stream_url(b, name)
        texts: list[str] = []
        with httpx.stream("GET", url, headers={"Last-Event-ID": f"{epoch}:0"}, timeout=15) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and "text" in line:  # not the opening start
                    texts.append(text_of(line[6:]))
                    if len(texts) == 2:
                        break
                    post(a, name, "live from a")  # published on A, delivered by B
        assert texts == ["from a", "live from a"]
        assert post(b, name, "from b")["offset"] == 3  # one log, one sequence of offsets
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- one client cannot hurt the others -------------------------------------------------


def test_a_bad_string_fails_alone(server: str) -> None:
    name = room()
    url = f"{server}/api/rooms/{name}/messages"
    bodies = [json.dumps({"author": "a", "text": f"ok {i}"}) for i in range(10)]
    bodies.insert(5, '{"author": "a", "text": "\\ud800"}')  # valid JSON, not valid Unicode

    def send(body: str) -> httpx.Response:
        return httpx.post(url, content=body, headers={"content-type": "application/json"})

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    assert [r.status_code for r in responses] == [201] * 5 + [422] + [201] * 5
    offsets = sorted(r.json()["offset"] for r in responses if r.status_code == 201)
    assert offsets == list(range(1, 11))


def test_bodies_integers_and_rates_are_capped(tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'caps.db'}"
    app = create_app(Broadcast("memory://", log=log), message_rate=(1.0, 5.0))
    with serve_in_thread(app) as base:
        name = room()
        url = f"{base}/api/rooms/{name}/messages"
        big = json.dumps({"text": "x" * (1024 * 1024)})
        assert httpx.post(url, content=big).status_code == 413
        huge = str(2**64)
        assert httpx.get(f"{base}/api/rooms/{name}/history?before={huge}").status_code == 422
        statuses = [httpx.post(url, json={"text": f"m{i}"}).status_code for i in range(15)]
        assert statuses[:4] == [201] * 4  # the burst (the refused big body took one)
        assert 429 in statuses[4:]


def test_websocket_frames_are_refused_and_close_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws_client = pytest.importorskip("websockets.sync.client", reason="websockets not installed")
    app = demo_app(tmp_path / "ws.db")
    port = free_port()
    # log_config=None: uvicorn's own loggers propagate, so caplog sees an ASGI error.
    config = uvicorn.Config(app, port=port, log_config=None, timeout_graceful_shutdown=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.02)
        caplog.set_level(logging.INFO)
        url = f"ws://127.0.0.1:{port}/api/stream/chat.{room()}/ws"
        for _ in range(3):
            with ws_client.connect(url, open_timeout=10) as ws:
                ws.send(json.dumps({"type": "publish", "data": "x" * 20_000}))
                while (item := json.loads(ws.recv(timeout=10)))["type"] != "error":
                    pass
                assert "publishing is not enabled" in item["detail"]
        time.sleep(0.3)
    finally:
        srv.should_exit = True
        thread.join(10)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_a_stored_message_nested_too_deeply_is_shown_raw() -> None:
    from broadcast_history import Event
    from broadcast_history.demo._rooms import message_item

    deep = "[" * 5000 + "]" * 5000  # published by another tool: the parser gives up
    item = message_item(Event("room:x", deep, offset=1, epoch=7))
    assert (item["id"], item["text"]) == ("7:1", deep)


def test_the_console_banner_hides_passwords() -> None:
    """The demo printed its URLs as given, passwords included (its /api/info hid them)."""
    from broadcast_history._redact import redacted as shown_url

    assert shown_url("postgresql+asyncpg://app:s3cret@db/app") == (
        "postgresql+asyncpg://app:***@db/app"
    )
    assert shown_url("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert shown_url("kafka://user:p@a@b:9092,c:9092") == "kafka://user:***@b:9092,c:9092"
    assert (
        shown_url("postgresql+asyncpg://app:pa/ss@db/app") == "postgresql+asyncpg://app:***@db/app"
    )
    assert shown_url("nats://s3cr3tToken@localhost:4222") == "nats://***@localhost:4222"
    assert shown_url("postgresql://db/app?user=u&password=p") == (
        "postgresql://db/app?user=u&password=***"
    )
    for plain in ("memory://", "sqlite+aiosqlite:///.data/demo.db", "nats://n1,n2"):
        assert shown_url(plain) == plain


async def test_the_info_page_hides_a_password_given_in_the_query(tmp_path: Path) -> None:
    """/api/info (public) hid a password in the URL's user part, not in its query."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}?password=QUERYSECRET"
    app = create_app(Broadcast("memory://", log=log))
    transport = httpx.ASGITransport(app=app)  # no lifespan: nothing connects
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        info = (await client.get("/api/info")).json()
    assert "QUERYSECRET" not in info["log"] and info["log"].endswith("?password=***")


def test_bad_urls_are_refused_without_their_passwords() -> None:
    """Errors quoted a URL they could not read whole, password and all."""
    from broadcast_history import InvalidArgument
    from broadcast_history.log import EventLog

    for url in ("redis-cluster://:CLUSTERPW@127.0.0.1:notaport", "nats://u:NATSPW@h:99999"):
        with pytest.raises(InvalidArgument) as raised:
            Broadcast(url)  # the transport's URL is read first
        assert "PW" not in str(raised.value) and ":***@" in str(raised.value), raised.value
    with pytest.raises(InvalidArgument) as raised:
        EventLog("postgresql+asyncpg://u:PGPASS@127.0.0.1:abc/x")
    assert "PGPASS" not in str(raised.value) and "u:***@" in str(raised.value)
    with pytest.raises(InvalidArgument, match="port 99999 of the log URL"):
        EventLog("postgresql+asyncpg://u:PGPASS@127.0.0.1:99999/x")  # OverflowError later
