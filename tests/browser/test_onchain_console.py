"""The on-chain console in Chromium: a dead withdrawal cancelled by an operator after a
confirmation with a reason (the hold returns to the user); a viewer cannot act."""

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from playwright.sync_api import expect

from cutover.models import LegacyBalance
from onchain.models import Withdrawal
from onchain.services import withdrawal_request
from tests.browser.test_cutover_console import login
from tests.browser.test_ledger_console import browser_page  # noqa: F401 (fixture)
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dead_withdrawal():
    phase_set("shadow")
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "100")
    withdrawal = withdrawal_request(user_id=user_id, amount="40", address="0xdest", chain="ETH")
    Withdrawal.objects.filter(pk=withdrawal.pk).update(
        status="dead", attempts=8, last_error="Circle answered 503"
    )
    return withdrawal


def test_dead_withdrawal_cancelled_with_a_reason(live_server, browser_page, dead_withdrawal):  # noqa: F811
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    page = browser_page
    login(page, live_server, "operator")
    page.goto(f"{live_server.url}/admin/onchain/withdrawal/?status__exact=dead")
    page.check("input.action-select")
    page.select_option("select[name=action]", "cancel")
    page.click("button[name=index]")
    expect(page.locator("h1")).to_have_text("Cancel withdrawals")
    page.click("#confirm")  # no reason: the browser does not submit the form
    expect(page.locator("#id_reason:invalid")).to_have_count(1)
    assert Withdrawal.objects.get().status == "dead"
    page.fill("#id_reason", "Circle shows no transfer for this key (ticket 42)")
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text("failed")
    withdrawal = Withdrawal.objects.get()
    assert withdrawal.status == "failed"
    assert (
        withdrawal.last_error
        == "cancelled by operator: Circle shows no transfer for this key (ticket 42)"
    )
    assert LegacyBalance.objects.get(user_id=withdrawal.user_id).buying_power == Decimal(100)


def test_viewer_cannot_resend_or_cancel(live_server, browser_page, dead_withdrawal):  # noqa: F811
    user = User.objects.create_user("viewer", password="a-long-password-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_withdrawal"))
    page = browser_page
    login(page, live_server, "viewer")
    page.goto(f"{live_server.url}/admin/onchain/withdrawal/")
    expect(page.locator("#result_list")).to_contain_text("0xdest")
    expect(page.locator("select[name=action] option[value=cancel]")).to_have_count(0)
    expect(page.locator("select[name=action] option[value=resend]")).to_have_count(0)
    assert Withdrawal.objects.get().status == "dead"
