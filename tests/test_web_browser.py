"""client.js in a real browser: reloads and server restarts lose nothing, resets are said.

Headless Chromium (see ``browser_support``) loads the test page of
``tests/support/web_server.py``, which streams a channel with ``/events/client.js``
and keeps what it has shown. For SSE and WebSocket: 5 events, the server killed, 5
more published by another process into the shared log, the server started again,
the page reloaded: the 10 are shown once each, in order. The same again without the
reload (the page reconnects by itself). Then the channel is deleted and the page's
``onReset`` fires.
"""

from __future__ import annotations

import asyncio
import os
import signal
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

from broadcast_history import Broadcast, EventLog
from tests.support.browser_support import WAIT_MS, chromium, require_chromium
from tests.support.ports import free_port
from tests.support.proxy import CuttableProxy

sync_api = require_chromium()
ROOT = Path(__file__).parents[1]
TEXT = {"content-type": "text/plain"}


class Server:
    """``tests/support/web_server.py`` on a fixed port: killed and started again."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.support.web_server"]
        command += ["--port", str(self.port), "--log", self.log]
        self.process = subprocess.Popen(command, cwd=ROOT)
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.base}/stats")
                return
            except httpx.TransportError:
                assert self.process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('browser') / 'web.db'}"
    server = Server(log)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(sync_api) as browser:
        yield browser


def in_thread(coroutine: Any) -> Any:
    """Run ``coroutine`` in a thread: Playwright's sync API keeps a loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def publish_elsewhere(log: str, channel: str, messages: list[str]) -> None:
    """Publish as another process sharing the log would (the server is down)."""
    async with Broadcast("memory://", log=log) as broadcast:
        for message in messages:
            await broadcast.publish(channel, message)


async def delete_and_publish(log: str, channel: str, message: str) -> None:
    async with Broadcast("memory://", log=log) as broadcast:
        await broadcast.log.delete_channel(channel)
        await broadcast.publish(channel, message)


def stream_into_page(page: Any, channel: str, transport: str) -> None:
    """Stream ``channel`` into ``window.got``, counting openings in ``window.opened``."""
    page.evaluate(
        """([channel, transport]) => import("/events/client.js").then(({ connect }) => {
            window.got = [];
            window.opened = 0;
            connect(`/events/${channel}`, {
                transport,
                storageKey: null,
                onMessage(data) { window.got.push(data); },
                onStatus(status) { if (status === "open") window.opened += 1; },
            });
        })""",
        [channel, transport],
    )


def wait_shown(page: Any, count: int) -> list[str]:
    page.wait_for_function(f"() => window.shown && window.shown.length >= {count}", timeout=WAIT_MS)
    shown: list[str] = page.evaluate("() => window.shown")
    return shown


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_reload_and_restart_lose_nothing_and_resets_are_said(
    server: Server, browser: Any, transport: str
) -> None:
    channel = f"page-{transport}-{uuid.uuid4().hex[:6]}"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/?channel={channel}&transport={transport}")
        page.wait_for_function("() => window.statuses.includes('open')", timeout=WAIT_MS)
        for i in range(1, 6):
            response = httpx.post(
                f"{server.base}/events/{channel}",
                content=f"m{i}",
                headers={"content-type": "text/plain"},
            )
            assert response.status_code == 201
        assert wait_shown(page, 5) == [f"m{i}" for i in range(1, 6)]

        server.kill()
        in_thread(publish_elsewhere(server.log, channel, [f"m{i}" for i in range(6, 11)]))
        server.start()
        page.reload()
        shown = wait_shown(page, 10)
        page.wait_for_timeout(300)  # anything repeated would show up by now
        assert page.evaluate("() => window.shown") == shown == [f"m{i}" for i in range(1, 11)]
        assert page.locator("#shown li").count() == 10

        # Without a reload, the page reconnects by itself (EventSource's retry, or
        # client.js's backoff for the WebSocket) and resumes after the 10th.
        server.kill()
        in_thread(publish_elsewhere(server.log, channel, ["m11", "m12"]))
        server.start()
        assert wait_shown(page, 12)[10:] == ["m11", "m12"]
        # Bytes arrive as bytes (base64 on the wire, a Uint8Array in the handler).
        httpx.post(f"{server.base}/events/{channel}", content=b"\x01\xff")
        assert wait_shown(page, 13)[12] == "bytes:1,255"

        in_thread(delete_and_publish(server.log, channel, "new incarnation"))
        page.wait_for_function("() => window.resets.length === 1", timeout=WAIT_MS)
        reset = page.evaluate("() => window.resets[0]")
        assert reset["reason"] == "StreamReset"
        # The position it goes on from (a bare "0" if the reset came before the publish).
        expected = "0" if reset["epoch"] is None else f"{reset['epoch']}:{reset['head']}"
        assert reset["id"] == expected
    finally:
        context.close()


def test_the_stored_position_is_the_channels_whatever_the_query(
    server: Server, browser: Any
) -> None:
    """The default storage key was the whole URL: with a token in the query (as the
    docs show), a page given a new token started over and handed its handler every
    event again, and each token left a key of its own in localStorage (found by a
    probe)."""
    channel = f"key-{uuid.uuid4().hex[:6]}"
    text = {"content-type": "text/plain"}
    for i in range(1, 4):
        httpx.post(f"{server.base}/events/{channel}", content=f"m{i}", headers=text)
    received = """async ([channel, token]) => {
        const { connect } = await import("/events/client.js");
        const got = [];
        const stream = connect(`/events/${channel}?since=0&token=${token}`, {
            onMessage(data) { got.push(data); },
        });
        await new Promise((resolve) => setTimeout(resolve, 1500));
        stream.close();
        return got;
    }"""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        assert page.evaluate(received, [channel, "tok-A"]) == ["m1", "m2", "m3"]
        httpx.post(f"{server.base}/events/{channel}", content="m4", headers=text)
        assert page.evaluate(received, [channel, "tok-B"]) == ["m4"]
        keys = page.evaluate("() => Object.keys(localStorage)")
        assert keys == [f"broadcast_history:{server.base}/events/{channel}"]
    finally:
        context.close()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_page_that_saw_no_event_misses_none_across_a_restart(
    server: Server, browser: Any, transport: str
) -> None:
    """A page streaming live had no id to resume from until its first event: after
    a restart it asked for live again, and what was published meanwhile never came
    (found by a probe, in the console's tail). Streams now open with their start."""
    channel = f"quiet-{transport}-{uuid.uuid4().hex[:6]}"
    httpx.post(f"{server.base}/events/{channel}", content="before", headers=TEXT)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        stream_into_page(page, channel, transport)
        page.wait_for_function("() => window.opened === 1", timeout=WAIT_MS)
        page.wait_for_timeout(300)  # the opening frame is in
        server.kill()
        in_thread(publish_elsewhere(server.log, channel, ["while away"]))
        server.start()
        page.wait_for_function("() => window.got.length >= 1", timeout=WAIT_MS)
        httpx.post(f"{server.base}/events/{channel}", content="after", headers=TEXT)
        page.wait_for_function("() => window.got.length >= 2", timeout=WAIT_MS)
        assert page.evaluate("() => window.got") == ["while away", "after"]
    finally:
        context.close()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_backoff_grows_while_the_server_is_down(
    server: Server, browser: Any, transport: str
) -> None:
    """A WebSocket that never opened reset the backoff after each failure: a client
    retried every 0.25-0.5 s for as long as the server was down. Server-Sent Events
    were left to EventSource, which tries again every second, for ever (a browser
    probe counted 58 attempts of two streams in 30 s)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        page.evaluate(
            """async ([dead, transport]) => {
                const { connect } = await import("/events/client.js");
                window.delays = [];
                connect(dead, {
                    transport,
                    storageKey: null,
                    onStatus(status, detail) {
                        if (status !== "reconnecting") return;
                        window.delays.push(parseInt(detail.match(/\\d+/)[0]));
                    },
                });
            }""",
            [f"http://127.0.0.1:{free_port()}/events/nowhere", transport],
        )
        page.wait_for_function("() => window.delays.length >= 3", timeout=WAIT_MS)
        delays = page.evaluate("() => window.delays")
        # Ceilings 0.5, 1 and 2 s, each delay drawn from its upper half.
        assert 250 <= delays[0] <= 500 and 500 <= delays[1] <= 1000 and delays[2] >= 1000, delays
    finally:
        context.close()


async def stored_messages(log: str, channel: str) -> list[str | bytes]:
    events = EventLog(log)
    await events.connect()
    try:
        return [event.message for event in await events.read(channel)]
    finally:
        await events.disconnect()


def test_websocket_publish_sends_the_bytes_of_any_binary_value(
    server: Server, browser: Any
) -> None:
    """A Uint16Array went out value by value (258 became the byte 2) and a Blob as
    no bytes at all."""
    channel = f"bytes-{uuid.uuid4().hex[:8]}"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        page.evaluate(
            """async (url) => {
                const { connect } = await import("/events/client.js");
                const stream = await new Promise((resolve) => {
                    const client = connect(url, {
                        transport: "ws",
                        storageKey: null,
                        onMessage() {},
                        onStatus(status) { if (status === "open") resolve(client); },
                    });
                });
                await stream.publish(new Uint16Array([258]));
                await stream.publish(new Uint8Array([7, 8, 9]).subarray(1));
                await stream.publish(new Blob([new Uint8Array([1, 2, 3])]));
                stream.close();
            }""",
            f"{server.base}/events/{channel}",
        )
        stored = in_thread(stored_messages(server.log, channel))
        assert stored == [b"\x02\x01", b"\x08\x09", b"\x01\x02\x03"]
    finally:
        context.close()


def test_a_refused_publish_says_why(server: Server, browser: Any) -> None:
    """A refusal in plain text (an HTTPException of authorize) reached the page as
    "HTTP 401": the body was read as JSON only."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        message = page.evaluate(
            """async () => {
                const { connect } = await import("/events/client.js");
                const stream = connect("/denied", { storageKey: null });
                try {
                    await stream.publish("hello");
                    return "published";
                } catch (error) {
                    return error.message;
                } finally {
                    stream.close();
                }
            }"""
        )
        assert message == "log in again"
    finally:
        context.close()


def record_statuses(page: Any, url: str, transport: str) -> None:
    """Stream ``url`` with the page's statuses and their details in ``window.statuses``."""
    page.evaluate(
        """async ([url, transport]) => {
            const { connect } = await import("/events/client.js");
            window.statuses = [];
            connect(url, {
                transport,
                storageKey: null,
                onStatus(status, detail) { window.statuses.push([status, detail]); },
            });
        }""",
        [url, transport],
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("/denied", "log in again"),  # an HTTPException(401) of authorize: plain text
        ("/closed/chat", "not allowed to subscribe on this channel"),  # 403, JSON
        ("/events/chat?since=soon", None),  # 422: a position the server cannot read
    ],
)
def test_a_refused_stream_closes_and_says_why(
    server: Server, browser: Any, url: str, reason: str | None
) -> None:
    """An EventSource refused (a 401 or 403 of authorize) failed like a server that is
    away: the page was asked again and again with the backoff, for ever, and never
    learnt why."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        record_statuses(page, url, "sse")
        page.wait_for_function(
            "() => window.statuses.some(([s]) => s !== 'connecting')", timeout=WAIT_MS
        )
        page.wait_for_timeout(1500)  # past the first retry's delay, had there been one
        statuses = page.evaluate("() => window.statuses")
        assert [status for status, _ in statuses] == ["connecting", "closed"], statuses
        assert statuses[1][1] == reason or (reason is None and "since" in statuses[1][1])
    finally:
        context.close()


def test_a_failed_stream_whose_probe_gets_no_answer_is_tried_again(
    server: Server, browser: Any
) -> None:
    """An EventSource that failed before it opened (a proxy's 502) is asked again by
    fetch to learn why; a server that took that request and never answered left the
    page waiting for ever, neither closed nor reconnecting."""
    context = browser.new_context()
    requests: list[str] = []

    def flaky(route: Any) -> None:
        requests.append(route.request.resource_type)
        if len(requests) == 1:
            route.fulfill(status=502, body="bad gateway")  # the stream fails...
        elif len(requests) > 2:
            route.continue_()
        # ...and the request asking why is never answered (left pending)

    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        page.route("**/events/chat*", flaky)
        record_statuses(page, "/events/chat", "sse")
        page.wait_for_function(
            "() => window.statuses.some(([s]) => s === 'open')", timeout=WAIT_MS + 5000
        )
        statuses = [status for status, _ in page.evaluate("() => window.statuses")]
        assert "closed" not in statuses
        assert requests[:3] == ["eventsource", "fetch", "eventsource"], requests
    finally:
        context.close()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_stream_revoked_while_open_closes_and_says_why(
    server: Server, browser: Any, transport: str
) -> None:
    """With the app's recheck, authorize refusing an open stream ends it; the page
    closes with the reason rather than reconnecting."""
    token = uuid.uuid4().hex
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        record_statuses(page, f"/revocable/chat?token={token}", transport)
        page.wait_for_function("() => window.statuses.some(([s]) => s === 'open')", timeout=WAIT_MS)
        httpx.post(f"{server.base}/revoke", params={"token": token})
        page.wait_for_function(
            "() => window.statuses.some(([s]) => s === 'closed')", timeout=WAIT_MS
        )
        page.wait_for_timeout(1000)  # past a first reconnect's delay, had there been one
        statuses = page.evaluate("() => window.statuses")
        assert statuses == [
            ["connecting", None],
            ["open", None],
            ["closed", "not allowed to subscribe on this channel"],
        ]
    finally:
        context.close()


class RelayThread:
    """A :class:`CuttableProxy` to the server, run by a loop of its own in a thread
    (Playwright's sync API holds this one's)."""

    def __init__(self, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = CuttableProxy("127.0.0.1", port)
        self.port = self._run(self.proxy.start())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def stall(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.stall)

    def close(self) -> None:
        self._run(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_connection_gone_silent_is_dropped_and_resumed(
    server: Server, browser: Any, transport: str
) -> None:
    """A connection that went silent without closing (a NAT that forgot it, a network
    switched) was never noticed: the page waited for ever, status "open", and got
    nothing more (a browser probe waited 60 s). It now watches the server's pings
    (every second here) and, after two intervals and 3 s of silence, connects again
    from its last id."""
    relay = RelayThread(server.port)
    channel = f"silent-{transport}-{uuid.uuid4().hex[:8]}"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{relay.port}/stats")
        stream_into_page(page, channel, transport)
        page.wait_for_function("() => window.opened === 1", timeout=WAIT_MS)
        httpx.post(f"{server.base}/events/{channel}", content="before", headers=TEXT)
        page.wait_for_function("() => window.got.length === 1", timeout=WAIT_MS)
        relay.stall()  # every connection open now carries nothing, for good
        httpx.post(f"{server.base}/events/{channel}", content="during", headers=TEXT)
        page.wait_for_function("() => window.got.length >= 2", timeout=WAIT_MS)
        assert page.evaluate("() => [window.got, window.opened]") == [["before", "during"], 2]
    finally:
        context.close()
        relay.close()


def test_publish_refuses_other_values_and_close_ends_waiting_publishes(
    server: Server, browser: Any
) -> None:
    """A number was stored as zero bytes over WebSocket (its text over POST), an
    object as "[object Object]"; a WebSocket publish waiting for its ack when the page
    closed the stream was left pending for ever (found by a browser probe)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/stats")
        outcomes = page.evaluate(
            """async (channel) => {
                const { connect } = await import("/events/client.js");
                const opened = new Promise((resolve) => {
                    window.stream = connect(`/events/${channel}`, {
                        transport: "ws",
                        storageKey: null,
                        onStatus(status) { if (status === "open") resolve(); },
                    });
                });
                await opened;
                const outcome = (promise) =>
                    promise.then(() => "published", (error) => `${error.name}: ${error.message}`);
                const refused = await Promise.all([5, { a: 1 }, null].map(
                    (value) => outcome(window.stream.publish(value))));
                const waiting = outcome(window.stream.publish("last"));
                window.stream.close();
                return [...refused, await waiting];
            }""",
            f"values-{uuid.uuid4().hex[:8]}",
        )
        refused = "TypeError: publish takes a string, bytes or a Blob"
        assert outcomes == [refused] * 3 + ["Error: the stream was closed"]
    finally:
        context.close()
