"""The console for people (issue 12, item 3): amounts with thousands separators in their
currency's scale, durations in words, stored evidence and decisions as tables (never a Python
repr or raw JSON), the kill-switch link only for who may use it, and the buffer alert logged
when it changes rather than at every page view."""

import logging
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from cutover.models import Discrepancy, PhaseAudit
from ledger.models import Account
from ledger.templatetags.console import (
    amount_display,
    duration_display,
    since_display,
    table_display,
)
from onchain.models import TransferDiscrepancy, Withdrawal
from treasury.models import ConversionJob, ConversionProvider, SettlementCycle


def test_amounts_carry_separators_and_their_currency_scale():
    assert amount_display(Decimal("1234567.5"), "USDC") == "1,234,567.500000 USDC"
    assert amount_display("-1234.5", "USD") == "-1,234.50 USD"
    assert amount_display(Decimal("0"), "USD") == "0.00 USD"
    assert amount_display(Decimal("98765.432100")) == "98,765.432100"  # a total over currencies
    assert amount_display(None, "USD") == "—"


def test_durations_are_words():
    assert duration_display(timedelta(hours=50, minutes=3, seconds=9)) == "2 days 2 hours"
    assert duration_display(timedelta(days=90)) == "90 days"
    assert duration_display(timedelta(minutes=1, seconds=1)) == "1 minute 1 second"
    assert duration_display(timedelta(milliseconds=350)) == "350 ms"
    assert duration_display(timedelta(0)) == "less than 1 ms"
    assert since_display(timezone.now() - timedelta(hours=3, seconds=5)) == "3 hours 5 seconds ago"
    assert since_display(timezone.now() + timedelta(days=7, minutes=1)).startswith("in 7 days")


def test_stored_data_is_tables_escaped():
    evidence = {
        "from": "shadow",
        "passed": False,
        "evaluated_at": "2026-12-02T03:43:10.123456+00:00",
        "checks": [
            {"name": "open_discrepancies", "required": "0", "actual": "2", "ok": False},
            {"name": "time_in_phase", "required": ">= 2 days", "actual": "3 days", "ok": True},
        ],
        "note": "<script>alert(1)</script>",
    }
    html = table_display(evidence)
    assert "<th scope='col'>met</th>" in html and "<td>no</td>" in html and "<td>yes</td>" in html
    assert "2026-12-02 03:43:10 UTC" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "{" not in html and "[" not in html and "True" not in html
    decisions = [{"currency": "USDC", "balance": "1234.5", "state": "below_min", "job": 4}]
    assert "<td>1,234.500000 USDC</td>" in table_display(decisions)
    totals = {"USD": {"rows": 2, "total": "1500"}}
    assert "1,500.00 USD" in table_display(totals)


@pytest.fixture
def operator_client(client):
    client.force_login(User.objects.create_superuser("op", "op@example.com", "a-long-pw-1"))
    return client


@pytest.mark.django_db
def test_gate_evidence_and_settlement_decisions_are_tables(operator_client):
    audit = PhaseAudit.objects.create(
        actor="cli:ops",
        action="force",
        from_phase="shadow",
        to_phase="read_switch",
        reason="drill",
        evidence={
            "passed": False,
            "checks": [{"name": "ledger_write_success", "required": ">= 99.9%", "ok": False}],
        },
    )
    page = operator_client.get(f"/admin/cutover/phaseaudit/{audit.pk}/change/").content.decode()
    assert "console-data" in page and "ledger_write_success" in page
    assert '{"' not in page and "{&#x27;" not in page and "&quot;checks&quot;" not in page
    cycle = SettlementCycle.objects.create(
        triggered_by="celery",
        finished_at=timezone.now(),
        duration_ms=1234.5,
        buffers=[{"currency": "USD", "balance": "20000", "state": "ok", "action": "none"}],
    )
    page = operator_client.get(f"/admin/treasury/settlementcycle/{cycle.pk}/change/")
    page = page.content.decode()
    assert "20,000.00 USD" in page and "1 second" in page
    assert "&quot;currency&quot;" not in page and "{&#x27;" not in page


def dead_withdrawal() -> Withdrawal:
    return Withdrawal.objects.create(
        idempotency_key=uuid.uuid4(),
        user_id=uuid.uuid4(),
        amount=Decimal("12345.5"),
        address="0x" + "ab" * 20,
        chain="ETH",
        status="dead",
        hold_in_ledger=True,
    )


def conversion_job(**fields) -> ConversionJob:
    return ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency="USDC",
        source_currency="USD",
        source_amount=Decimal("25000"),
        target_currency="USDC",
        provider=ConversionProvider.objects.get(code="due"),
        created_by="test",
        **fields,
    )


@pytest.mark.django_db
def test_lists_show_amounts_for_people(operator_client):
    dead_withdrawal()
    page = operator_client.get("/admin/onchain/withdrawal/").content.decode()
    assert "12,345.500000 USDC" in page and "0xababab…ababab on ETH" in page
    conversion_job()
    page = operator_client.get("/admin/treasury/conversionjob/").content.decode()
    assert "25,000.00 USD → USDC" in page
    buffer = Account.objects.get(code="usdc_buffer")
    page = operator_client.get(f"/admin/ledger/account/{buffer.pk}/change/").content.decode()
    assert "0.000000 USDC" in page


@pytest.mark.django_db
def test_rows_changed_only_by_actions_show_every_field_read_only_amounts_for_people(
    operator_client,
):
    """A withdrawal, a conversion job and a transfer discrepancy change only through their
    admin's actions: their change page has no input, every field shown, amounts in their
    currency's scale."""
    withdrawal = dead_withdrawal()
    job = conversion_job(target_amount=Decimal("24990.125"))
    discrepancy = TransferDiscrepancy.objects.create(
        transfer_id="t-1",
        notification_id="n-2",
        reference="circle:transfer:t-1",
        credited_amount=Decimal("5"),
        notified_amount="6",
        detail="transfer t-1 was credited 5 USDC; n-2 says 6",
    )
    for row, shown in (  # field -> (its column, as shown)
        (withdrawal, {"amount": ("amount_shown", "12,345.500000 USDC")}),
        (
            job,
            {
                "source_amount": ("source_amount_shown", "25,000.00 USD"),
                "target_amount": ("target_amount_shown", "24,990.125000 USDC"),
            },
        ),
        (discrepancy, {"credited_amount": ("credited_shown", "5.000000 USDC")}),
    ):
        meta = row._meta
        url = f"/admin/{meta.app_label}/{meta.model_name}/{row.pk}/change/"
        page = operator_client.get(url).content.decode()
        assert '<input type="text"' not in page and "<textarea" not in page, url
        for field in meta.fields:
            column, amount = shown.get(field.name, (field.name, ""))
            assert f"field-{column}" in page and amount in page, (url, column, amount)


@pytest.mark.django_db
def test_a_discrepancy_page_is_read_only_and_titled_by_its_id(operator_client):
    discrepancy = Discrepancy.objects.create(
        user_id=uuid.uuid4(),
        currency="USD",
        legacy_balance=Decimal("1500"),
        ledger_balance=Decimal("1000.5"),
        difference=Decimal("499.5"),
        source="reconciliation",
        phase="shadow",
    )
    page = operator_client.get(f"/admin/cutover/discrepancy/{discrepancy.pk}/change/")
    page = page.content.decode()
    assert f"<h1>Discrepancy {discrepancy.pk}</h1>" in page
    assert "Change discrepancy" not in page and 'name="_save"' not in page
    assert "499.50 USD" in page and "1,500.00 USD" in page
    listing = operator_client.get("/admin/cutover/discrepancy/").content.decode()
    assert "499.50 USD" in listing


@pytest.mark.django_db
def test_the_kill_switch_link_is_only_for_who_may_use_it(client, operator_client):
    page = operator_client.get("/admin/cutover/phasestate/1/change/").content.decode()
    assert 'id="kill-switch-link"' in page
    viewer = User.objects.create_user("viewer", password="a-long-pw-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_phasestate"))
    client.force_login(viewer)
    page = client.get("/admin/cutover/phasestate/1/change/").content.decode()
    assert "USE_LEDGER_INTEGRATION=false, LEDGER_SHADOW_MODE=false" in page
    assert 'id="kill-switch-link"' not in page


@pytest.mark.django_db
def test_the_buffer_alert_is_logged_when_it_changes_not_at_every_page(
    operator_client, settings, caplog
):
    def alert_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "onchain.buffer_alert"]

    caplog.set_level(logging.INFO, logger="onchain.buffer_alert")
    settings.ONCHAIN_BUFFER_ALERT_THRESHOLD = Decimal("5000")
    for _ in range(3):
        assert 'id="buffer-alert"' in operator_client.get("/admin/").content.decode()
    assert alert_lines() == ["ALERT onchain USDC buffer 0.000000 below the alert threshold 5000"]
    settings.ONCHAIN_BUFFER_ALERT_THRESHOLD = Decimal("0")
    for _ in range(2):
        assert 'id="buffer-alert"' not in operator_client.get("/admin/").content.decode()
    assert alert_lines()[1:] == [
        "onchain USDC buffer 0.000000 back at or above the alert threshold 0"
    ]
