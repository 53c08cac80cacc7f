"""The cutover console in Chromium: the kill switch with its confirmation (and no link for who
may not use it), and a discrepancy worked by two operators: triaged, then repaired on request of
one and approval of the other; each step in the audit trail, attributed to its operator."""

import pytest
from django.contrib.auth.models import Permission, User
from playwright.sync_api import expect

from cutover.actors import Actor
from cutover.models import Discrepancy, DiscrepancyRepair, OperatorAudit, PhaseAudit, PhaseState
from cutover.phase_machine import kill_switch_set
from cutover.reconciliation import reconciliation_run
from tests.browser.console import login
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)


def test_kill_switch_needs_confirmation_and_a_reason(live_server, browser_page, tmp_path):
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    page = browser_page
    login(page, live_server, "operator")
    page.goto(f"{live_server.url}/admin/cutover/phasestate/1/change/")
    expect(page.locator("body")).to_contain_text("USE_LEDGER_INTEGRATION=false")
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


def test_operator_without_permission_sees_no_kill_switch_and_is_refused(live_server, browser_page):
    user = User.objects.create_user("viewer", password="a-long-password-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_phasestate"))
    page = browser_page
    login(page, live_server, "viewer")
    page.goto(f"{live_server.url}/admin/cutover/phasestate/1/change/")
    expect(page.locator("body")).to_contain_text("USE_LEDGER_INTEGRATION=false")
    expect(page.locator("#kill-switch-link")).to_have_count(0)
    page.goto(f"{live_server.url}/admin/cutover/phasestate/kill-switch/")  # typed by hand
    page.fill("#id_reason", "trying")
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text("lacks the permission")
    assert not PhaseState.objects.get(pk=1).kill_switch
    assert not PhaseAudit.objects.filter(action="kill_switch_on").exists()


def operator(username: str, *codenames: str) -> None:
    user = User.objects.create_user(username, password="a-long-password-1", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=("view_discrepancy", *codenames))
    )


def test_a_discrepancy_triaged_then_repaired_by_two_operators(live_server, browser_page, tmp_path):
    """One operator investigates, accepts the difference as known (it stops counting), then
    requests a repair of the ledger; she cannot approve it herself; a second operator approves
    it; the next reconciliation finds the user equal and opens nothing."""
    print(f"screenshots: {tmp_path}")
    operator(
        "rita", "triage_discrepancy", "request_discrepancy_repair", "approve_discrepancy_repair"
    )
    operator("alex", "approve_discrepancy_repair")
    phase_set("shadow")
    user_id = legacy_user("1250.75")
    ledger_balance_set(user_id, "1200")
    reconciliation_run(triggered_by="test")
    discrepancy = Discrepancy.objects.get(user_id=user_id)
    url = f"{live_server.url}/admin/cutover/discrepancy/{discrepancy.pk}/change/"
    page = browser_page
    page.set_viewport_size({"width": 1280, "height": 900})
    login(page, live_server, "rita")
    page.goto(url)
    expect(page.locator("h1")).to_have_text(f"Discrepancy {discrepancy.pk}")
    expect(page.locator("input[name=_save], input[name=_continue]")).to_have_count(0)
    expect(page.locator("body")).not_to_contain_text("Change discrepancy")
    expect(page.locator("#discrepancy-facts")).to_contain_text("50.750000 USDC")
    expect(page.locator("#discrepancy-facts")).to_contain_text("1,250.750000 USDC")
    expect(page.locator("#counted")).to_have_text("yes")
    page.screenshot(path=str(tmp_path / "discrepancy-open.png"), full_page=True)

    page.fill("#investigate textarea[name=note]", "support ticket 881")
    page.click("#investigate input[type=submit]")
    expect(page.locator(".messagelist")).to_contain_text("is under investigation")
    expect(page.locator("#triage-status")).to_have_text("Investigating")

    page.fill("#known textarea[name=reason]", "a fee the legacy system never charged")
    page.select_option("#known select[name=expires_in]", "3")
    page.click("#known input[type=submit]")
    expect(page.locator(".messagelist")).to_contain_text("does not count against the gates")
    expect(page.locator("#counted")).to_have_text("no")
    expect(page.locator("#known-difference")).to_contain_text("in 2 days")

    page.check("#repair input[name=side][value=ledger]")
    page.fill("#repair textarea[name=reason]", "the shadow write of r-77 was lost")
    page.click("#repair input[type=submit]")
    expect(page.locator(".messagelist")).to_contain_text("waits for another operator's approval")
    repair = DiscrepancyRepair.objects.get()
    expect(page.locator(f"#repair-{repair.pk}")).to_contain_text("another operator approves it")
    expect(page.locator(f"#approve-repair-{repair.pk}")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "discrepancy-repair-requested.png"), full_page=True)

    page.context.clear_cookies()
    login(page, live_server, "alex")
    page.goto(url)
    expect(page.locator("#triage")).to_have_count(0)  # alex may approve, not triage
    page.click(f"#approve-repair-{repair.pk}")
    expect(page.locator(".messagelist")).to_contain_text(
        f"Repair {repair.pk} applied: the ledger now holds 1,250.750000 USDC"
    )
    expect(page.locator("#triage-status")).to_have_text("Repaired")
    expect(page.locator(f"#repair-{repair.pk} .repair-status")).to_contain_text(
        "approved by admin:alex"
    )
    expect(page.locator("#history")).to_contain_text("discrepancy.repair_request")
    page.screenshot(path=str(tmp_path / "discrepancy-repaired.png"), full_page=True)

    run = reconciliation_run(triggered_by="test")
    assert (run.differences, run.new_discrepancies) == (0, 0)
    assert list(Discrepancy.objects.values_list("status", flat=True)) == ["repaired"]
    assert list(
        OperatorAudit.objects.filter(target=f"discrepancy:{discrepancy.pk}")
        .order_by("id")
        .values_list("action", "actor")
    ) == [
        ("discrepancy.investigate", "admin:rita"),
        ("discrepancy.known_difference", "admin:rita"),
        ("discrepancy.repair_request", "admin:rita"),
        ("discrepancy.repair", "admin:alex"),
    ]
