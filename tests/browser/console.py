"""What every console test does in the browser first: log in as one of its operators."""

from playwright.sync_api import expect


def login(page, live_server, username: str) -> None:
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", "a-long-password-1")
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()
