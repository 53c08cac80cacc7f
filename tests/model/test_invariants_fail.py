"""Each invariant of the money model can fail: a state that satisfies it, then a corruption
made with raw SQL (database rules disabled for the session where they would refuse it, so
that the checker, not the rule, has to see it), and the checker must report it. The
corruption is rolled back at the end of each test."""

import uuid
from contextlib import contextmanager
from decimal import Decimal

import pytest
from django.db import connection, transaction

from ledger.models import Account
from ledger.selectors import system_balance
from ledger.services import Leg, transaction_post
from onchain.withdrawals import withdrawal_request
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.model import invariants, world
from tests.onchain.factories import DESTINATION
from treasury.models import ConversionJob, ConversionProvider

pytestmark = pytest.mark.django_db(transaction=True)


class _Undo(Exception):
    pass


@contextmanager
def corrupted(*statements):
    """Run raw SQL with triggers and constraint triggers off, yield, then roll it all back."""
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL session_replication_role = replica")
                for sql, params in statements:
                    cursor.execute(sql, params)
            yield
            raise _Undo
    except _Undo:
        pass


def sql(statement, *params):
    return statement, list(params)


def fund(code: str, amount: str) -> None:
    account = Account.objects.get(code=code)
    equity = Account.objects.get(code=f"opening_balance_equity_{account.currency_id.lower()}")
    transaction_post(
        namespace="test",
        reference_id=f"fund:{uuid.uuid4()}",
        kind="opening_balance",
        legs=[Leg.debit(account, amount), Leg.credit(equity, amount)],
    )


@pytest.fixture
def user():
    """A USDC user with 100 in both stores, in shadow, and a funded USDC buffer."""
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "100")
    fund("usdc_buffer", "100")
    phase_set("shadow")
    return user_id


def test_transactions_balanced_sees_an_unbalanced_entry(user):
    assert invariants.transactions_balanced() == []
    first = "(SELECT min(id) FROM ledger_entries)"
    with corrupted(sql(f"UPDATE ledger_entries SET amount = amount + 1 WHERE id = {first}")):
        assert invariants.transactions_balanced()


def test_balances_non_negative_sees_both_stores(user):
    assert invariants.balances_non_negative() == []
    with corrupted(
        sql("ALTER TABLE balances DROP CONSTRAINT IF EXISTS balances_chk_non_negative"),
        sql("UPDATE balances SET buying_power = -1 WHERE user_id = %s", user),
    ):
        [found] = invariants.balances_non_negative()
        assert "legacy balance" in found
    constraints = [
        name
        for (name,) in _rows(
            "SELECT conname FROM pg_constraint"
            " WHERE conrelid = 'ledger_accounts'::regclass AND contype = 'c'"
        )
    ]
    drops = [sql(f'ALTER TABLE ledger_accounts DROP CONSTRAINT "{name}"') for name in constraints]
    with corrupted(*drops, sql("UPDATE ledger_accounts SET balance = -1 WHERE user_id = %s", user)):
        assert any("ledger account" in found for found in invariants.balances_non_negative())


def _rows(statement, params=None):
    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])
        return cursor.fetchall()


def test_balances_non_negative_drops_every_legacy_check(user):
    """The legacy table's own CHECK (if any) is dropped by name above: make sure the name used
    is the real one, or that there is none."""
    checks = [
        name
        for (name,) in _rows(
            "SELECT conname FROM pg_constraint"
            " WHERE conrelid = 'balances'::regclass AND contype = 'c'"
        )
    ]
    assert set(checks) <= {"balances_chk_non_negative"}, checks


def test_cached_balances_match_entries_sees_a_raw_balance_update(user):
    assert invariants.cached_balances_match_entries() == []
    with corrupted(
        sql("UPDATE ledger_accounts SET balance = balance + 1 WHERE user_id = %s", user)
    ):
        assert invariants.cached_balances_match_entries()


def test_stores_agree_or_named_sees_a_raw_legacy_change_unless_a_discrepancy_names_it(user):
    assert invariants.stores_agree_or_named() == []
    change = sql("UPDATE balances SET buying_power = 101 WHERE user_id = %s", user)
    with corrupted(change):
        [found] = invariants.stores_agree_or_named()
        assert "no open discrepancy" in found
    named = sql(
        "INSERT INTO cutover_discrepancies (user_id, currency, legacy_balance, ledger_balance,"
        " difference, status, source, phase, reference, detail, occurrences, first_seen_at,"
        " last_seen_at, resolved_by, resolution_note)"
        " VALUES (%s, 'USDC', 101, 100, 1, 'open', 'reconciliation', 'shadow', '', '', 1,"
        " now(), now(), '', '')",
        user,
    )
    with corrupted(change, named):
        assert invariants.stores_agree_or_named() == []


def test_user_money_sees_a_raw_legacy_change(user):
    opening = {(user, "USDC"): Decimal(100)}
    assert invariants.user_money(opening) == []
    with corrupted(sql("UPDATE balances SET buying_power = 99 WHERE user_id = %s", user)):
        [found] = invariants.user_money(opening)
        assert "legacy store 99" in found
    phase_set("cutover")
    with corrupted(sql("UPDATE ledger_accounts SET balance = 98 WHERE user_id = %s", user)):
        [found] = invariants.user_money(opening)
        assert "ledger store 98" in found


def test_conservation_sees_a_buffer_changed_alone_and_an_unnamed_account(user):
    assert invariants.conservation() == []
    with corrupted(
        sql("UPDATE ledger_accounts SET balance = balance + 5 WHERE code = 'usdc_buffer'")
    ):
        [found] = invariants.conservation()
        assert found.startswith("USDC:")
    with corrupted(
        sql(
            "INSERT INTO ledger_accounts (code, account_type, currency, normal_balance,"
            " allow_negative, balance, entry_count, last_hash, created_at)"
            " SELECT 'stray', 'stray', 'USD', 'debit', true, 3, 0, last_hash, now()"
            " FROM ledger_accounts WHERE code = 'fiat_buffer'"
        )
    ):
        assert any("stray" in found for found in invariants.conservation())


def test_holds_match_withdrawals_sees_a_stranded_hold(user):
    withdrawal = withdrawal_request(user_id=user, amount="30", address=DESTINATION, chain="ETH")
    assert withdrawal.hold_in_ledger
    assert invariants.holds_match_withdrawals() == []
    with corrupted(
        sql("UPDATE onchain_withdrawals SET status = 'failed' WHERE id = %s", withdrawal.pk)
    ):
        [found] = invariants.holds_match_withdrawals()
        assert "holds 30" in found


def test_conversions_within_source_minimum_sees_a_drained_buffer():
    world.database_reset()  # the model's bands: USDC minimum 50
    fund("usdc_buffer", "100")
    assert invariants.conversions_within_source_minimum() == []
    ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency="USD",
        source_currency="USDC",
        source_amount=Decimal("60"),
        target_currency="USD",
        provider=ConversionProvider.objects.order_by("pk").first(),
        created_by="test",
    )
    [found] = invariants.conversions_within_source_minimum()
    assert "take 60" in found


def test_rollback_possible_sees_a_legacy_row_in_another_currency():
    """A state the rollback cannot rebuild without losing a currency (the database refuses a
    second balance account, so the corruption is a hand-edited legacy row): the check reports
    it, and the trial changes nothing."""
    user = legacy_user("10")
    ledger_balance_set(user, "10")
    phase_set("cutover", read_percent=100)
    assert invariants.rollback_possible() == []
    with connection.cursor() as cursor:
        cursor.execute("UPDATE balances SET currency = 'USD' WHERE user_id = %s", [user])
    [found] = invariants.rollback_possible()
    assert "another currency" in found
    assert invariants.phase() == "cutover"  # the trial rollback was undone
    assert _rows("SELECT buying_power, currency FROM balances WHERE user_id = %s", [user]) == [
        (Decimal(10), "USD")
    ]


def test_custody_matches_providers_sees_a_difference(user):
    held = system_balance(code="usdc_buffer")
    assert (
        invariants.custody_matches_providers(
            circle_wallet=held, due_fiat=Decimal(0), opened={"USDC"}
        )
        == []
    )
    [found] = invariants.custody_matches_providers(
        circle_wallet=held - 1, due_fiat=Decimal(0), opened={"USDC"}
    )
    assert "difference 1" in found


def test_nothing_stuck_sees_a_pending_withdrawal(user):
    assert invariants.nothing_stuck() == []
    withdrawal_request(user_id=user, amount="30", address=DESTINATION, chain="ETH")
    [found] = invariants.nothing_stuck()
    assert "still pending" in found
