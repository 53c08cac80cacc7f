"""The phase table of README.md, shown in both stores: every phase x (credit, debit,
overdraft, ledger failure)."""

import uuid
from decimal import Decimal

import psycopg
import pytest
from django.db import DatabaseError, connection, transaction

from cutover.balance_path import balance_credit, balance_debit, balance_mutation_apply
from cutover.exceptions import KillSwitchEngaged, MutationConflict, StrictLedgerFailure
from cutover.models import (
    BalanceMutation,
    Discrepancy,
    DiscrepancySource,
    LegacyBalance,
    StrictFailure,
)
from cutover.selectors import balance_get, read_bucket
from ledger.exceptions import InsufficientFunds
from ledger.models import Account
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.scans import sequential_scans, sequential_scans_since

pytestmark = pytest.mark.django_db(transaction=True)
ALL = ["legacy", "shadow", "read_switch", "strict", "cutover"]
LEGACY_WRITTEN = {"legacy", "shadow", "read_switch", "strict"}
LEDGER_WRITTEN = {"shadow", "read_switch", "strict", "cutover"}


def stores(user_id) -> tuple[Decimal | None, Decimal | None]:
    legacy = LegacyBalance.objects.filter(user_id=user_id).values_list("buying_power", flat=True)
    ledger = Account.objects.filter(user_id=user_id, account_type="usdc_balance").values_list(
        "balance", flat=True
    )
    return (legacy.first(), ledger.first())


@pytest.fixture
def user():
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "100")
    return user_id


@pytest.mark.parametrize("phase", ALL)
def test_credit(phase, user):
    phase_set(phase)
    result = balance_credit(user_id=user, amount="10.5", reference="c1", reason="test")
    assert result.created and result.phase == phase
    legacy, ledger = stores(user)
    assert legacy == Decimal("110.5" if phase in LEGACY_WRITTEN else "100")
    assert ledger == Decimal("110.5" if phase in LEDGER_WRITTEN else "100")
    assert not Discrepancy.objects.exists()
    assert BalanceMutation.objects.get(reference="c1").ledger_status == (
        "posted" if phase in LEDGER_WRITTEN else "not_written"
    )


@pytest.mark.parametrize("phase", ALL)
def test_debit(phase, user):
    phase_set(phase)
    balance_debit(user_id=user, amount="40", reference="d1", reason="test")
    legacy, ledger = stores(user)
    assert legacy == Decimal("60" if phase in LEGACY_WRITTEN else "100")
    assert ledger == Decimal("60" if phase in LEDGER_WRITTEN else "100")
    assert not Discrepancy.objects.exists()


@pytest.mark.parametrize("phase", ALL)
def test_overdraft_is_refused_in_both_stores(phase, user):
    phase_set(phase)
    with pytest.raises(InsufficientFunds):
        balance_debit(user_id=user, amount="100.01", reference="o1", reason="test")
    assert stores(user) == (Decimal("100"), Decimal("100"))
    assert not BalanceMutation.objects.exists()
    assert not StrictFailure.objects.exists()


@pytest.fixture
def drifted_user():
    """Legacy says 100, the ledger only 30: a debit of 50 fails in the ledger alone."""
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "30")
    return user_id


@pytest.mark.parametrize("phase", ["shadow", "read_switch"])
def test_ledger_failure_in_shadow_phases_is_recorded_request_succeeds(phase, drifted_user):
    phase_set(phase)
    result = balance_debit(user_id=drifted_user, amount="50", reference="f1", reason="test")
    assert result.created and result.ledger_status == "failed"
    assert stores(drifted_user) == (Decimal("50"), Decimal("30"))
    discrepancy = Discrepancy.objects.get(user_id=drifted_user)
    assert discrepancy.source == DiscrepancySource.LEDGER_WRITE_FAILED
    assert discrepancy.difference == Decimal("20")
    assert discrepancy.reference == "f1"
    assert "would go negative" in discrepancy.detail
    assert BalanceMutation.objects.get(reference="f1").ledger_status == "failed"


def test_ledger_failure_in_strict_fails_the_whole_request(drifted_user):
    phase_set("strict")
    with pytest.raises(StrictLedgerFailure, match="ledger refused"):
        balance_debit(user_id=drifted_user, amount="50", reference="f1", reason="test")
    assert stores(drifted_user) == (Decimal("100"), Decimal("30"))  # legacy rolled back
    assert not BalanceMutation.objects.exists()
    assert StrictFailure.objects.get().reference == "f1"


def test_ledger_refusal_in_cutover_is_an_ordinary_refusal(drifted_user):
    phase_set("cutover")
    with pytest.raises(InsufficientFunds):
        balance_debit(user_id=drifted_user, amount="50", reference="f1", reason="test")
    assert stores(drifted_user) == (Decimal("100"), Decimal("30"))
    assert not StrictFailure.objects.exists()


@pytest.fixture
def ledger_fault():
    """A fault injected in the database: entries for one account fail to insert."""

    def install(account_id: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                CREATE FUNCTION test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'injected fault'; END $$;
                CREATE TRIGGER test_fault BEFORE INSERT ON ledger_entries FOR EACH ROW
                    WHEN (NEW.account_id = {int(account_id)}) EXECUTE FUNCTION test_fault();
                """
            )

    yield install
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER IF EXISTS test_fault ON ledger_entries")
        cursor.execute("DROP FUNCTION IF EXISTS test_fault()")


@pytest.mark.parametrize("phase", ALL)
def test_injected_ledger_fault_per_phase(phase, user, ledger_fault):
    phase_set(phase)
    ledger_fault(Account.objects.get(user_id=user).pk)
    if phase in {"strict", "cutover"}:
        with pytest.raises(StrictLedgerFailure, match="injected fault"):
            balance_credit(user_id=user, amount="10", reference="x1", reason="test")
        assert stores(user) == (Decimal("100"), Decimal("100"))
        assert StrictFailure.objects.count() == 1
        return
    result = balance_credit(user_id=user, amount="10", reference="x1", reason="test")
    assert stores(user)[0] == Decimal("110")
    assert stores(user)[1] == Decimal("100")
    if phase == "legacy":
        assert result.ledger_status == "not_written"
        assert not Discrepancy.objects.exists()
    else:
        assert result.ledger_status == "failed"
        assert Discrepancy.objects.get(user_id=user).difference == Decimal("10")


@pytest.mark.parametrize("phase", ALL)
def test_same_reference_is_applied_once(phase, user):
    phase_set(phase)
    first = balance_credit(user_id=user, amount="5", reference="once", reason="test")
    again = balance_credit(user_id=user, amount="5", reference="once", reason="test")
    assert first.created and not again.created
    legacy, ledger = stores(user)
    assert (legacy, ledger) == (
        Decimal("105" if phase in LEGACY_WRITTEN else "100"),
        Decimal("105" if phase in LEDGER_WRITTEN else "100"),
    )
    with pytest.raises(MutationConflict, match="already used"):
        balance_credit(user_id=user, amount="6", reference="once", reason="test")


def test_kill_switch_refuses_every_mutation(user):
    phase_set("shadow", kill_switch=True)
    with pytest.raises(KillSwitchEngaged):
        balance_credit(user_id=user, amount="5", reference="k", reason="test")
    assert stores(user) == (Decimal("100"), Decimal("100"))
    assert not BalanceMutation.objects.exists()


def test_dual_write_notices_a_drift_made_outside_the_path(user):
    phase_set("shadow")
    with connection.cursor() as cursor:  # someone writes the legacy table directly
        cursor.execute("UPDATE balances SET buying_power = 101 WHERE user_id = %s", [user])
    balance_credit(user_id=user, amount="1", reference="n1", reason="test")
    discrepancy = Discrepancy.objects.get(user_id=user)
    assert discrepancy.source == DiscrepancySource.DUAL_WRITE
    assert (discrepancy.legacy_balance, discrepancy.ledger_balance) == (Decimal(102), Decimal(101))


def test_new_user_credit_in_shadow_opens_both_stores():
    phase_set("shadow")
    user_id = uuid.uuid4()
    balance_credit(user_id=user_id, amount="7", reference="new", reason="test")
    assert stores(user_id) == (Decimal("7"), Decimal("7"))


@pytest.mark.parametrize(
    ("phase", "percent", "expected"),
    [
        ("legacy", 0, "legacy"),
        ("shadow", 0, "legacy"),
        ("read_switch", 100, "ledger"),
        ("read_switch", 0, "legacy"),
        ("strict", 100, "ledger"),
        ("cutover", 100, "ledger"),
    ],
)
def test_reads_come_from_the_phase_source(phase, percent, expected, drifted_user):
    phase_set(phase, read_percent=percent)
    reading = balance_get(user_id=drifted_user)
    assert reading.source == expected
    assert reading.amount == Decimal("100" if expected == "legacy" else "30")


def test_read_buckets_are_stable_and_monotonic():
    users = [uuid.uuid4() for _ in range(2000)]
    buckets = {u: read_bucket(u) for u in users}
    assert all(read_bucket(u) == buckets[u] for u in users)
    for low, high in [(1, 10), (10, 50), (50, 100)]:
        at_low = {u for u in users if buckets[u] < low}
        at_high = {u for u in users if buckets[u] < high}
        assert at_low <= at_high
    share = sum(1 for u in users if buckets[u] < 10) / len(users)
    assert 0.07 < share < 0.13


def _written_in_one_transaction(reference: str) -> bool:
    """Whether the journal row and the ledger's entries of `reference` carry the same xmin: one
    top-level transaction with no subtransaction (a subtransaction's rows get its own id)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT bool_and(e.xmin = m.xmin)
              FROM cutover_balance_mutations m
              JOIN ledger_entries e ON e.transaction_id = m.ledger_transaction_id
             WHERE m.reference = %s
            """,
            [reference],
        )
        return cursor.fetchone()[0]


@pytest.mark.parametrize("phase", ["shadow", "read_switch", "strict", "cutover"])
def test_in_autocommit_the_dual_write_runs_without_a_subtransaction(phase, user):
    """The balance path's fast path (p_isolate_ledger false): every row of the mutation in the
    statement's own transaction."""
    phase_set(phase)
    balance_credit(user_id=user, amount="5", reference="fast", reason="test")
    assert _written_in_one_transaction("fast")
    assert stores(user)[1] == Decimal("105")


def test_inside_a_transaction_the_dual_write_keeps_its_subtransaction(user):
    """A failed statement would abort the caller's transaction, so there is no second try: the
    ledger's write is isolated at once."""
    phase_set("shadow")
    with transaction.atomic():
        balance_mutation_apply(
            user_id=user, direction="credit", amount="5", reference="isolated", reason="test"
        )
    assert _written_in_one_transaction("isolated") is False
    assert stores(user) == (Decimal("105"), Decimal("105"))


@pytest.mark.parametrize("phase", ["shadow", "read_switch", "strict", "cutover"])
def test_a_failed_fast_path_answers_as_the_isolated_one(phase, drifted_user):
    """The ledger refuses (legacy 100, ledger 30, a debit of 50): the fast attempt rolls back
    whole and the repeated, isolated call answers: recorded in shadow and read_switch, a strict
    failure in strict, a refusal in cutover. Nothing is written twice."""
    phase_set(phase)
    if phase == "strict":
        with pytest.raises(StrictLedgerFailure):
            balance_debit(user_id=drifted_user, amount="50", reference="f1", reason="test")
        assert stores(drifted_user) == (Decimal("100"), Decimal("30"))
        assert StrictFailure.objects.get().reference == "f1"
    elif phase == "cutover":
        with pytest.raises(InsufficientFunds):
            balance_debit(user_id=drifted_user, amount="50", reference="f1", reason="test")
        assert stores(drifted_user) == (Decimal("100"), Decimal("30"))
        assert not StrictFailure.objects.exists()
    else:
        result = balance_debit(user_id=drifted_user, amount="50", reference="f1", reason="test")
        assert result.ledger_status == "failed"
        assert stores(drifted_user) == (Decimal("50"), Decimal("30"))
        assert BalanceMutation.objects.filter(reference="f1").count() == 1
        assert Discrepancy.objects.get(user_id=drifted_user).occurrences == 1


def test_the_journal_is_read_by_index_however_small_it_was_when_planned(user):
    """The balance path's statements are planned once per connection and kept until the table
    is analyzed again. Planned while the journal was empty (a new deployment, analyzed), its
    reference look-up became a sequential scan, and every later mutation read the whole journal
    (0.1 ms more per mutation at 4,000 rows, growing with it). However small, read by index."""
    phase_set("shadow")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE cutover_balance_mutations")
    with transaction.atomic():
        before = sequential_scans("cutover_balance_mutations")
        for reference in ["r0", "r1", "r2", "r0"]:  # the last, a replay
            balance_mutation_apply(
                user_id=user, direction="credit", amount="1", reference=reference, reason="test"
            )
        sequential = sequential_scans_since(before)
    assert stores(user) == (Decimal("103"), Decimal("103"))
    assert sequential == {"cutover_balance_mutations": 0}


def _backend_terminate() -> None:
    """The server drops this connection (as a restart or an idle timeout would), unseen by it."""
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    with psycopg.connect(connection.connection.info.dsn, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])


@pytest.mark.parametrize("phase", ["legacy", "shadow", "cutover"])
def test_a_mutation_on_a_dropped_connection_reconnects_and_applies_once(phase, user):
    """The balance path runs on psycopg's own cursor, so Django's per-request health check
    never looks at the connection: the first mutation after a restart met a dead socket and
    failed. It now opens the connection again and applies the mutation, once."""
    phase_set(phase)
    _backend_terminate()
    result = balance_credit(user_id=user, amount="7", reference="after-drop", reason="test")
    assert result.created
    legacy, ledger = stores(user)
    assert legacy == Decimal("107" if phase in LEGACY_WRITTEN else "100")
    assert ledger == Decimal("107" if phase in LEDGER_WRITTEN else "100")
    assert BalanceMutation.objects.filter(reference="after-drop").count() == 1


def test_inside_a_transaction_a_dropped_connection_fails_the_call(user):
    """The transaction went with the connection: nothing to repeat, nothing written."""
    phase_set("shadow")
    with pytest.raises(DatabaseError), transaction.atomic():
        _backend_terminate()
        balance_mutation_apply(
            user_id=user, direction="credit", amount="7", reference="in-tx", reason="test"
        )
    connection.close()
    assert stores(user) == (Decimal("100"), Decimal("100"))
    assert not BalanceMutation.objects.filter(reference="in-tx").exists()
