"""The operator console (``/ui``) in headless Chromium against ``broadcast-history serve``.

The server is the real command on a free port over a SQLite log file that the test
also writes to (publishing from outside, as another process would). The console is
driven as an operator would: token, channel list, event pages, live tail across a
server restart, trim and delete. Screenshots are saved under ``build/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from broadcast_history import Broadcast, Event
from tests.support.browser_support import BUILD, WAIT_MS, chromium, require_chromium
from tests.support.ports import free_port

sync_api = require_chromium()
expect = sync_api.expect

TOKEN = "console-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _publish(log: str, channel: str, messages: list[str | bytes]) -> list[Event]:
    async with Broadcast("memory://", log=log) as broadcast:
        return [await broadcast.publish(channel, message) for message in messages]


async def _set_consumer(log: str, channel: str, name: str, position: int) -> None:
    async with Broadcast("memory://", log=log) as broadcast:
        await broadcast.log.set_consumer(channel, name, position)


def publish(log: str, channel: str, *messages: str | bytes) -> list[Event]:
    """Publish as another publisher sharing the log would.

    In a thread of its own: Playwright's sync API keeps an event loop in this one.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _publish(log, channel, list(messages))).result()


class Server:
    """``broadcast-history serve`` on a fixed port, restartable."""

    def __init__(self, log: str, workdir: Path) -> None:
        self.log = log
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.output = workdir / "serve.log"

    def start(self) -> None:
        command = [sys.executable, "-m", "broadcast_history.cli", "serve", "--log", self.log]
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                env={**os.environ, "BROADCAST_HISTORY_TOKEN": TOKEN},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base}/ui/", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"serve did not start:\n{self.output.read_text()}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("console")
    log = f"sqlite+aiosqlite:///{workdir / 'events.db'}"
    orders = publish(log, "orders", *[f'{{"order": {i}}}' for i in range(1, 121)])
    orders += publish(log, "orders", b"\x00\x01", b"\x00\x02", b"\xff\xfe")
    publish(log, "chat/room-1", *[f"message {i}" for i in range(1, 5)], b"\x00\xffbinary")
    publish(log, "scratch", *[f"draft {i}" for i in range(1, 11)])
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _set_consumer(log, "orders", "mailer", 100)).result()
    return {"log": log, "workdir": workdir, "orders": orders}


@pytest.fixture(scope="module")
def server(seeded: dict[str, Any]) -> Iterator[Server]:
    server = Server(seeded["log"], seeded["workdir"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    expect.set_options(timeout=WAIT_MS)
    with chromium(sync_api) as browser:
        yield browser


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(
        viewport={"width": 1400, "height": 900}, permissions=["clipboard-read", "clipboard-write"]
    )
    page = context.new_page()
    failures: list[str] = []
    page.on("pageerror", lambda error: failures.append(str(error)))
    try:
        yield page
        assert failures == [], "uncaught errors in the page"
    finally:
        context.close()


def log_in(page: Any, server: Server, token: str = TOKEN) -> None:
    page.goto(f"{server.base}/ui")
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("input[name=token]").fill(token)
    dialog.locator("button[type=submit]").click()


def open_channel(page: Any, name: str) -> None:
    page.locator("#channels a", has_text=name).click()
    expect(page.locator("#channel-name")).to_have_text(name)
    expect(page.locator("#events tbody tr").first).to_be_visible()


def offsets(page: Any, selector: str = "#events tbody tr") -> list[int]:
    found: list[int] = page.eval_on_selector_all(
        selector, "rows => rows.map(r => Number(r.dataset.offset))"
    )
    return found


def expect_page(page: Any, top: int, bottom: int) -> None:
    rows = page.locator("#events tbody tr")
    expect(rows.first).to_have_attribute("data-offset", str(top))
    expect(rows.last).to_have_attribute("data-offset", str(bottom))
    assert offsets(page) == list(range(top, bottom - 1, -1))


def screenshot(page: Any, path: Path) -> None:
    """The page down to the end of its content."""
    bottom = page.evaluate("document.querySelector('main').getBoundingClientRect().bottom")
    width = page.viewport_size["width"]
    page.screenshot(
        path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": width, "height": bottom}
    )


def test_log_in_list_and_browse(page: Any, server: Server, seeded: dict[str, Any]) -> None:
    assert f"operator console: {server.base}/ui/" in server.output.read_text()
    log_in(page, server, token="wrong")
    error = page.locator("#token-dialog .dialog-error")
    expect(error).to_contain_text("401")
    log_in(page, server)
    expect(page.locator("#token-dialog")).to_be_hidden()

    expect(page.locator("#channels tbody tr")).to_have_count(3)
    listed = page.eval_on_selector_all(
        "#channels tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert {name: (head, count) for name, head, count, *_ in listed} == {
        "chat/room-1": ("5", "5"),
        "orders": ("123", "123"),
        "scratch": ("10", "10"),
    }
    expect(page.locator("#totals")).to_contain_text("3 channels · 138 events")

    # Newest first, 50 to a page; bytes are base64 with their badge.
    open_channel(page, "orders")
    expect_page(page, 123, 74)
    first = page.locator("#events tbody tr").first
    expect(first.locator(".badge")).to_have_text("base64")
    expect(first.locator(".content")).to_have_text("//4=")
    expect(page.locator('#events tr[data-offset="120"] .badge')).to_have_text("text")
    expect(page.locator("[data-page=newer]")).to_be_disabled()

    # Paging back with `before`, forward again with `after`.
    page.click("[data-page=older]")
    expect_page(page, 73, 24)
    page.click("[data-page=older]")
    expect_page(page, 23, 1)
    expect(page.locator("[data-page=older]")).to_be_disabled()
    page.click("[data-page=newer]")
    expect_page(page, 73, 24)
    page.click("[data-page=newer]")
    expect_page(page, 123, 74)
    page.click("[data-page=oldest]")
    expect_page(page, 50, 1)

    # The copy button copies epoch:offset.
    epoch = seeded["orders"][0].epoch
    page.click('#events tr[data-offset="1"] button.copy')
    expect(page.locator('#events tr[data-offset="1"] button.copy')).to_have_text("copied")
    assert page.evaluate("navigator.clipboard.readText()") == f"{epoch}:1"

    # A time window: since is inclusive, until exclusive.
    events: list[Event] = seeded["orders"]
    since, until = events[9].timestamp, events[19].timestamp
    window = [e.offset for e in events if since <= e.timestamp < until]
    page.fill("#filter input[name=since]", since.isoformat())
    page.fill("#filter input[name=until]", until.isoformat())
    page.click("#filter button[type=submit]")
    expect_page(page, max(window), min(window))

    # A value the API refuses is shown with its status and detail.
    assert page.locator("#errors .error").count() == 0
    page.fill("#filter input[name=since]", "yesterday")
    page.click("#filter button[type=submit]")
    expect(page.locator("#errors .error")).to_contain_text("422")
    expect(page.locator("#errors .error")).to_contain_text("since")

    # Durable consumers of the channel: position, lag behind the head, holder.
    row = page.locator('#consumers-table tr[data-consumer="mailer"]')
    expect(row).to_be_visible()
    cells = row.locator("td")
    expect(cells.nth(2)).to_have_text("100")
    expect(cells.nth(3)).to_have_text("23")
    expect(cells.nth(5)).to_have_text("free")
    screenshot(page, BUILD / "console-browse.png")


def test_live_tail_resumes_across_a_server_restart(
    page: Any, server: Server, seeded: dict[str, Any]
) -> None:
    log_in(page, server)
    open_channel(page, "chat/room-1")  # a "/" in the name: sent as %2F
    page.fill("#tail-history", "2")
    page.click("#tail-toggle")
    expect(page.locator("#tail-state")).to_have_text("live")
    tail = page.locator("#tail li")
    expect(tail).to_have_count(2)

    publish(seeded["log"], "chat/room-1", "published by the test")
    expect(tail.last).to_contain_text("published by the test")
    # The channel list's rate follows the head (computed from two refreshes).
    rate = page.locator('#channels tr[data-channel="chat/room-1"] td.rate')
    expect(rate).to_have_text(re.compile(r"^(0\.[1-9]|[1-9][0-9.]*)/s$"))
    screenshot(page, BUILD / "console.png")

    # The server goes away; events published meanwhile are caught up after it is back.
    server.stop()
    expect(page.locator("#tail-state")).to_have_text("reconnecting")
    refresh_error = page.locator('#errors .error[data-key="channels"]')
    expect(refresh_error).to_contain_text("GET /channels → network error")
    publish(seeded["log"], "chat/room-1", "while away 1", "while away 2")
    server.start()
    expect(tail).to_have_count(5)
    expect(page.locator("#tail-state")).to_have_text("live")
    publish(seeded["log"], "chat/room-1", "after the restart")
    expect(tail).to_have_count(6)
    assert offsets(page, "#tail li") == [4, 5, 6, 7, 8, 9]
    texts = page.eval_on_selector_all("#tail li .content", "items => items.map(i => i.textContent)")
    # The refresh that failed while the server was away says that it works again.
    expect(refresh_error).to_have_class(re.compile("resolved"))
    assert texts[2:] == [
        "published by the test",
        "while away 1",
        "while away 2",
        "after the restart",
    ]
    epoch = httpx.get(f"{server.base}/channels/chat%2Froom-1", headers=AUTH).json()["epoch"]
    expect(page.locator("#tail-info")).to_contain_text(f"last id {epoch}:9")
    screenshot(page, BUILD / "console-reconnect.png")

    # Deleted under the tail: a reset row says so, and the tail goes on.
    assert httpx.delete(f"{server.base}/channels/chat%2Froom-1", headers=AUTH).status_code == 204
    publish(seeded["log"], "chat/room-1", "new incarnation")
    expect(page.locator("#tail li.reset")).to_contain_text("reset (StreamReset)")
    publish(seeded["log"], "chat/room-1", "after the reset")
    expect(tail.last).to_contain_text("after the reset")


def test_a_live_tail_that_showed_nothing_misses_nothing_across_a_restart(
    page: Any, server: Server, seeded: dict[str, Any]
) -> None:
    """Started with none of the history on a quiet channel, the tail had no id to
    resume from: after a restart it asked for live again and never showed what was
    published meanwhile (found by a probe)."""
    publish(seeded["log"], "quiet", "before")
    try:
        log_in(page, server)
        open_channel(page, "quiet")
        page.fill("#tail-history", "0")
        page.click("#tail-toggle")
        expect(page.locator("#tail-state")).to_have_text("live")
        server.stop()
        expect(page.locator("#tail-state")).to_have_text("reconnecting")
        publish(seeded["log"], "quiet", "while away")
        server.start()
        tail = page.locator("#tail li")
        expect(tail).to_have_count(1)
        expect(tail.first).to_contain_text("while away")
    finally:
        httpx.delete(f"{server.base}/channels/quiet", headers=AUTH)


def test_trim_and_delete_ask_first(page: Any, server: Server) -> None:
    log_in(page, server)
    open_channel(page, "scratch")
    page.click("#trim")
    dialog = page.locator("#trim-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("input[name=before]").fill("4")
    dialog.locator("button[type=submit]").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#notice")).to_contain_text("3 events removed")
    expect(page.locator('#channel-stats [data-stat="count"] dd')).to_have_text("7")
    expect_page(page, 10, 4)

    page.click("#delete")
    dialog = page.locator("#delete-dialog")
    expect(dialog).to_contain_text("Delete scratch?")
    expect(dialog.locator(".count")).to_have_text("7")
    dialog.locator("button.cancel").click()
    expect(dialog).to_be_hidden()
    assert httpx.get(f"{server.base}/channels/scratch", headers=AUTH).status_code == 200

    page.click("#delete")
    expect(dialog).to_be_visible()
    page.screenshot(path=str(BUILD / "console-delete.png"))
    dialog.locator("button[type=submit]").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#channel-section")).to_be_hidden()
    expect(page.locator("#notice")).to_have_text("Deleted scratch.")
    expect(page.locator('#channels tr[data-channel="scratch"]')).to_have_count(0)
    assert httpx.get(f"{server.base}/channels/scratch", headers=AUTH).status_code == 404
    assert page.locator("#errors .error").count() == 0


def test_sse_reader_splits_lines_and_chunks_anywhere(page: Any, server: Server) -> None:
    """The console's own SSE parser, fed chunks cut at awkward places."""
    page.goto(f"{server.base}/ui/")
    items = page.evaluate(
        """async () => {
            const { readEvents } = await import("./sse.js");
            const chunks = [": subscribed\\r", "\\n\\r\\nid: 7:1\\nevent: mess", "age\\ndata: a\\n",
                            "data:  b\\r\\n\\r", "\\nretry: 500\\n\\ndata: {}\\n\\n", "data: cut"];
            const body = new ReadableStream({
                start(controller) {
                    for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
                    controller.close();
                },
            });
            const items = [];
            for await (const item of readEvents(body)) items.push(item);
            return items;
        }"""
    )
    assert items == [
        {"comment": "subscribed"},
        {"type": "message", "data": "a\n b", "id": "7:1"},
        {"retry": 500},
        {"type": "message", "data": "{}", "id": "7:1"},  # the last id carries over
    ]


def test_late_answers_are_not_shown_under_another_channel_or_prefix(
    page: Any, server: Server
) -> None:
    """Found by a probe: after a switch, the previous channel's events and its count
    in the Delete dialog stayed under the new name until (or unless) its answers came;
    a late consumers answer showed one channel's consumers under another; a late
    channel list showed another prefix's channels than the one typed."""
    log_in(page, server)
    page.uncheck("#auto-refresh")
    expect(page.locator('#channels tr[data-channel="orders"]')).to_be_visible()
    held: list[Any] = []
    page.route(re.compile(r".*/consumers\?channel=orders.*"), lambda route: held.append(route))
    page.evaluate("location.hash = '#/channel/orders'")
    expect(page.locator("#events tbody tr").first).to_be_visible()
    expect(page.locator("#delete-dialog .count")).not_to_have_text("—")
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    page.evaluate("location.hash = '#/channel/no-such-channel'")  # its answers are 404s
    expect(page.locator("#channel-name")).to_have_text("no-such-channel")
    expect(page.locator("#events tbody tr")).to_have_count(0)
    expect(page.locator("#delete-dialog .count")).to_have_text("—")
    expect(page.locator("#consumers")).to_contain_text("No durable consumer")
    held[0].continue_()
    page.wait_for_timeout(500)
    expect(page.locator("#consumers")).to_contain_text("No durable consumer")

    held.clear()
    page.route("**/channels?*", lambda route: held.append(route))
    page.click("#refresh")  # every channel: held
    page.unroute("**/channels?*")
    page.fill("#prefix", "chat")
    expect(page.locator("#channels tbody tr")).to_have_count(1)
    for route in held:
        route.continue_()
    page.wait_for_timeout(500)
    expect(page.locator("#channels tbody tr")).to_have_count(1)


def test_names_times_and_long_messages_are_shown_as_they_are(page: Any, server: Server) -> None:
    """Names that differ only in spaces or characters that do not show looked the same
    (a Delete dialog included); a zone of hours only got a Z added; a long message
    was cut in the middle of an emoji and counted in UTF-16 units (found by a probe)."""
    page.goto(f"{server.base}/ui/")
    got = page.evaluate(
        """async () => {
            const ui = await import("./ui.js");
            const text = "x".repeat(499) + "😀" + "y".repeat(10);
            const long = ui.message({ encoding: "text", message: text });
            const names = ["space", "space ", "space  ", "a\\u202eb", "a\\u00a0b", "ü/😀"];
            const times = ["2026-11-28T10:00+02", "2026-11-28T10:00+0230", "2026-11-28T10:00"];
            return {
                names: names.map(ui.shownName),
                times: [...times, "2026-11-28"].map(ui.isoTime),
                long: long.querySelector(".content").textContent,
            };
        }"""
    )
    assert got["names"] == [
        "space",
        '"space "',
        '"space  "',
        '"a\\u{202e}b"',
        '"a\\u{00a0}b"',
        "ü/😀",
    ]
    assert got["times"] == [
        "2026-11-28T10:00+02",
        "2026-11-28T10:00+0230",
        "2026-11-28T10:00Z",
        "2026-11-28T00:00:00Z",
    ]
    assert got["long"] == "x" * 499 + "😀… (510 chars)"


async def _crowd(log: str, channel: str, consumers: int) -> None:
    async with Broadcast("memory://", log=log) as broadcast:
        await broadcast.publish(channel, "x")
        for i in range(consumers):
            await broadcast.log.set_consumer(channel, f"worker-{i:04}", 1)


def test_a_channel_with_more_consumers_than_a_page_says_so(page: Any, tmp_path: Path) -> None:
    """GET /consumers answers 1,000 at most (it listed every row ever committed):
    the console shows that page and says there are more."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'crowded.db'}"
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _crowd(log, "crowded", 1001)).result()
    server = Server(log, tmp_path)
    server.start()
    try:
        log_in(page, server)
        open_channel(page, "crowded")
        expect(page.locator("#consumers-table tbody tr")).to_have_count(1000)
        expect(page.locator("#consumers-more")).to_contain_text("first 1,000 consumers")
    finally:
        server.stop()
