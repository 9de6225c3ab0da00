"""The chat demo's HTTP API: publishing, history pages, SSE and WebSocket catch-up.

The browser test (``test_browser.py``) checks the page; these check the protocol
underneath it against a real server on a free port (the memory transport and a
SQLite file log), and two demo processes sharing rooms over Redis + Postgres.
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
from broadcast_history.demo import Position, create_app, parse_position
from tests.conftest import POSTGRES_URL, REDIS_URL, require_postgres, require_redis
from tests.support.demo_support import free_port, wait_for_server


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


def read_sse(
    base: str, name: str, *, until: str, headers: dict[str, str] | None = None, query: str = ""
) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) of the frames of one SSE stream, up to the first ``until`` event."""
    frames: list[tuple[str | None, str, dict[str, Any]]] = []
    url = f"{base}/api/rooms/{name}/events{query}"
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if "data" in fields:
                data = json.loads(fields["data"])
                frames.append((fields.get("id"), fields["event"], data))
                if fields["event"] == until:
                    break
            fields = {}
    return frames


def test_parse_position() -> None:
    assert parse_position("12:34") == Position(12, 34)
    assert str(Position(12, 34)) == "12:34"
    for bad in (None, "", "12", "a:1", "1:-1", "1:2:3", "\u0661:\u0662"):
        assert parse_position(bad) is None


def test_demo_command_is_registered_in_the_cli() -> None:
    from typer.testing import CliRunner

    from broadcast_history.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--host", "--port", "--data-dir", "--live", "--log"):
        assert option in result.output


def test_publish_validates(server: str) -> None:
    url = f"{server}/api/rooms/{room()}/messages"
    assert httpx.post(url, content=b"not json").status_code == 422
    assert httpx.post(url, json={"text": ""}).status_code == 422
    assert httpx.post(url, json={"text": "x" * 2001}).status_code == 422
    assert (
        httpx.post(f"{server}/api/rooms/bad%20name/messages", json={"text": "x"}).status_code == 404
    )
    event = post(server, room(), "hello", author="bea")
    assert (event["offset"], event["author"], event["text"]) == (1, "bea", "hello")
    assert event["id"] == f"{event['epoch']}:1"


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
    first = post(server, name, "one")
    frames = read_sse(server, name, until="live")
    epoch = first["epoch"]
    assert [(i, e) for i, e, _ in frames] == [
        (f"{epoch}:0", "ready"),
        (f"{epoch}:1", "message"),
        (None, "live"),
    ]
    assert frames[1][2]["replayed"] is True


def test_sse_resumes_after_last_event_id(server: str) -> None:
    name = room()
    events = [post(server, name, f"m{i}") for i in range(1, 5)]
    epoch = events[0]["epoch"]
    # What EventSource sends by itself when it reconnects:
    frames = read_sse(server, name, until="live", headers={"Last-Event-ID": f"{epoch}:2"})
    assert [d["offset"] for _, e, d in frames if e == "message"] == [3, 4]
    assert frames[0][2]["position"] == f"{epoch}:2"
    # What the page sends after "Drop connection" then "Reconnect":
    frames = read_sse(server, name, until="live", query=f"?last={epoch}:3")
    assert [d["text"] for _, e, d in frames if e == "message"] == ["m4"]


def test_sse_delivers_live_after_catch_up(server: str) -> None:
    name = room()
    epoch = post(server, name, "before")["epoch"]
    url = f"{server}/api/rooms/{name}/events"
    seen: list[tuple[str, bool]] = []
    with httpx.stream("GET", url, headers={"Last-Event-ID": f"{epoch}:1"}, timeout=10) as response:
        for line in response.iter_lines():
            if line.startswith("event: live"):
                post(server, name, "after")
            elif line.startswith("data: ") and '"message"' in line:
                data = json.loads(line[6:])
                seen.append((data["text"], data["replayed"]))
                break
            elif line == ": ping":  # heartbeats keep idle streams open
                continue
    assert seen == [("after", False)]


def test_sse_tells_a_page_from_another_epoch_to_start_over(server: str) -> None:
    name = room()
    real = post(server, name, "only")["epoch"]
    stale = real + 1 if real < 2**53 - 1 else real - 1
    frames = read_sse(server, name, until="live", headers={"Last-Event-ID": f"{stale}:7"})
    kinds = [e for _, e, _ in frames]
    assert kinds == ["reset", "ready", "message", "live"]
    assert "reset" in frames[0][2]["reason"]
    assert frames[2][2]["text"] == "only"


def test_sse_offset_beyond_head_starts_over(server: str) -> None:
    name = room()
    epoch = post(server, name, "only")["epoch"]
    frames = read_sse(server, name, until="live", headers={"Last-Event-ID": f"{epoch}:99"})
    assert [e for _, e, _ in frames] == ["reset", "ready", "message", "live"]


def test_websocket_catch_up_and_publish(server: str) -> None:
    ws_client = pytest.importorskip("websockets.sync.client", reason="websockets not installed")
    name = room()
    epoch = post(server, name, "m1")["epoch"]
    post(server, name, "m2")
    post(server, name, "m3")
    url = server.replace("http://", "ws://") + f"/api/rooms/{name}/ws?last={epoch}:1"
    with ws_client.connect(url, open_timeout=10) as ws:

        def receive() -> dict[str, Any]:
            while True:
                item: dict[str, Any] = json.loads(ws.recv(timeout=10))
                if item["type"] != "ping":
                    return item

        assert receive() == {"type": "ready", "position": f"{epoch}:1", "id": f"{epoch}:1"}
        got = [receive() for _ in range(3)]
        assert [(m["type"], m.get("offset")) for m in got] == [
            ("message", 2),
            ("message", 3),
            ("live", None),
        ]
        ws.send(json.dumps({"author": "wes", "text": "over the socket"}))
        live = receive()
        assert (live["offset"], live["author"], live["replayed"]) == (4, "wes", False)
        ws.send(json.dumps({"text": ""}))
        assert receive()["type"] == "error"


def test_close_streams_ends_open_streams(tmp_path: Path) -> None:
    app = demo_app(tmp_path / "close.db")
    with serve_in_thread(app) as base:
        with httpx.stream("GET", f"{base}/api/rooms/{room()}/events", timeout=10) as response:
            lines = response.iter_lines()
            while next(lines) != "event: live":
                pass
            app.state.close_streams()  # what Ctrl-C does before the server stops
            assert list(lines) == ['data: {"type":"live"}', ""]


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
        url = f"{b}/api/rooms/{name}/events"
        texts: list[str] = []
        with httpx.stream("GET", url, headers={"Last-Event-ID": f"{epoch}:0"}, timeout=15) as r:
            for line in r.iter_lines():
                if line.startswith("event: live"):
                    post(a, name, "live from a")  # published on A, delivered by B
                elif line.startswith("data: ") and '"message"' in line:
                    texts.append(json.loads(line[6:])["text"])
                    if len(texts) == 2:
                        break
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


def test_websocket_frames_are_capped_and_close_cleanly(
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
        url = f"ws://127.0.0.1:{port}/api/rooms/{room()}/ws"
        for _ in range(3):
            with ws_client.connect(url, open_timeout=10) as ws:
                ws.send(json.dumps({"text": "x" * 20_000}))
                while (item := json.loads(ws.recv(timeout=10)))["type"] != "error":
                    pass
                assert "frames are limited" in item["detail"]
        time.sleep(0.3)
    finally:
        srv.should_exit = True
        thread.join(10)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
