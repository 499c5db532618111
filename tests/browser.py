"""Headless Chromium for the web chat's tests: the system's chromium, driven by Playwright.

Playwright never downloads a browser here: it is pointed at an installed
Chromium (Debian's ``chromium`` package; ``FREESKI_CHROMIUM`` names another
binary), and the tests skip, saying so, only where none is installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

# Headless on a machine without a GPU, a sandbox or a network: without the
# networking flags Chromium keeps trying to reach Google's services.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
NO_CHROMIUM = (
    "no Chromium for the browser tests: install Debian's chromium package "
    "(apt-get install chromium) or set FREESKI_CHROMIUM to a Chromium binary"
)


def chromium_path() -> str | None:
    """The Chromium binary to drive, or None when none is installed."""
    configured = os.environ.get("FREESKI_CHROMIUM")
    if configured:
        return configured
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Launch headless Chromium, or skip the test where none is installed."""
    path = chromium_path()
    if path is None:
        pytest.skip(NO_CHROMIUM)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=path, args=CHROMIUM_FLAGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            await browser.close()


class PageErrors:
    """Uncaught exceptions in the page's scripts: a test fails on any of them."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))


async def open_page(context: BrowserContext) -> tuple[Page, PageErrors]:
    page = await context.new_page()
    page.set_default_timeout(20_000)
    return page, PageErrors(page)
