"""The operators' cockpit (the admin index): the rollout at a glance, the kill-switch banner on
every admin page, the actions through the phase machine's services (each refusal said in words
with its status, nothing changed), and the history its charts are drawn from."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from config.cockpit import cockpit_read
from cutover.actors import Actor
from cutover.balance_path import balance_credit
from cutover.history import (
    discrepancies_per_bucket,
    kill_switch_periods,
    ledger_writes_per_bucket,
    phase_periods,
)
from cutover.models import (
    BalanceMutation,
    Discrepancy,
    PhaseAudit,
    PhaseState,
    ReconciliationRun,
    StrictFailure,
)
from cutover.phase_machine import kill_switch_set
from ledger.selectors import USDC_BUFFER, account_balance_history
from tests.cutover.factories import custody_open_all, legacy_user, phase_set
from tests.treasury.factories import job_make
from treasury.models import ConversionJob

pytestmark = pytest.mark.django_db
CLI = Actor("cli:test")


@pytest.fixture
def operator(client):
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw-long-enough-1"))
    return client


def phase() -> PhaseState:
    return PhaseState.objects.get(pk=1)


def discrepancy(user_id, **fields) -> Discrepancy:
    return Discrepancy.objects.create(
        user_id=user_id,
        currency="USDC",
        legacy_balance=5,
        ledger_balance=4,
        difference=1,
        source=fields.pop("source", "reconciliation"),
        phase="shadow",
        **fields,
    )


def check_row(page: str, name: str) -> str:
    """The gate table's row of check `name`, its cells' text joined by |."""
    row = re.search(rf'<tr class="gate-check" data-check="{name}">(.*?)</tr>', page, re.S)
    assert row, f"no gate row {name}"
    return "|".join(c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S))


def test_the_rollout_at_a_glance(operator):
    phase_set("shadow")
    discrepancy(legacy_user("5"))
    now = timezone.now()
    ReconciliationRun.objects.create(
        started_at=now - timedelta(hours=2, minutes=1),
        finished_at=now - timedelta(hours=2),
        status="completed",
        phase="shadow",
        users_checked=1,
        differences=1,
        new_discrepancies=1,
        resolved=0,
        legacy_total=5,
        ledger_total=4,
        triggered_by="celery",
    )
    response = operator.get("/admin/")
    assert response.status_code == 200
    page = response.content.decode()
    assert re.search(r'id="cockpit-phase">shadow<', page)
    assert re.search(r'id="cockpit-time-in-phase">0\xa0minutes<', page)  # in words
    assert 'id="cockpit-read-percent">0 %<' in page
    assert 'id="cockpit-kill-switch">off<' in page
    assert re.search(r'id="cockpit-open-discrepancies">1<', page)
    assert re.search(r'id="cockpit-reconciliation-age">2\xa0hours ago<', page)
    assert 'id="cockpit-dead-withdrawals">0<' in page
    assert 'id="cockpit-parked-notifications">0<' in page
    # the next gate, live: met or not, the figure, the threshold
    assert "Next gate: shadow &rarr; read_switch" in page
    assert check_row(page, "open_discrepancies") == "open_discrepancies|not met|1|0"
    assert check_row(page, "time_in_phase").startswith("time_in_phase|not met|0:00:")
    assert check_row(page, "ledger_write_success").endswith("|no ledger writes yet|&gt;= 99.9%")
    # the buffers against their bands, as people read amounts
    usdc = re.search(r'<tr data-buffer="usdc_buffer">(.*?)</tr>', page, re.S).group(1)
    assert "0.000000 USDC" in usdc and "5,000.000000 USDC to 100,000.000000 USDC" in usdc
    assert "below its minimum" in usdc
    # the charts, drawn in the page
    charts = re.findall(r'<svg class="chart" id="([^"]+)"', page)
    assert charts == [
        "chart-discrepancies",
        "chart-write-success",
        "chart-experiment",
        "chart-buffer-usd",
        "chart-buffer-usdc",
        "chart-timeline",
    ]
    assert re.search(r'<p class="chart-empty" id="table-experiment">No dual writes since', page)
    # an operator with every permission sees every action that applies
    for form in ("advance-form", "force-form", "rollback-form", "kill-switch-form"):
        assert f'id="{form}"' in page


def test_conversion_jobs_only_an_operator_can_end_are_in_view(operator):
    """A disputed job (job_resolve) and a completed one Due refunded (job_reverse) are counted
    on the cockpit, each linked to its list; none, the card is quiet."""
    page = operator.get("/admin/").content.decode()
    assert 'id="cockpit-jobs-for-an-operator">0<' in page
    assert re.search(r'class="cockpit-card ok" id="card-jobs"', page)
    job_make(reference="tf_disputed", status="disputed")
    job_make(reference="tf_refunded", status="submitted")
    ConversionJob.objects.filter(provider_reference="tf_refunded").update(
        status="completed", provider_status="refund_processed"
    )
    job_make(reference="tf_fine", status="submitted")
    page = operator.get("/admin/").content.decode()
    assert 'id="cockpit-jobs-for-an-operator">2<' in page
    assert re.search(r'class="cockpit-card alert" id="card-jobs"', page)
    assert "?status__exact=disputed" in page and "?provider_status=refund_processed" in page
    assert re.search(r"1 disputed.*1 refunded", page, re.DOTALL)


def test_the_shadow_experiment_per_hour_as_a_chart_and_a_table(operator):
    """The journal's timings and mismatches per hour: both stores' p50 and p95 as lines, the
    mismatch rate as bars on the right axis, the same figures in the table under the chart."""
    user = legacy_user("5")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    made = iter(range(100))
    for at, legacy_us, ledger_us, mismatch in (
        (hour - timedelta(hours=3, minutes=-5), 1500, 3000, False),
        (hour - timedelta(hours=3, minutes=-6), 2500, 5000, True),
        (hour - timedelta(hours=1, minutes=-1), 800, 1200, False),
    ):
        BalanceMutation.objects.create(
            reference=f"r{next(made)}",
            user_id=user,
            direction="credit",
            amount=1,
            currency="USDC",
            reason="t",
            phase="shadow",
            ledger_status="posted",
            created_at=at,
            legacy_us=legacy_us,
            ledger_us=ledger_us,
            mismatch=mismatch,
        )
    page = operator.get("/admin/").content.decode()
    three, one = (f"{hour - timedelta(hours=h):%d %H:%M}" for h in (3, 1))

    table = re.search(r'<table class="chart-table" id="table-experiment">(.*?)</table>', page, re.S)
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table[1])]
    assert cells == [
        [],  # the header row
        [three, "2", "1", "50 %", "1.50", "2.50", "3.00", "5.00"],
        [one, "1", "0", "0 %", "0.80", "0.80", "1.20", "1.20"],
    ]
    svg = re.search(r'<svg class="chart" id="chart-experiment".*?</svg>', page, re.S)[0]
    points = re.findall(r'<circle class="point"[^>]*><title>(.*?)</title>', svg)
    assert sorted(points) == sorted(
        [
            f"{three}: legacy p50 1.50",
            f"{three}: legacy p95 2.50",
            f"{three}: ledger p50 3.00",
            f"{three}: ledger p95 5.00",
            f"{one}: legacy p50 0.80",
            f"{one}: legacy p95 0.80",
            f"{one}: ledger p50 1.20",
            f"{one}: ledger p95 1.20",
        ]
    )
    bars = re.findall(r'<rect class="bar"[^>]*><title>(.*?)</title>', svg)
    assert bars == [f"{three}: mismatch rate 50 %", f"{one}: mismatch rate 0 %"]
    assert re.findall(r'class="right-tick"[^>]*>([^<]*)<', svg) == [
        "0 %",
        "10 %",
        "20 %",
        "30 %",
        "40 %",
        "50 %",
    ]
    assert "3 dual writes, 1 of them mismatched (0 failed in strict)" in svg


def test_kill_switch_banner_on_every_admin_page_while_on(operator):
    assert (
        'id="kill-switch-banner"'
        not in operator.get("/admin/cutover/discrepancy/").content.decode()
    )
    kill_switch_set(engaged=True, actor=Actor("cli:oncall"), reason="payments incident 18")
    for url in ("/admin/", "/admin/cutover/discrepancy/", "/admin/ledger/account/"):
        page = operator.get(url).content.decode()
        banner = re.search(r'<div class="errornote" id="kill-switch-banner".*?</div>', page, re.S)
        assert banner, url
        assert "cli:oncall" in banner.group(0) and "payments incident 18" in banner.group(0)
    kill_switch_set(engaged=False, actor=CLI, reason="incident over")
    assert (
        'id="kill-switch-banner"'
        not in operator.get("/admin/cutover/discrepancy/").content.decode()
    )


def post(client, action: str, **fields):
    prefix = {"read-percent": "reads", "kill-switch": "kill"}.get(action, action)
    data = {f"{prefix}-{name}": value for name, value in fields.items()}
    return client.post(f"/admin/cockpit/{action}", data)


def refusal(response) -> str:
    found = re.search(
        r'<div class="errornote" id="refusal".*?</strong>(.*?)\.\s', response.content.decode(), re.S
    )
    assert found, response.content.decode()[:500]
    return found.group(1).strip()


# The gate's evidence is taken in a REPEATABLE READ snapshot of its own, as in production
# (phase_advance outside any transaction): not inside the test's.
@pytest.mark.django_db(transaction=True)
def test_an_advance_whose_gate_is_not_met_is_refused_with_its_evidence(operator):
    phase_set("shadow")
    response = post(operator, "advance", seen_phase="shadow", to="read_switch", read_percent=1)
    assert response.status_code == 409
    assert refusal(response).startswith("gate shadow -&gt; read_switch not met: time_in_phase")
    page = response.content.decode()
    evidence = page[page.index('id="refusal"') : page.index('id="cockpit-state"')]
    assert check_row(evidence, "reconciliation") == (
        "reconciliation|not met|none yet|a clean full run in this phase"
    )
    assert phase().phase == "shadow"
    assert not PhaseAudit.objects.exclude(action="seed").exists()


# The gate's evidence is taken in a REPEATABLE READ snapshot of its own, as in production
# (phase_advance outside any transaction): not inside the test's.
@pytest.mark.django_db(transaction=True)
def test_force_needs_a_reason_then_passes_audited_as_forced(operator):
    phase_set("shadow")
    response = post(operator, "force", seen_phase="shadow", to="read_switch", read_percent=10)
    assert response.status_code == 400
    assert refusal(response).startswith("reason: This field is required")
    assert phase().phase == "shadow"

    response = post(
        operator,
        "force",
        seen_phase="shadow",
        to="read_switch",
        read_percent=10,
        reason="drill: gate waived by the change board",
    )
    assert response.status_code == 302 and response["Location"] == "/admin/"
    state = phase()
    assert (state.phase, state.read_percent) == ("read_switch", 10)
    audit = PhaseAudit.objects.get(action="force")
    assert (audit.actor, audit.reason) == ("admin:op", "drill: gate waived by the change board")
    page = operator.get("/admin/").content.decode()
    assert "Forced shadow -&gt; read_switch past a gate that was not met" in page

    # in read_switch, the read percentage steps that are left
    assert cockpit_read().read_steps == [50, 100]
    response = post(operator, "read-percent", seen_phase="read_switch", read_percent=50)
    assert response.status_code == 302 and phase().read_percent == 50
    response = post(operator, "read-percent", seen_phase="read_switch", read_percent=10)
    assert response.status_code == 409
    assert refusal(response) == (
        "read percentage can only grow (now 50 %, asked 10 %); roll back to reduce it"
    )


def test_a_page_older_than_the_phase_is_refused(operator):
    phase_set("read_switch", read_percent=1)
    # the page showed shadow and its "advance to read_switch": landing as a raise of the read
    # percentage would be another action than the one clicked
    response = post(operator, "advance", seen_phase="shadow", to="read_switch", read_percent=50)
    assert response.status_code == 409
    assert refusal(response).startswith("the phase is read_switch now, not shadow")
    assert phase().read_percent == 1


def test_rollback_needs_the_target_phase_typed(operator):
    phase_set("strict", read_percent=100)
    response = post(operator, "rollback", reason="incident 19", confirm_phase="strict")
    assert response.status_code == 400
    assert "you typed &#x27;strict&#x27;, so nothing was rolled back" in refusal(response)
    assert phase().phase == "strict"
    response = post(operator, "rollback", reason="incident 19", confirm_phase="legacy")
    assert response.status_code == 302
    assert phase().phase == "legacy"
    assert PhaseAudit.objects.get(action="rollback").actor == "admin:op"


def test_an_operator_without_the_permission_is_refused_in_words(client):
    viewer = User.objects.create_user("viewer", password="pw-long-enough-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="advance_phase"))
    client.force_login(viewer)
    phase_set("shadow")
    page = client.get("/admin/").content.decode()
    assert 'id="advance-form"' in page and 'id="force-form"' not in page
    assert 'id="kill-switch-form"' not in page
    response = post(client, "force", seen_phase="shadow", to="read_switch", reason="trying")
    assert response.status_code == 403
    assert refusal(response) == "admin:viewer lacks the permission cutover.force_gate"
    response = post(client, "kill-switch", intent="engage", reason="trying")
    assert response.status_code == 403
    assert not phase().kill_switch and phase().phase == "shadow"


def test_kill_switch_from_the_cockpit_does_what_was_confirmed(operator):
    response = post(operator, "kill-switch", intent="engage", reason="incident 20")
    assert response.status_code == 302 and phase().kill_switch
    response = post(operator, "kill-switch", intent="engage", reason="again")  # stale page
    assert response.status_code == 409
    assert refusal(response) == "the kill switch is already on"
    assert phase().kill_switch_reason == "incident 20"
    assert post(operator, "kill-switch", intent="release", reason="over").status_code == 302
    assert not phase().kill_switch


def test_discrepancies_and_ledger_writes_per_bucket():
    day = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    user = legacy_user("5")
    discrepancy(
        user,
        first_seen_at=day + timedelta(hours=1),
        status="resolved",
        resolved_at=day + timedelta(days=1, hours=2),
    )
    discrepancy(user, first_seen_at=day + timedelta(days=1, hours=3), source="dual_write")
    rows = discrepancies_per_bucket(
        since=day, until=day + timedelta(days=3), width=timedelta(days=1)
    )
    assert [(r.start - day, r.opened, r.resolved) for r in rows] == [
        (timedelta(0), 1, 0),
        (timedelta(days=1), 1, 1),
        (timedelta(days=2), 0, 0),
    ]

    def journal(at, status, phase="shadow"):
        BalanceMutation.objects.create(
            reference=f"r-{BalanceMutation.objects.count()}",
            user_id=user,
            direction="credit",
            amount=1,
            currency="USDC",
            reason="t",
            phase=phase,
            ledger_status=status,
            created_at=at,
        )

    hour = day + timedelta(days=1, hours=3)
    for status in ("posted", "posted", "posted", "failed"):
        journal(hour + timedelta(minutes=5), status)
    journal(hour + timedelta(hours=1, minutes=1), "posted", phase="cutover")  # not a dual write
    journal(hour + timedelta(hours=1, minutes=2), "not_written", phase="legacy")
    StrictFailure.objects.create(
        at=hour + timedelta(hours=1, minutes=3),
        phase="strict",
        user_id=user,
        reference="s",
        error="ledger refused",
    )
    rows = ledger_writes_per_bucket(
        since=hour, until=hour + timedelta(hours=3), width=timedelta(hours=1)
    )
    assert [(r.posted, r.failed, r.strict_failures) for r in rows] == [
        (3, 1, 0),
        (1, 0, 1),
        (0, 0, 0),
    ]
    assert [r.success_rate for r in rows] == [0.75, 0.5, None]


def test_phase_and_kill_switch_periods_from_the_audit_trail():
    seed = PhaseAudit.objects.get(action="seed")
    at = seed.at
    for minutes, action, to in (
        (10, "advance", "shadow"),
        (20, "kill_switch_on", "shadow"),
        (25, "kill_switch_off", "shadow"),
        (30, "force", "read_switch"),
    ):
        PhaseAudit.objects.create(
            at=at + timedelta(minutes=minutes),
            actor="cli:x",
            action=action,
            from_phase="legacy",
            to_phase=to,
            reason=f"{action} why",
        )
    until = at + timedelta(hours=1)
    periods = phase_periods(until=until)
    assert [(p.state, p.start - at, p.end - at, p.action) for p in periods] == [
        ("legacy", timedelta(0), timedelta(minutes=10), "seed"),
        ("shadow", timedelta(minutes=10), timedelta(minutes=30), "advance"),
        ("read_switch", timedelta(minutes=30), timedelta(hours=1), "force"),
    ]
    (kill,) = kill_switch_periods(until=until)
    assert (kill.start - at, kill.end - at, kill.reason) == (
        timedelta(minutes=20),
        timedelta(minutes=25),
        "kill_switch_on why",
    )


@pytest.mark.django_db(transaction=True)
def test_buffer_history_from_the_ledger_entries_of_real_mutations():
    """Each posting commits on its own (its own now()), so the buckets can tell them apart."""
    custody_open_all(usdc="1000")
    phase_set("shadow")
    user = legacy_user("0")
    before = timezone.now()
    balance_credit(
        user_id=user, amount="10", reference="d1", reason="deposit", counterparty=USDC_BUFFER
    )
    between = timezone.now()
    balance_credit(
        user_id=user, amount="5", reference="d2", reason="deposit", counterparty=USDC_BUFFER
    )
    until = timezone.now() + timedelta(seconds=1)
    opening, changed = account_balance_history(
        code=USDC_BUFFER, since=before, until=until, width=between - before
    )
    assert opening == Decimal("1000")
    assert min(changed) == before and list(changed.values()) == [Decimal("1010"), Decimal("1015")]
    rows = ledger_writes_per_bucket(since=before, until=until, width=until - before)
    assert [(r.posted, r.success_rate) for r in rows] == [(2, 1.0)]
