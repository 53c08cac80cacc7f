"""The on-chain console in Chromium: a dead withdrawal cancelled by an operator after a
confirmation with a reason, once the Circle sandbox (over HTTP) shows no transfer for it (the
hold returns to the user, the action is audited); one whose transfer Circle has is refused and
follows Circle; a viewer cannot act."""

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from playwright.sync_api import expect

from cutover.models import LegacyBalance, OperatorAudit
from onchain import circle
from onchain.exceptions import CircleUnavailable
from onchain.models import Withdrawal
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawal_request
from tests.browser.console import login
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import DESTINATION

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def circle_sandbox(settings):
    with CircleSandbox() as running:
        settings.CIRCLE_API_BASE_URL = running.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        yield running


@pytest.fixture
def dead_withdrawal():
    phase_set("shadow")
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "100")
    withdrawal = withdrawal_request(user_id=user_id, amount="40", address=DESTINATION, chain="ETH")
    Withdrawal.objects.filter(pk=withdrawal.pk).update(
        status="dead", attempts=8, last_error="Circle answered 503"
    )
    return withdrawal


def cancel_in_console(page, live_server, reason: str) -> None:
    page.goto(f"{live_server.url}/admin/onchain/withdrawal/?status__exact=dead")
    page.check("input.action-select")
    page.select_option("select[name=action]", "cancel")
    page.click("button[name=index]")
    expect(page.locator("h1")).to_have_text("Cancel withdrawals")
    page.fill("#id_reason", reason)
    page.click("#confirm")


def test_dead_withdrawal_cancelled_with_a_reason(
    live_server,
    browser_page,
    dead_withdrawal,
    circle_sandbox,
):
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
        == "cancelled by admin:operator: Circle shows no transfer for this key (ticket 42)"
    )
    assert LegacyBalance.objects.get(user_id=withdrawal.user_id).buying_power == Decimal(100)
    audit = OperatorAudit.objects.get()
    assert (audit.actor, audit.action, audit.target) == (
        "admin:operator",
        "withdrawal.cancel",
        f"withdrawal:{withdrawal.pk}",
    )
    assert (audit.before["status"], audit.after["status"]) == ("dead", "failed")


def test_cancel_of_a_withdrawal_circle_has_is_refused_in_the_console(
    live_server,
    browser_page,
    dead_withdrawal,
    circle_sandbox,
    settings,
):
    """Circle made the transfer but its answer was lost: the console says the cancel was
    refused, and the withdrawal follows Circle's transfer instead."""
    settings.CIRCLE_HTTP_TIMEOUT = 1.0
    circle_sandbox.answer_delay = 2.0
    with pytest.raises(CircleUnavailable):
        circle.transfer_create(
            base_url=circle_sandbox.base_url,
            idempotency_key=str(dead_withdrawal.idempotency_key),
            amount=dead_withdrawal.amount,
            address=dead_withdrawal.address,
            chain=dead_withdrawal.chain,
        )
    circle_sandbox.answer_delay = 0.0
    [transfer] = circle_sandbox.transfers.values()
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    page = browser_page
    login(page, live_server, "operator")
    cancel_in_console(page, live_server, "looks dead to me")
    expect(page.locator(".messagelist .error")).to_contain_text(
        f"not cancelled, Circle has its transfer {transfer['id']}"
    )
    withdrawal = Withdrawal.objects.get()
    assert (withdrawal.status, withdrawal.circle_transfer_id) == ("submitted", transfer["id"])
    assert LegacyBalance.objects.get(user_id=withdrawal.user_id).buying_power == Decimal(60)


def test_viewer_cannot_resend_or_cancel(live_server, browser_page, dead_withdrawal):
    user = User.objects.create_user("viewer", password="a-long-password-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_withdrawal"))
    page = browser_page
    login(page, live_server, "viewer")
    page.goto(f"{live_server.url}/admin/onchain/withdrawal/")
    # (the list shortens an address to its two ends; its page shows it whole)
    expect(page.locator("#result_list")).to_contain_text(f"{DESTINATION[:8]}…{DESTINATION[-6:]}")
    expect(page.locator("select[name=action] option[value=cancel]")).to_have_count(0)
    expect(page.locator("select[name=action] option[value=resend]")).to_have_count(0)
    assert Withdrawal.objects.get().status == "dead"
