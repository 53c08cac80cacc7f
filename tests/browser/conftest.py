"""The console tests' browser: Debian's Chromium driven by Playwright, one page per test."""

import os

import pytest
from django.db import connections
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser_page(tmp_path):
    # Playwright's sync API runs an event loop in this thread; the test's ORM calls happen
    # outside it, before and after, so Django's async guard can be relaxed for this test.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        yield page
        page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        browser.close()
        # While the loop runs, Django keeps the test's connection in a storage of the loop's
        # own: closed here, or it outlives the test and blocks dropping the test database.
        connections.close_all()
    del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
