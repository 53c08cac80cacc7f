"""The ledger console in a real browser (Debian's Chromium driven by Playwright): an operator
logs in, finds a user's account and its transaction, and has no way to change money."""

from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import expect

from ledger.models import Transaction
from tests.ledger.factories import UserAccountFactory, fund

pytestmark = pytest.mark.django_db(transaction=True)


def test_operator_reads_the_ledger_and_cannot_change_it(live_server, browser_page, tmp_path):
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    account = UserAccountFactory()
    fund(account, "123.45", reference="browser-opening")
    txn = Transaction.objects.get(reference_id="browser-opening")
    page = browser_page

    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "a-long-password-1")
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()

    page.goto(f"{live_server.url}/admin/ledger/account/?q={account.user_id}")
    row = page.locator("#result_list tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("123.450000")
    expect(page.locator("h1")).to_have_text("Select account to view")  # not "to change"
    expect(page.locator("#content a.addlink")).to_have_count(0)
    expect(page.locator("#nav-sidebar .app-ledger a.addlink")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "accounts.png"))

    page.goto(f"{live_server.url}/admin/ledger/transaction/{txn.pk}/change/")
    expect(page.locator("body")).to_contain_text("browser-opening")
    expect(page.locator("body")).to_contain_text("opening_balance")
    expect(page.locator("input[name=_save], input[name=_continue]")).to_have_count(0)
    expect(page.locator("a.deletelink")).to_have_count(0)

    account.refresh_from_db()
    assert account.balance == Decimal("123.45")
