"""The cockpit in Chromium, as an operator on call: the state at a glance, an advance whose gate
is not met (refused, its evidence shown), the same gate forced with a reason, the kill switch
engaged and released (its banner on another admin page, then gone), and a rollback from
cutover that needs the target phase typed. Screenshots of the cockpit and its charts are saved
under the test's tmp_path; their paths are printed (pytest -s shows them)."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from playwright.sync_api import expect

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.models import BalanceMutation, Discrepancy, LegacyBalance, PhaseAudit, PhaseState
from cutover.phase_machine import phase_advance
from cutover.phases import Phase
from cutover.reconciliation import reconciliation_run
from tests.browser.console import login
from tests.cutover.factories import custody_open_all, ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
CLI = Actor("cli:oncall")


def screenshot(target, path) -> None:
    target.screenshot(path=str(path))
    print(f"screenshot: {path}")


def a_rollout_in_shadow() -> None:
    """Legacy users backfilled, custody open, advanced to shadow through the service, some
    traffic, a discrepancy found yesterday and repaired today, a clean reconciliation."""
    users = [legacy_user(amount) for amount in ("120.50", "75", "1999.99", "42")]
    custody_open_all(usdc="25000", usd="60000")
    backfill_run()
    phase_advance(to=Phase.SHADOW, actor=CLI, reason="backfill verified")
    for n, user in enumerate(users):
        balance_credit(user_id=user, amount="10", reference=f"c{n}", reason="deposit")
    balance_debit(user_id=users[0], amount="5.25", reference="d0", reason="payment")
    yesterday = timezone.now() - timedelta(days=1)
    Discrepancy.objects.create(
        user_id=users[1],
        currency="USDC",
        legacy_balance=85,
        ledger_balance=84,
        difference=1,
        source="reconciliation",
        phase="shadow",
        first_seen_at=yesterday,
        status="resolved",
        resolved_at=timezone.now(),
        resolved_by="reconciliation",
    )
    reconciliation_run(triggered_by="celery")


# The shadow experiment's earlier hours, as the journal would hold them: per hour before this
# one, (legacy_us, ledger_us, mismatch) of each dual write.
EARLIER_HOURS = {
    6: [(900, 1900, False), (1400, 2600, False), (1100, 2300, False)],
    5: [(1000, 2100, False), (1700, 3900, True), (1200, 2500, False), (950, 2000, False)],
    4: [(800, 1800, False), (1300, 2900, False)],
    3: [(1100, 2400, False), (2100, 5200, True), (1000, 2200, False), (1050, 2150, True)],
    2: [(900, 2000, False), (1250, 2700, False), (980, 2050, False)],
    1: [(1000, 2200, False), (1150, 2450, False)],
}


def earlier_hours_of_the_experiment(user) -> None:
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for back, writes in EARLIER_HOURS.items():
        for n, (legacy_us, ledger_us, mismatch) in enumerate(writes):
            BalanceMutation.objects.create(
                reference=f"earlier-{back}-{n}",
                user_id=user,
                direction="credit",
                amount=1,
                currency="USDC",
                reason="deposit",
                phase="shadow",
                ledger_status="posted",
                created_at=hour - timedelta(hours=back, minutes=-10 * n),
                legacy_us=legacy_us,
                ledger_us=ledger_us,
                mismatch=mismatch,
            )


def test_operator_reads_the_rollout_forces_a_gate_and_flips_the_kill_switch(
    live_server, browser_page, tmp_path
):
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    a_rollout_in_shadow()
    earlier_hours_of_the_experiment(Discrepancy.objects.get().user_id)
    page = browser_page
    page.set_viewport_size({"width": 1440, "height": 900})
    login(page, live_server, "operator")

    # At a glance
    expect(page.locator("#cockpit-phase")).to_have_text("shadow")
    expect(page.locator("#cockpit-time-in-phase")).to_contain_text("minute")
    expect(page.locator("#cockpit-read-percent")).to_have_text("0 %")
    expect(page.locator("#cockpit-kill-switch")).to_have_text("off")
    expect(page.locator("#cockpit-open-discrepancies")).to_have_text("0")
    expect(page.locator("#cockpit-reconciliation-age")).to_contain_text("ago")
    expect(page.locator("#cockpit-write-rate")).to_have_text("100.00%")
    expect(page.locator("#gate-heading")).to_contain_text("shadow → read_switch, not met")
    time_row = page.locator('#gate-table tr[data-check="time_in_phase"]')
    expect(time_row.locator("td").nth(1)).to_have_text("not met")
    expect(time_row.locator("td").nth(3)).to_have_text(">= 2 days, 0:00:00")
    reconciliation_row = page.locator('#gate-table tr[data-check="reconciliation"]')
    expect(reconciliation_row.locator("td").nth(1)).to_have_text("met")
    expect(page.locator('#buffers tr[data-buffer="usdc_buffer"]')).to_contain_text(
        "25,000.000000 USDC"
    )
    charts = page.locator("#charts svg.chart")
    expect(charts).to_have_count(6)
    for chart in charts.all():  # each an image with its name, drawn by the browser
        assert chart.get_attribute("role") == "img"
        assert chart.bounding_box()["width"] > 300
    bars = page.locator("#chart-discrepancies rect.bar title")
    expect(bars.filter(has_text="opened 1")).to_have_count(1)
    expect(bars.filter(has_text="resolved 1")).to_have_count(1)
    expect(page.locator("#chart-timeline rect.segment title").first).to_contain_text("legacy")
    # The shadow experiment: both stores' times as lines, the mismatch rate as bars, and the
    # figures in a table under it (the 5 mutations of a_rollout_in_shadow timed for real).
    experiment = page.locator("#chart-experiment")
    expect(experiment.locator("polyline.line")).to_have_count(4)
    expect(
        experiment.locator("rect.bar title").filter(has_text="mismatch rate 50 %")
    ).to_have_count(1)
    rows = page.locator("#table-experiment tbody tr")
    assert rows.count() >= len(EARLIER_HOURS) + 1
    figures = [[cell.inner_text() for cell in row.locator("td").all()] for row in rows.all()]
    assert sum(int(row[1]) for row in figures) == sum(map(len, EARLIER_HOURS.values())) + 5
    assert sum(int(row[2]) for row in figures) == 3
    assert ["4", "2", "50 %", "1.05", "2.10", "2.20", "5.20"] in [row[1:] for row in figures]
    assert all(float(row[3 + n]) > 0 for row in figures for n in range(1, 5))
    screenshot(page.locator("#figure-chart-experiment"), tmp_path / "cockpit-experiment.png")
    screenshot(page.locator("#cockpit-state"), tmp_path / "cockpit-at-a-glance.png")
    page.screenshot(path=str(tmp_path / "cockpit.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'cockpit.png'}")
    screenshot(page.locator("#charts"), tmp_path / "cockpit-charts.png")

    # An advance whose gate is not met: refused, in words, with its evidence
    page.click("#advance-submit")
    refusal = page.locator("#refusal")
    expect(refusal).to_contain_text("Advance refused, nothing changed")
    expect(refusal).to_contain_text("gate shadow -> read_switch not met: time_in_phase")
    refused_time = refusal.locator('tr[data-check="time_in_phase"] td')
    expect(refused_time.nth(1)).to_have_text("not met")
    screenshot(page.locator("#cockpit"), tmp_path / "cockpit-advance-refused.png")
    assert PhaseState.objects.get(pk=1).phase == "shadow"

    # Forced, with a reason
    page.fill("#id_force-reason", "change board CR-2231: 48 h waived for the drill")
    page.select_option("#id_force-read_percent", "10")
    page.click("#force-submit")
    expect(page.locator(".messagelist")).to_contain_text("Forced shadow -> read_switch")
    expect(page.locator("#cockpit-phase")).to_have_text("read_switch")
    expect(page.locator("#cockpit-read-percent")).to_have_text("10 %")
    state = PhaseState.objects.get(pk=1)
    assert (state.phase, state.read_percent) == ("read_switch", 10)
    forced = PhaseAudit.objects.get(action="force")
    assert (forced.actor, forced.reason) == (
        "admin:operator",
        "change board CR-2231: 48 h waived for the drill",
    )

    # The kill switch: engaged, its banner on another admin page, released, gone
    page.fill("#id_kill-reason", "payments incident 21")
    page.click("#kill-switch-submit")
    expect(page.locator("#kill-switch-banner")).to_contain_text("admin:operator")
    expect(page.locator("#cockpit-kill-switch")).to_have_text("ON")
    page.goto(f"{live_server.url}/admin/cutover/discrepancy/")
    banner = page.locator("#kill-switch-banner")
    expect(banner).to_contain_text("Kill switch on")
    expect(banner).to_contain_text("by admin:operator")
    expect(banner).to_contain_text("payments incident 21")
    screenshot(page, tmp_path / "kill-switch-banner.png")
    assert PhaseState.objects.get(pk=1).kill_switch
    page.click("#kill-switch-banner a")
    page.fill("#id_kill-reason", "incident 21 over")
    page.click("#kill-switch-submit")
    expect(page.locator(".messagelist")).to_contain_text("Kill switch released")
    page.goto(f"{live_server.url}/admin/cutover/discrepancy/")
    expect(page.locator("#kill-switch-banner")).to_have_count(0)
    assert not PhaseState.objects.get(pk=1).kill_switch
    assert list(
        PhaseAudit.objects.filter(action__startswith="kill_switch")
        .order_by("id")
        .values_list("action", "actor")
    ) == [("kill_switch_on", "admin:operator"), ("kill_switch_off", "admin:operator")]


def test_rollback_from_cutover_needs_the_target_phase_typed(live_server, browser_page, tmp_path):
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    users = [legacy_user(amount) for amount in ("10", "20.5")]
    for user, amount in zip(users, ("10", "20.5"), strict=True):
        ledger_balance_set(user, amount)
    phase_set("cutover", read_percent=100)
    page = browser_page
    page.set_viewport_size({"width": 1440, "height": 900})
    login(page, live_server, "operator")
    expect(page.locator("#gate-heading")).to_contain_text("cutover is terminal")
    expect(page.locator("#advance-form")).to_have_count(0)

    page.fill("#id_rollback-reason", "ledger incident 22")
    page.fill("#id_rollback-confirm_phase", "cutover")  # the phase it leaves, not the target
    page.click("#rollback-submit")
    expect(page.locator("#refusal")).to_contain_text(
        "the rollback goes to legacy; you typed 'cutover', so nothing was rolled back"
    )
    expect(page.locator("#id_rollback-reason")).to_have_value("ledger incident 22")  # kept
    screenshot(page.locator("#cockpit"), tmp_path / "rollback-refused.png")
    assert PhaseState.objects.get(pk=1).phase == "cutover"

    page.fill("#id_rollback-confirm_phase", "legacy")
    page.click("#rollback-submit")
    expect(page.locator(".messagelist")).to_contain_text(
        "Rolled back cutover -> legacy. The legacy store was rebuilt from the ledger"
    )
    expect(page.locator("#cockpit-phase")).to_have_text("legacy")
    assert PhaseState.objects.get(pk=1).phase == "legacy"
    rollback = PhaseAudit.objects.get(action="rollback")
    assert (rollback.actor, rollback.reason) == ("admin:operator", "ledger incident 22")
    assert sorted(LegacyBalance.objects.values_list("buying_power", flat=True)) == [10, 20.5]
