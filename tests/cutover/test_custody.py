"""Custody: the system buffers' opening balances, the legacy -> shadow gate that needs them, the
legacy mirror of the balance path (system accounts stay right across phases and rollbacks) and
the custody reconciliation against what the providers report."""

from decimal import Decimal

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import transaction

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit, balance_mutation_apply
from cutover.custody import CustodyReading, custody_open, custody_reconcile
from cutover.exceptions import (
    CustodyRefused,
    GateNotMet,
    OperatorNotPermitted,
    ReasonRequired,
    ReconciliationBusy,
    StrictLedgerFailure,
)
from cutover.locks import CUSTODY_RECONCILE_LOCK
from cutover.models import (
    BalanceMutation,
    CustodyDiscrepancy,
    CustodyOpening,
    LegacyBalance,
    OperatorAudit,
    PhaseState,
    StrictFailure,
)
from cutover.phase_machine import phase_advance, phase_rollback
from cutover.selectors import custody_opened
from ledger.models import Account, Transaction
from ledger.selectors import system_balance
from tests.cutover.factories import custody_open_all, database_url, legacy_user
from tests.cutover.test_concurrency import run_workers, users_with_balances

pytestmark = pytest.mark.django_db(transaction=True)
CLI = Actor("cli:test")


def balance(code: str) -> Decimal:
    """A system buffer's balance, summed over its shards."""
    return system_balance(code=code)


def user_balances(user_id) -> tuple[Decimal | None, Decimal | None]:
    legacy = LegacyBalance.objects.filter(user_id=user_id).values_list("buying_power", flat=True)
    ledger = Account.objects.filter(user_id=user_id).values_list("balance", flat=True)
    return legacy.first(), ledger.first()


def phase() -> str:
    return PhaseState.objects.get(pk=1).phase


def test_custody_opening_books_the_buffer_once_and_is_audited():
    opening = custody_open(
        currency="USDC", reported="123.45", source="circle", actor=CLI, reason="go-live"
    )
    assert custody_opened("USDC") and not custody_opened("USD")
    assert balance("usdc_buffer") == Decimal("123.45")
    assert balance("opening_balance_equity_usdc") == Decimal("-123.45")
    posting = Transaction.objects.get(namespace="custody", reference_id="opening:USDC")
    assert opening.ledger_transaction_id == posting.pk
    audit = OperatorAudit.objects.get(action="custody.open")
    assert (audit.actor, audit.target, audit.reason) == ("cli:test", "custody:USDC", "go-live")
    assert audit.before == {"opened": False, "buffer": "0.000000"}
    assert audit.after["buffer"] == "123.45" and audit.after["source"] == "circle"

    with pytest.raises(CustodyRefused, match=r"custody for USDC is already open: 123\.450000"):
        custody_open(currency="USDC", reported="200", source="circle", actor=CLI, reason="again")
    assert balance("usdc_buffer") == Decimal("123.45")
    assert OperatorAudit.objects.filter(action="custody.open").count() == 1
    assert CustodyOpening.objects.count() == 1


def test_an_empty_custodian_opens_without_a_posting():
    opening = custody_open(currency="USD", reported="0.00", source="due", actor=CLI, reason="r")
    assert custody_opened("USD") and opening.ledger_transaction_id is None
    assert balance("fiat_buffer") == 0
    assert not Transaction.objects.filter(namespace="custody").exists()


@pytest.mark.parametrize(
    ("currency", "reported", "error", "message"),
    [
        ("USDC", "-5", CustodyRefused, "reported: a provider's balance cannot be negative"),
        ("USDC", Decimal("-0.01"), CustodyRefused, "cannot be negative"),
        ("USD", "1.005", CustodyRefused, "reported: amount 1.005 has more than 2 decimal places"),
        ("USD", "0.000", CustodyRefused, "reported: 0.000 has more than 2 decimal places"),
        ("USD", "abc", CustodyRefused, "reported: amount 'abc' must be a plain decimal"),
        ("EUR", "10", CustodyRefused, "currency must be one of USDC, USD"),
        ("USDC", "10", ReasonRequired, "written --reason"),
    ],
)
def test_a_bad_opening_is_refused_and_changes_nothing(currency, reported, error, message):
    reason = "" if error is ReasonRequired else "r"
    with pytest.raises(error, match=message):
        custody_open(currency=currency, reported=reported, source="x", actor=CLI, reason=reason)
    assert not CustodyOpening.objects.exists() and not OperatorAudit.objects.exists()
    assert balance("usdc_buffer") == 0 and balance("fiat_buffer") == 0


def test_opening_custody_needs_the_permission():
    viewer = User.objects.create_user("viewer", password="a-long-password-1")
    with pytest.raises(OperatorNotPermitted, match=r"cutover\.open_custody"):
        custody_open(
            currency="USD", reported="1", source="due", actor=Actor.for_user(viewer), reason="r"
        )
    assert not CustodyOpening.objects.exists()


def test_the_shadow_gate_waits_for_custody_in_both_currencies():
    legacy_user("10")
    backfill_run()
    with pytest.raises(GateNotMet) as refused:
        phase_advance(to="shadow", actor=CLI)
    failed = {c["name"] for c in refused.value.evidence["checks"] if not c["ok"]}
    assert failed == {"custody_usdc", "custody_usd"}
    custody_open(currency="USDC", reported="10", source="circle", actor=CLI, reason="r")
    with pytest.raises(GateNotMet, match="custody_usd: needs fiat_buffer opened"):
        phase_advance(to="shadow", actor=CLI)
    custody_open(currency="USD", reported="0", source="due", actor=CLI, reason="r")
    audit = phase_advance(to="shadow", actor=CLI, reason="custody booked")
    checks = {c["name"]: c for c in audit.evidence["checks"]}
    assert checks["custody_usdc"]["actual"].startswith("opened at 10.000000 from circle")
    assert phase() == "shadow"


def test_legacy_mutations_post_nothing_before_custody_is_open():
    user = legacy_user("100")
    result = balance_credit(
        user_id=user, amount="5", reference="c1", reason="t", counterparty="usdc_buffer"
    )
    assert result.ledger_transaction_id is None
    assert not Transaction.objects.exists()


@pytest.mark.parametrize("credited_in", ["legacy", "shadow"])
def test_a_legacy_credit_ends_as_if_it_had_happened_in_shadow(credited_in):
    """Custody open, a user backfilled; a deposit of 25 against the USDC buffer, in legacy
    (mirrored: buffer and equity move; the backfill then moves it from equity to the user) or
    in shadow (dual write): the same user, buffer and equity either way."""
    user = legacy_user("100")
    custody_open_all(usdc="100")
    backfill_run()
    assert balance("opening_balance_equity_usdc") == 0
    if credited_in == "legacy":
        result = balance_credit(
            user_id=user, amount="25", reference="dep", reason="t", counterparty="usdc_buffer"
        )
        assert result.ledger_status == "not_written" and result.ledger_transaction_id
        assert balance("usdc_buffer") == Decimal("125")
        assert balance("opening_balance_equity_usdc") == Decimal("-25")
        assert user_balances(user) == (Decimal("125"), Decimal("100"))
        backfill_run()
    phase_advance(to="shadow", actor=CLI, reason="gate met")
    if credited_in == "shadow":
        result = balance_credit(
            user_id=user, amount="25", reference="dep", reason="t", counterparty="usdc_buffer"
        )
        assert result.ledger_status == "posted" and result.ledger_transaction_id
    assert user_balances(user) == (Decimal("125"), Decimal("125"))
    assert balance("usdc_buffer") == Decimal("125")
    assert balance("opening_balance_equity_usdc") == 0
    assert result.ledger_transaction_id == BalanceMutation.objects.get().ledger_transaction_id


def test_a_hold_from_shadow_reversed_after_a_rollback_leaves_nothing_pending():
    """A withdrawal's hold placed in shadow reaches withdrawals_pending_usdc; after a rollback
    to legacy its reversal (as onchain books it, counterparty pending) is mirrored, and the
    next backfill gives the user back the money: nothing stays pending."""
    user = legacy_user("100")
    custody_open_all(usdc="100")
    backfill_run()
    phase_advance(to="shadow", actor=CLI, reason="gate met")
    with transaction.atomic(durable=True):
        hold = balance_mutation_apply(
            user_id=user,
            direction="debit",
            amount="30",
            reference="withdrawal:k:hold",
            reason="circle_withdrawal",
            counterparty="withdrawals_pending_usdc",
        )
    assert hold.ledger_transaction_id is not None
    assert balance("withdrawals_pending_usdc") == Decimal("30")
    phase_rollback(actor=CLI, reason="incident")
    with transaction.atomic(durable=True):
        reversal = balance_mutation_apply(
            user_id=user,
            direction="credit",
            amount="30",
            reference="withdrawal:k:reversal",
            reason="circle_withdrawal_reversal",
            counterparty="withdrawals_pending_usdc",
        )
    assert reversal.phase == "legacy" and reversal.ledger_transaction_id is not None
    assert balance("withdrawals_pending_usdc") == 0
    assert user_balances(user) == (Decimal("100"), Decimal("70"))
    backfill_run()
    assert user_balances(user) == (Decimal("100"), Decimal("100"))
    assert balance("withdrawals_pending_usdc") == 0
    assert balance("usdc_buffer") == Decimal("100")
    assert balance("opening_balance_equity_usdc") == 0


def test_a_legacy_mirror_the_ledger_refuses_fails_the_whole_mutation_and_is_recorded():
    user = legacy_user("100")
    custody_open_all(usdc="10")
    with pytest.raises(StrictLedgerFailure, match="ledger refused the legacy mirror") as failed:
        balance_debit(
            user_id=user, amount="50", reference="d1", reason="t", counterparty="usdc_buffer"
        )
    assert failed.value.phase == "legacy"
    assert user_balances(user) == (Decimal("100"), None)
    assert balance("usdc_buffer") == Decimal("10")
    assert not BalanceMutation.objects.exists()
    recorded = StrictFailure.objects.get()
    assert (recorded.phase, recorded.reference, recorded.user_id) == ("legacy", "d1", user)


def test_custody_reconciliation_records_and_resolves():
    custody_open_all(usdc="100", usd="50")
    agree = custody_reconcile(
        readings=[CustodyReading("USDC", "circle", "100"), CustodyReading("USD", "due", "50")]
    )
    assert all(c.agrees and c.discrepancy_id is None for c in agree)
    assert not CustodyDiscrepancy.objects.exists()

    (first,) = custody_reconcile(readings=[CustodyReading("USDC", "circle", "90.5")])
    row = CustodyDiscrepancy.objects.get()
    assert first.discrepancy_id == row.pk and first.difference == Decimal("9.5")
    assert (row.currency, row.source, row.status, row.occurrences) == ("USDC", "circle", "open", 1)
    assert (row.ledger_balance, row.reported, row.difference) == (
        Decimal("100"),
        Decimal("90.5"),
        Decimal("9.5"),
    )
    custody_reconcile(readings=[CustodyReading("USDC", "circle", "91")])
    row.refresh_from_db()
    assert (row.occurrences, row.reported, row.difference) == (2, Decimal("91"), Decimal("9"))
    assert row.last_seen_at > row.first_seen_at

    (again,) = custody_reconcile(readings=[CustodyReading("USDC", "circle", "100.000000")])
    assert again.resolved and again.agrees
    row.refresh_from_db()
    assert row.status == "resolved" and row.resolved_at is not None
    assert not CustodyDiscrepancy.objects.filter(status="open").exists()


def test_custody_reconciliation_refuses_a_bad_reading_before_writing_anything():
    custody_open_all(usdc="100")
    with pytest.raises(CustodyRefused, match="cannot be negative"):
        custody_reconcile(
            readings=[CustodyReading("USD", "due", "7"), CustodyReading("USDC", "circle", "-1")]
        )
    assert not CustodyDiscrepancy.objects.exists()


def test_custody_reconciliation_runs_one_at_a_time():
    with psycopg.connect(database_url()) as other:
        other.execute("SELECT pg_advisory_lock(%s)", [CUSTODY_RECONCILE_LOCK])
        with pytest.raises(ReconciliationBusy, match="another custody reconciliation"):
            custody_reconcile(readings=[CustodyReading("USDC", "circle", "1")])
    assert not CustodyDiscrepancy.objects.exists()


def test_the_console_lists_custody_discrepancies_read_only(admin_client):
    custody_open_all(usdc="100")
    custody_reconcile(readings=[CustodyReading("USDC", "circle", "97.5")])
    listing = admin_client.get("/admin/cutover/custodydiscrepancy/?status__exact=open")
    assert listing.status_code == 200
    assert b"circle" in listing.content and b"2.500000" in listing.content
    assert admin_client.get("/admin/cutover/custodydiscrepancy/add/").status_code == 403
    row = CustodyDiscrepancy.objects.get()
    change = admin_client.post(
        f"/admin/cutover/custodydiscrepancy/{row.pk}/change/", {"status": "resolved"}
    )
    assert change.status_code == 403
    row.refresh_from_db()
    assert row.status == "open"
    assert admin_client.get("/admin/cutover/custodyopening/").status_code == 200


def clearing_total(account_type: str) -> Decimal:
    return sum(
        Account.objects.filter(account_type=account_type, user_id__isnull=True).values_list(
            "balance", flat=True
        ),
        Decimal(0),
    )


def test_legacy_traffic_under_load_is_mirrored_once_and_the_backfill_settles_equity():
    """Concurrent legacy credits and debits (some delivered twice) with custody open: each
    applied mutation moves its clearing shard once, and after the backfill equity is back at
    zero and every user's ledger balance is their legacy balance."""
    users = users_with_balances(24)
    custody_open_all(usdc="2400")
    assert balance("opening_balance_equity_usdc") == 0
    outcome = run_workers(users, processes=8, operations=60)
    assert clearing_total("deposits_clearing") == outcome["credited"]
    assert clearing_total("withdrawals_clearing") == outcome["debited"]
    assert balance("opening_balance_equity_usdc") == outcome["debited"] - outcome["credited"]
    mirrored = BalanceMutation.objects.exclude(ledger_transaction_id=None).count()
    assert mirrored == BalanceMutation.objects.count() > 0
    backfill_run()
    assert balance("opening_balance_equity_usdc") == 0
    assert balance("usdc_buffer") == Decimal("2400")
    for account in Account.objects.filter(user_id__in=users):
        assert account.balance == LegacyBalance.objects.get(user_id=account.user_id).buying_power
