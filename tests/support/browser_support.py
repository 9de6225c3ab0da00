"""Headless Chromium for the browser tests: Debian's ``chromium`` driven by Playwright.

Playwright's own browser download is not used. A test module calls
:func:`require_chromium` at import: it skips the module when Playwright or Chromium
is missing, except under ``CI=true`` where a missing Chromium fails.

Needs: ``apt-get install -y chromium`` and ``pip install playwright``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("BH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Screenshots go here (not committed).
BUILD = Path(__file__).resolve().parents[2] / "build"  # the checkout's build/
WAIT_MS = 15_000


def require_chromium() -> Any:
    """Playwright's sync API, or skip (fail under ``CI=true``) the calling module."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    if not Path(CHROMIUM).exists():
        why = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; .ci/run installs it", pytrace=False)
        pytest.skip(why, allow_module_level=True)
    return sync_api


@contextmanager
def chromium(sync_api: Any) -> Iterator[Any]:
    """A headless Chromium browser for the duration of the block."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
