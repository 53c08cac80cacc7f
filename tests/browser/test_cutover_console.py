"""The cutover console in Chromium: the kill switch with its confirmation, and resolving a
discrepancy with a note; both land in the audit trail / the row, attributed to the operator."""

import pytest
from django.contrib.auth.models import Permission, User
from playwright.sync_api import expect

from cutover.actors import Actor
from cutover.models import Discrepancy, OperatorAudit, PhaseAudit, PhaseState
from cutover.phase_machine import kill_switch_set
from tests.browser.console import login
from tests.cutover.factories import legacy_user

pytestmark = pytest.mark.django_db(transaction=True)


def test_kill_switch_needs_confirmation_and_a_reason(live_server, browser_page, tmp_path):
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    page = browser_page
    login(page, live_server, "operator")
    page.goto(f"{live_server.url}/admin/cutover/phasestate/1/change/")
    expect(page.locator("body")).to_contain_text("USE_LEDGER_INTEGRATION=False")
    page.click("#kill-switch-link")
    expect(page.locator("h1")).to_have_text("Engage the kill switch")
    page.click("#confirm")  # no reason: the browser does not submit the form
    expect(page.locator("#id_reason:invalid")).to_have_count(1)
    expect(page.locator("h1")).to_have_text("Engage the kill switch")
    assert not PhaseState.objects.get(pk=1).kill_switch
    page.fill("#id_reason", "payments incident 17")
    page.screenshot(path=str(tmp_path / "kill-switch-confirm.png"))
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text("Kill switch engaged")
    state = PhaseState.objects.get(pk=1)
    assert state.kill_switch and state.kill_switch_reason == "payments incident 17"
    audit = PhaseAudit.objects.get(action="kill_switch_on")
    assert audit.actor == "admin:operator"


def test_kill_switch_does_what_was_confirmed_even_if_someone_else_flipped_it(
    live_server,
    browser_page,
):
    """Issue 9 item 8: the confirmed intent travels with the form. The page said "engage";
    someone engaged meanwhile; the POST must not release."""
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    page = browser_page
    login(page, live_server, "operator")
    page.goto(f"{live_server.url}/admin/cutover/phasestate/1/change/")
    page.click("#kill-switch-link")
    expect(page.locator("h1")).to_have_text("Engage the kill switch")
    kill_switch_set(engaged=True, actor=Actor("cli:oncall"), reason="incident 18")
    page.fill("#id_reason", "payments incident 17")
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text(
        "Nothing changed: the kill switch is already on"
    )
    state = PhaseState.objects.get(pk=1)
    assert state.kill_switch and state.kill_switch_reason == "incident 18"
    kill_switch_audits = PhaseAudit.objects.filter(action__startswith="kill_switch")
    assert list(kill_switch_audits.values_list("action", "actor")) == [
        ("kill_switch_on", "cli:oncall")
    ]


def test_operator_without_permission_is_refused(live_server, browser_page):
    user = User.objects.create_user("viewer", password="a-long-password-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_phasestate"))
    page = browser_page
    login(page, live_server, "viewer")
    page.goto(f"{live_server.url}/admin/cutover/phasestate/1/change/")
    page.click("#kill-switch-link")
    page.fill("#id_reason", "trying")
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text("lacks the permission")
    assert not PhaseState.objects.get(pk=1).kill_switch
    assert not PhaseAudit.objects.filter(action="kill_switch_on").exists()


def test_discrepancy_resolved_with_a_note(live_server, browser_page):
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    user_id = legacy_user("5")
    Discrepancy.objects.create(
        user_id=user_id,
        currency="USDC",
        legacy_balance=5,
        ledger_balance=4,
        difference=1,
        source="reconciliation",
        phase="shadow",
    )
    page = browser_page
    login(page, live_server, "operator")
    page.goto(f"{live_server.url}/admin/cutover/discrepancy/?status__exact=open")
    page.check("input.action-select")
    page.select_option("select[name=action]", "resolve")
    page.click("button[name=index]")
    page.fill("#id_note", "legacy corrected by support ticket 881")
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text("1 discrepancies resolved")
    discrepancy = Discrepancy.objects.get()
    assert discrepancy.status == "resolved"
    assert discrepancy.resolved_by == "admin:operator"
    assert discrepancy.resolution_note == "legacy corrected by support ticket 881"
    audit = OperatorAudit.objects.get(target=f"discrepancy:{discrepancy.pk}")
    assert (audit.actor, audit.action) == ("admin:operator", "discrepancy.resolve")
    assert audit.before == {"status": "open"} and audit.after["status"] == "resolved"
    assert audit.reason == "legacy corrected by support ticket 881"
