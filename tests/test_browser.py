"""The chat demo in a real browser: a dropped connection loses nothing and repeats nothing.

Headless Chromium (see ``browser_support``). Two pages share a room; one drops its
connection while the other keeps talking; after reconnecting it shows every message
once, in order. A screenshot of both pages is saved under ``build/``.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser_support import BUILD, WAIT_MS, chromium, require_chromium
from tests.support.demo_support import wait_for_server
from tests.support.ports import free_port

DEMO_MODULE = "broadcast_history.demo"

sync_api = require_chromium()


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo as a newcomer starts it: the module's CLI, embedded default log."""
    data_dir = tmp_path_factory.mktemp("demo-data")
    port = free_port()
    # The README's main job runs `broadcast-history demo`; fall back to the module form.
    script = Path(sys.executable).with_name("broadcast-history")
    entry = [str(script), "demo"] if script.exists() else [sys.executable, "-m", DEMO_MODULE]
    command = [*entry, "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, process)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(sync_api) as browser:
        yield browser


def chat_state(page: Any) -> dict[str, Any]:
    state: dict[str, Any] = page.evaluate(
        "() => ({state: chat.state, duplicates: chat.duplicates, gaps: chat.gaps, last: chat.last})"
    )
    return state


def messages(page: Any) -> list[tuple[int, str, bool]]:
    """(offset, text, highlighted as caught up) of every message shown, top to bottom."""
    rows: list[tuple[int, str, bool]] = page.evaluate(
        """() => [...document.querySelectorAll('#messages li')].map(li => [
            Number(li.dataset.offset),
            li.querySelector('.text').textContent,
            li.classList.contains('caught-up'),
        ])"""
    )
    return [tuple(row) for row in rows]  # type: ignore[misc]


def say(page: Any, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def wait_state(page: Any, state: str) -> None:
    page.wait_for_function(f"() => chat.state === {state!r}", timeout=WAIT_MS)


def wait_count(page: Any, count: int) -> None:
    page.wait_for_function(
        f"() => document.querySelectorAll('#messages li').length >= {count}", timeout=WAIT_MS
    )


def save_side_by_side(browser: Any, shots: list[bytes], path: Path) -> None:
    """Compose the pages' screenshots into one image (the browser does the layout)."""
    images = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(shot).decode()}" '
        'style="width:50%;border:1px solid #999">'
        for shot in shots
    )
    page = browser.new_page(viewport={"width": 1800, "height": 560})
    try:
        page.set_content(f'<body style="margin:0;display:flex">{images}</body>')
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
    finally:
        page.close()


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_dropped_page_catches_up_in_order_without_duplicates(
    demo_url: str, browser: Any, transport: str
) -> None:
    room = f"browser-{transport}-{uuid.uuid4().hex[:6]}"
    url = f"{demo_url}/?transport={transport}#{room}"
    context = browser.new_context(viewport={"width": 900, "height": 560})
    try:
        alice, bob = context.new_page(), context.new_page()
        for page, name in ((alice, "alice"), (bob, "bob")):
            page.goto(url)
            wait_state(page, "live")
            page.fill("#author", name)

        before = [f"before drop {i}" for i in range(1, 4)]
        for text in before:
            say(alice, text)
        wait_count(bob, 3)

        bob.click("#drop")
        wait_state(bob, "dropped")
        missed = [f"while away {i}" for i in range(1, 5)]
        for text in missed:
            say(alice, text)
        wait_count(alice, 7)
        assert len(messages(bob)) == 3, "a dropped page must not receive anything"

        bob.click("#drop")  # now labelled "Reconnect"
        wait_state(bob, "live")
        wait_count(bob, 7)
        say(alice, "after reconnect")
        wait_count(bob, 8)
        wait_count(alice, 8)

        shown = messages(bob)
        assert [text for _, text, _ in shown] == [*before, *missed, "after reconnect"]
        assert [offset for offset, _, _ in shown] == list(range(1, 9))
        # The messages missed while away arrive as catch-up, and are shown as such.
        assert [caught_up for _, _, caught_up in shown[3:7]] == [True] * 4
        assert messages(alice) == [(o, t, False) for o, t, _ in shown]
        state = chat_state(bob)
        assert state["gaps"] == 0
        assert state["duplicates"] == 0
        assert state["last"] == 8

        save_side_by_side(
            browser,
            [alice.screenshot(), bob.screenshot()],
            BUILD / f"chat-reconnect-{transport}.png",
        )
    finally:
        context.close()


def test_a_refused_message_stays_in_the_box_and_bad_rooms_are_said(
    demo_url: str, browser: Any
) -> None:
    """The text box was cleared before the server answered: a refused or unsent
    message was lost, and its notice stayed up after later messages went through."""
    room = f"refused-{uuid.uuid4().hex[:6]}"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{demo_url}/#{room}")
        wait_state(page, "live")
        # Over the server's limit for names (the page's own limit taken off).
        page.evaluate("() => document.querySelector('#author').removeAttribute('maxlength')")
        page.fill("#author", "x" * 50)
        say(page, "keep me")
        page.wait_for_function("() => !document.querySelector('#notice').hidden", timeout=WAIT_MS)
        assert page.input_value("#text") == "keep me"
        page.fill("#author", "alice")
        page.press("#text", "Enter")
        wait_count(page, 1)
        assert page.input_value("#text") == ""
        assert page.is_hidden("#notice")
        assert [text for _, text, _ in messages(page)] == ["keep me"]

        page.goto(f"{demo_url}/#not.a/room")
        page.wait_for_function("() => !document.querySelector('#notice').hidden", timeout=WAIT_MS)
        assert "not a room name" in page.text_content("#notice")
        wait_state(page, "live")
        assert page.evaluate("() => chat.room") == "lobby"
    finally:
        context.close()
