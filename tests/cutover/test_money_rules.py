"""The balance path's money rules held by PostgreSQL: one currency per user in every phase (so
the rollback from cutover always rebuilds the legacy store to the cent), an append-only journal,
a shard for every user id, and strict-phase failures recorded wherever they happen."""

import json
import threading
import time
import uuid
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, IntegrityError, connection, transaction

from cutover.actors import Actor
from cutover.balance_path import (
    balance_credit,
    balance_debit,
    balance_mutation_apply,
    strict_failure_recorded,
)
from cutover.exceptions import MutationConflict, StrictLedgerFailure, TransitionRefused
from cutover.gates import gate_evaluate
from cutover.models import BalanceMutation, LegacyBalance, PhaseAudit, PhaseState, StrictFailure
from cutover.phase_machine import phase_rollback, phase_rollback_rehearse
from cutover.phases import Phase
from cutover.selectors import store_differences, store_totals
from ledger.models import Account, Entry
from tests.cutover.factories import custody_open_all, ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
ALL = ["legacy", "shadow", "read_switch", "strict", "cutover"]
CLI = Actor("cli:test")
# hashtext('00000000-0000-4000-8000-0001456ed970') = -2147483648 (INT_MIN), found by brute force
# over the last group of hex digits: abs() of it overflows a PostgreSQL integer.
INT_MIN_USER = uuid.UUID("00000000-0000-4000-8000-0001456ed970")


@pytest.fixture(autouse=True)
def _no_deprecation_comment():
    yield
    with connection.cursor() as cursor:  # DDL outlives the flush between tests
        cursor.execute("COMMENT ON TABLE balances IS NULL")


def stores(user_id) -> tuple[tuple, list[tuple]]:
    legacy = LegacyBalance.objects.filter(user_id=user_id).values_list("buying_power", "currency")
    ledger = Account.objects.filter(user_id=user_id).values_list("balance", "currency_id")
    return legacy.first(), list(ledger)


@pytest.mark.parametrize("phase", ALL)
def test_a_credit_in_another_currency_is_refused_in_every_phase(phase):
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    phase_set(phase, read_percent=100 if phase in {"read_switch", "strict", "cutover"} else 0)
    before = stores(user)
    with pytest.raises(MutationConflict, match="holds USDC, not USD: a user has one currency"):
        balance_credit(user_id=user, amount="5", currency="USD", reference="usd", reason="t")
    assert stores(user) == before
    assert not BalanceMutation.objects.exists()


@pytest.mark.parametrize("phase", ALL)
@pytest.mark.parametrize("legacy_currency, ledger_currency", [("USDC", "USD"), ("USD", "USDC")])
def test_a_user_whose_stores_disagree_on_the_currency_is_refused_in_every_phase(
    phase, legacy_currency, ledger_currency
):
    """Each store is checked in every phase, the one the phase writes and the one it does not:
    a mutation in the currency of one store is refused for the other's, nothing written."""
    user = legacy_user("100", currency=legacy_currency)
    ledger_balance_set(user, "100", currency=ledger_currency)
    phase_set(phase, read_percent=100 if phase in {"read_switch", "strict", "cutover"} else 0)
    before = stores(user)
    for currency in (legacy_currency, ledger_currency):
        with pytest.raises(MutationConflict, match="a user has one currency"):
            balance_credit(
                user_id=user, amount="5", currency=currency, reference=currency, reason="t"
            )
    assert stores(user) == before
    assert not BalanceMutation.objects.exists()


@pytest.mark.parametrize("phase", ALL)
def test_an_overdraft_in_another_currency_is_refused_for_the_currency(phase):
    """A debit in a currency the user does not hold, larger than the balance: refused as the
    wrong currency (what the caller must fix), not as insufficient funds."""
    user = legacy_user("10")
    ledger_balance_set(user, "10")
    phase_set(phase, read_percent=100 if phase in {"read_switch", "strict", "cutover"} else 0)
    before = stores(user)
    with pytest.raises(MutationConflict, match="holds USDC, not USD: a user has one currency"):
        balance_debit(user_id=user, amount="50", currency="USD", reference="usd", reason="t")
    assert stores(user) == before
    assert not BalanceMutation.objects.exists()


@pytest.mark.parametrize("phase", ALL)
def test_a_debit_for_a_user_with_only_a_ledger_account_in_another_currency(phase):
    """No legacy row, a ledger account in USD (stores that disagree): a USDC debit is refused as
    the wrong currency in every phase, not as missing funds, and nothing is written."""
    user = uuid.uuid4()
    ledger_balance_set(user, "10", currency="USD")
    phase_set(phase, read_percent=100 if phase in {"read_switch", "strict", "cutover"} else 0)
    before = stores(user)
    with pytest.raises(MutationConflict, match="holds USD, not USDC: a user has one currency"):
        balance_debit(user_id=user, amount="5", reference="usdc", reason="t")
    assert stores(user) == before
    assert not BalanceMutation.objects.exists()


def test_a_cutover_only_user_keeps_one_currency():
    phase_set("cutover", read_percent=100)
    user = uuid.uuid4()
    balance_credit(user_id=user, amount="7", reference="first", reason="t")
    with pytest.raises(MutationConflict, match="a user has one currency"):
        balance_credit(user_id=user, amount="5", currency="USD", reference="usd", reason="t")
    assert stores(user) == (None, [(Decimal("7"), "USDC")])


def test_postgresql_holds_one_balance_account_per_user():
    user = legacy_user("1")
    ledger_balance_set(user, "1")
    with (
        pytest.raises(IntegrityError, match="cutover_one_balance_account_per_user"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "INSERT INTO ledger_accounts (user_id, account_type, currency, normal_balance, "
            "allow_negative) VALUES (%s, 'usd_balance', 'USD', 'credit', false)",
            [user],
        )
    assert Account.objects.filter(user_id=user).count() == 1


def test_rollback_from_cutover_keeps_every_cent():
    """Every reachable shape of a user at cutover: debited to zero, cutover-only (no legacy
    row), another currency, a zero legacy row never backfilled; the rebuilt legacy store equals
    the ledger per user and in total, per currency."""
    emptied = legacy_user("50")
    ledger_balance_set(emptied, "50")
    dollars = legacy_user("10", currency="USD")
    ledger_balance_set(dollars, "10", currency="USD")
    untouched = legacy_user("0")
    phase_set("cutover", read_percent=100)
    balance_debit(user_id=emptied, amount="50", reference="to-zero", reason="t")
    newcomer = uuid.uuid4()
    balance_credit(user_id=newcomer, amount="30.123456", reference="new", reason="t")
    balance_credit(user_id=dollars, amount="5.25", currency="USD", reference="usd", reason="t")
    with pytest.raises(MutationConflict):
        balance_credit(user_id=newcomer, amount="1", currency="USD", reference="x", reason="t")

    audit = phase_rollback(actor=CLI, reason="incident")
    assert PhaseState.objects.get(pk=1).phase == "legacy"
    assert stores(emptied)[0] == (Decimal("0"), "USDC")
    assert stores(newcomer)[0] == (Decimal("30.123456"), "USDC")
    assert stores(dollars)[0] == (Decimal("15.25"), "USD")
    assert stores(untouched)[0] == (Decimal("0"), "USDC")
    assert audit.evidence["legacy_rows_rebuilt"] == 3
    assert audit.evidence["legacy_rows_created"] == 1
    assert audit.evidence["proof"]["ok"] is True
    assert store_differences() == (0, [])
    totals = store_totals()
    assert (
        Decimal(totals["legacy_total"]) == Decimal(totals["ledger_total"]) == Decimal("45.373456")
    )
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT b.currency, sum(b.buying_power),
                      (SELECT coalesce(sum(a.balance), 0) FROM ledger_accounts a
                        WHERE a.user_id IS NOT NULL AND a.currency = b.currency
                          AND a.account_type = lower(a.currency) || '_balance')
                 FROM balances b GROUP BY b.currency ORDER BY 1"""
        )
        per_currency = cursor.fetchall()
    assert per_currency == [
        ("USD", Decimal("15.25"), Decimal("15.25")),
        ("USDC", Decimal("30.123456"), Decimal("30.123456")),
    ]
    # legacy is authoritative again and the newcomer's money is there
    balance_debit(user_id=newcomer, amount="30.123456", reference="out", reason="t")
    assert stores(newcomer)[0] == (Decimal("0"), "USDC")


def test_a_rehearsed_rollback_proves_itself_and_changes_nothing():
    """`cutover rollback --dry-run`: the whole rollback from cutover, undone; and the refusal a
    real one would meet."""
    user = legacy_user("10")
    ledger_balance_set(user, "10")
    phase_set("cutover", read_percent=100)
    balance_credit(user_id=user, amount="5", reference="after-cutover", reason="t")
    audits = PhaseAudit.objects.count()
    out = StringIO()
    call_command("cutover", "rollback", "--dry-run", "--json", stdout=out)
    answer = json.loads(out.getvalue())
    assert answer["would_succeed"] and answer["evidence"]["proof"]["ok"] is True
    assert PhaseState.objects.get(pk=1).phase == "cutover"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("10")  # stale, as before
    assert PhaseAudit.objects.count() == audits
    with connection.cursor() as cursor:  # someone edits the deprecated table by hand
        cursor.execute("UPDATE balances SET currency = 'USD' WHERE user_id = %s", [user])
    with pytest.raises(TransitionRefused, match="another currency"):
        phase_rollback_rehearse()
    with pytest.raises(CommandError, match="--reason"):
        call_command("cutover", "rollback", stdout=StringIO())


def test_rollback_refuses_to_rewrite_a_legacy_row_into_another_currency():
    user = legacy_user("10")
    ledger_balance_set(user, "10")
    phase_set("cutover", read_percent=100)
    with connection.cursor() as cursor:  # someone edits the deprecated table by hand
        cursor.execute("UPDATE balances SET currency = 'USD' WHERE user_id = %s", [user])
    with pytest.raises(TransitionRefused, match=f"{user} \\(USD legacy, USDC ledger\\)"):
        phase_rollback(actor=CLI, reason="incident")
    assert PhaseState.objects.get(pk=1).phase == "cutover"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("10")


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM cutover_balance_mutations",
        "UPDATE cutover_balance_mutations SET amount = 1",
        "UPDATE cutover_balance_mutations SET reference = 'other'",
    ],
)
def test_the_journal_is_append_only(statement):
    user = legacy_user("10")
    balance_credit(user_id=user, amount="5", reference="once", reason="t")
    with (
        pytest.raises(DatabaseError, match="append-only") as refused,
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement)
    assert refused.value.__cause__.sqlstate == "CU001"
    assert BalanceMutation.objects.get().amount == Decimal("5")
    again = balance_credit(user_id=user, amount="5", reference="once", reason="t")
    assert not again.created
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("15")


@pytest.mark.parametrize("phase", ALL)
def test_the_user_whose_hash_is_int_min_is_mutated_in_every_phase(phase):
    with connection.cursor() as cursor:
        cursor.execute("SELECT hashtext(%s::text)", [str(INT_MIN_USER)])
        assert cursor.fetchone()[0] == -(2**31)
    custody_open_all()  # in legacy the mirror computes the shard too
    phase_set(phase, read_percent=100 if phase in {"read_switch", "strict", "cutover"} else 0)
    result = balance_credit(user_id=INT_MIN_USER, amount="5", reference="c", reason="t")
    assert result.created and result.ledger_transaction_id is not None
    clearing = Entry.objects.get(transaction_id=result.ledger_transaction_id, side="debit")
    assert clearing.account.code == "deposits_clearing_usdc"  # shard 0
    if phase != "cutover":
        assert LegacyBalance.objects.get(user_id=INT_MIN_USER).buying_power == Decimal("5")
    if phase != "legacy":
        assert Account.objects.get(user_id=INT_MIN_USER).balance == Decimal("5")


def test_a_strict_failure_inside_a_callers_transaction_is_recorded():
    """A hold (balance_mutation_apply in the caller's atomic block) the ledger refuses in
    strict: the block rolls back whole, then the failure is recorded and the gate sees it."""
    user = legacy_user("100")
    ledger_balance_set(user, "30")
    phase_set("strict", read_percent=100)
    with (
        pytest.raises(StrictLedgerFailure, match="ledger refused the debit") as failed,
        strict_failure_recorded(),
        transaction.atomic(durable=True),
    ):
        balance_mutation_apply(
            user_id=user,
            direction="debit",
            amount="50",
            reference="withdrawal:k:hold",
            reason="circle_withdrawal",
            counterparty="withdrawals_pending_usdc",
        )
    assert (failed.value.phase, failed.value.user_id) == ("strict", user)
    recorded = StrictFailure.objects.get()
    assert (recorded.phase, recorded.user_id, recorded.reference) == (
        "strict",
        user,
        "withdrawal:k:hold",
    )
    assert "ledger refused the debit" in recorded.error
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("100")
    assert not BalanceMutation.objects.exists()
    gate = gate_evaluate(PhaseState.objects.get(pk=1), Phase.CUTOVER)
    assert {c.name: c.actual for c in gate.checks}["strict_failures"] == "1"


def test_strict_failure_recorded_refuses_to_run_inside_a_transaction():
    with (
        transaction.atomic(),
        pytest.raises(RuntimeError, match="must wrap the transaction"),
        strict_failure_recorded(),
    ):
        pass


@pytest.mark.parametrize("phase", ["legacy", "cutover"])
def test_concurrent_first_mutations_in_two_currencies_leave_one(phase):
    """A new user's first USDC credit is in flight (uncommitted) when a USD credit arrives: the
    second waits on the first's row and is then refused; the user ends with one currency."""
    phase_set(phase, read_percent=100 if phase == "cutover" else 0)
    user = uuid.uuid4()
    applied, outcome = threading.Event(), {}

    def first():
        try:
            with transaction.atomic(durable=True):
                balance_mutation_apply(
                    user_id=user, direction="credit", amount="7", reference="usdc", reason="t"
                )
                applied.set()
                time.sleep(0.5)  # the USD credit is waiting meanwhile
        finally:
            connection.close()

    def second():
        applied.wait(5)
        try:
            balance_credit(user_id=user, amount="5", currency="USD", reference="usd", reason="t")
        except MutationConflict as exc:
            outcome["refused"] = str(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert "holds USDC, not USD: a user has one currency" in outcome["refused"]
    legacy, ledger = stores(user)
    if phase == "legacy":
        assert (legacy, ledger) == ((Decimal("7"), "USDC"), [])
    else:
        assert (legacy, ledger) == (None, [(Decimal("7"), "USDC")])
    assert list(BalanceMutation.objects.values_list("reference", flat=True)) == ["usdc"]
