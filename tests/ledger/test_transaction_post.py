"""transaction_post: the one posting path. Outcomes are asserted in the database."""

from decimal import Decimal

import pytest
from django.db import transaction

from ledger.exceptions import (
    CurrencyMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidPosting,
    UnbalancedTransaction,
    UnknownAccount,
)
from ledger.models import Account, Entry, Transaction
from ledger.selectors import account_balance, system_account
from ledger.services import Leg, opening_balance_post, transaction_apply, transaction_post
from tests.ledger.factories import UserAccountFactory, fund

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def alice():
    account = UserAccountFactory()
    fund(account, "100")
    return account


@pytest.fixture
def bob():
    return UserAccountFactory()


def transfer(source, target, amount, reference="ref-1", **kwargs):
    return transaction_post(
        namespace="test",
        reference_id=reference,
        kind="transfer",
        legs=[Leg.debit(source, Decimal(amount)), Leg.credit(target, Decimal(amount))],
        **kwargs,
    )


def snapshot():
    return (
        Transaction.objects.count(),
        Entry.objects.count(),
        dict(Account.objects.values_list("pk", "balance")),
    )


def test_posting_moves_both_balances_and_records_entries(alice, bob):
    result = transfer(alice, bob, "30.25", metadata={"correlation_id": "c-1"})
    assert result.created
    assert account_balance(account_id=alice.pk) == Decimal("69.75")
    assert account_balance(account_id=bob.pk) == Decimal("30.25")
    txn = Transaction.objects.get(pk=result.transaction_id)
    assert txn.metadata == {"correlation_id": "c-1"}
    legs = {(e.account_id, e.side, e.amount) for e in txn.entries.all()}
    assert legs == {(alice.pk, "debit", Decimal("30.25")), (bob.pk, "credit", Decimal("30.25"))}
    bob_entry = Entry.objects.get(account=bob)
    assert bob_entry.seq == 1 and bob_entry.prev_hash == "0" * 64
    assert Account.objects.get(pk=bob.pk).last_hash == bob_entry.hash


def test_same_posting_five_times_gives_one_transaction(alice, bob):
    results = [transfer(alice, bob, "10") for _ in range(5)]
    assert [r.created for r in results] == [True, False, False, False, False]
    assert len({r.transaction_id for r in results}) == 1
    assert Transaction.objects.filter(namespace="test").count() == 1
    assert account_balance(account_id=bob.pk) == Decimal("10")


def test_replay_with_other_legs_is_refused_and_changes_nothing(alice, bob):
    transfer(alice, bob, "10")
    before = snapshot()
    with pytest.raises(IdempotencyConflict, match="already posted with different legs"):
        transfer(alice, bob, "11")
    assert snapshot() == before


def test_same_reference_in_another_namespace_is_a_new_posting(alice, bob):
    transfer(alice, bob, "10")
    other = transaction_post(
        namespace="other",
        reference_id="ref-1",
        kind="transfer",
        legs=[Leg.debit(alice, Decimal("10")), Leg.credit(bob, Decimal("10"))],
    )
    assert other.created
    assert account_balance(account_id=bob.pk) == Decimal("20")


def test_overdraft_is_refused_and_changes_nothing(alice, bob):
    before = snapshot()
    with pytest.raises(InsufficientFunds, match=f"account {alice.pk} would go negative"):
        transfer(alice, bob, "100.01")
    assert snapshot() == before


@pytest.mark.parametrize(
    ("legs", "error", "message"),
    [
        (lambda a, b: [Leg.debit(a, "1")], InvalidPosting, "at least two legs"),
        (
            lambda a, b: [Leg.debit(a, "1"), Leg.credit(b, "2")],
            UnbalancedTransaction,
            "differ by 1 USDC",
        ),
        (
            lambda a, b: [Leg.debit(a, "0.0000001"), Leg.credit(b, "0.0000001")],
            InvalidAmount,
            "more than 6 decimal places",
        ),
        (lambda a, b: [Leg.debit(a, "0"), Leg.credit(b, "0")], InvalidAmount, "positive"),
        (lambda a, b: [Leg.debit(a, "-5"), Leg.credit(b, "-5")], InvalidAmount, "positive"),
        (lambda a, b: [Leg.debit(a, "1e30"), Leg.credit(b, "1e30")], InvalidAmount, "too large"),
        (
            lambda a, b: [Leg(a.pk, "debit", 1.5, "USDC"), Leg(b.pk, "credit", 1.5, "USDC")],
            InvalidAmount,
            "not a float",
        ),
        (
            lambda a, b: [Leg(a.pk, "sideways", Decimal(1), "USDC"), Leg.credit(b, "1")],
            InvalidPosting,
            "side must be debit or credit",
        ),
        (
            lambda a, b: [
                Leg(a.pk, "debit", Decimal(1), "EUR"),
                Leg(b.pk, "credit", Decimal(1), "EUR"),
            ],
            InvalidPosting,
            "unknown currency",
        ),
        (
            lambda a, b: [
                Leg(a.pk, "debit", Decimal(1), "USD"),
                Leg(b.pk, "credit", Decimal(1), "USD"),
            ],
            CurrencyMismatch,
            "holds USDC, not USD",
        ),
        (
            lambda a, b: [Leg(999999, "debit", Decimal(1), "USDC"), Leg.credit(b, "1")],
            UnknownAccount,
            "account 999999 does not exist",
        ),
    ],
)
def test_bad_postings_get_a_clear_error_and_change_nothing(alice, bob, legs, error, message):
    before = snapshot()
    with pytest.raises(error, match=message):
        transaction_post(
            namespace="test", reference_id="bad", kind="transfer", legs=legs(alice, bob)
        )
    assert snapshot() == before


@pytest.mark.parametrize(
    ("field", "value"), [("reference_id", ""), ("kind", " "), ("namespace", "n" * 65)]
)
def test_bad_names_are_refused(alice, bob, field, value):
    arguments = {"namespace": "test", "reference_id": "r", "kind": "transfer"} | {field: value}
    with pytest.raises(InvalidPosting, match=field):
        transaction_post(**arguments, legs=[Leg.debit(alice, "1"), Leg.credit(bob, "1")])
    assert not Transaction.objects.filter(namespace="test").exists()


def test_post_refuses_to_run_inside_a_caller_transaction(alice, bob):
    with pytest.raises(RuntimeError, match="use transaction_apply"), transaction.atomic():
        transfer(alice, bob, "1")


def test_apply_in_a_rolled_back_savepoint_leaves_no_trace(alice, bob):
    with transaction.atomic():
        try:
            with transaction.atomic():
                transaction_apply(
                    namespace="test",
                    reference_id="sp",
                    kind="transfer",
                    legs=[Leg.debit(alice, "500"), Leg.credit(bob, "500")],
                )
        except InsufficientFunds:
            pass
        transaction_apply(
            namespace="test",
            reference_id="sp2",
            kind="transfer",
            legs=[Leg.debit(alice, "5"), Leg.credit(bob, "5")],
        )
    assert list(
        Transaction.objects.filter(namespace="test").values_list("reference_id", flat=True)
    ) == ["sp2"]
    assert account_balance(account_id=bob.pk) == Decimal("5")


def test_multi_currency_posting_balances_per_currency(alice):
    usd_user = UserAccountFactory(currency_id="USD", account_type="usd_balance")
    conversion_usdc = system_account(code="conversion_clearing_usdc")
    conversion_usd = system_account(code="conversion_clearing_usd")
    transaction_post(
        namespace="test",
        reference_id="fx",
        kind="conversion",
        legs=[
            Leg.debit(alice, "50"),
            Leg.credit(conversion_usdc, "50"),
            Leg.debit(conversion_usd, "49.95"),
            Leg.credit(usd_user, "49.95"),
        ],
    )
    assert account_balance(account_id=alice.pk) == Decimal("50")
    assert account_balance(account_id=usd_user.pk) == Decimal("49.95")


def test_opening_balance_is_posted_once_per_account(bob):
    first = opening_balance_post(namespace="backfill", account=bob, amount=Decimal("42.5"))
    again = opening_balance_post(namespace="backfill", account=bob, amount=Decimal("42.5"))
    assert first.created and not again.created
    assert account_balance(account_id=bob.pk) == Decimal("42.5")
    equity = system_account(code="opening_balance_equity_usdc")
    assert Entry.objects.get(transaction_id=first.transaction_id, account=equity).side == "debit"
