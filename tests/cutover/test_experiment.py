"""The shadow experiment's figures (Scientist's control and candidate): cutover_balance_mutate
times each store's write on the mutation's journal row and marks a mismatch when the stores
differ after a dual write; cutover.history.experiment_per_bucket aggregates them per bucket
(count, mismatch rate with strict failures, p50 and p95 of each store)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from cutover.actors import Actor
from cutover.balance_path import balance_credit, balance_debit
from cutover.exceptions import StrictLedgerFailure
from cutover.history import experiment_per_bucket
from cutover.models import BalanceMutation, Discrepancy, LegacyBalance, StrictFailure
from cutover.phase_machine import phase_rollback
from cutover.selectors import phase_state
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

LEGACY_WRITTEN = {"legacy", "shadow", "read_switch", "strict"}
LEDGER_WRITTEN = {"shadow", "read_switch", "strict", "cutover"}


def journal(reference: str) -> BalanceMutation:
    return BalanceMutation.objects.get(reference=reference)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("phase", ["legacy", "shadow", "read_switch", "strict", "cutover"])
def test_each_mutation_records_the_write_time_of_each_store_it_writes(phase):
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    phase_set(phase)
    balance_credit(user_id=user, amount="10", reference="c1", reason="test")
    balance_debit(user_id=user, amount="4", reference="d1", reason="test")
    for reference in ("c1", "d1"):
        row = journal(reference)
        assert (row.legacy_us is not None) == (phase in LEGACY_WRITTEN)
        assert (row.ledger_us is not None) == (phase in LEDGER_WRITTEN)
        assert all(us > 0 for us in (row.legacy_us, row.ledger_us) if us is not None)
        assert row.mismatch is False
    # A replay answers from the journal and writes no second row.
    assert not balance_credit(user_id=user, amount="10", reference="c1", reason="test").created
    assert BalanceMutation.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_mismatch_is_journaled_with_its_timings_and_counted_per_bucket():
    since = timezone.now() - timedelta(seconds=1)
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    phase_set("shadow")
    balance_credit(user_id=user, amount="10", reference="equal", reason="test")
    # The legacy store changed behind the balance path's back: the next dual write differs.
    with connection.cursor() as cursor:
        cursor.execute("UPDATE balances SET buying_power = 111 WHERE user_id = %s", [user])
    balance_credit(user_id=user, amount="1", reference="differs", reason="test")
    # A ledger write that fails in shadow: the stores differ, the request succeeds.
    other = legacy_user("50")
    ledger_balance_set(other, "5")
    balance_debit(user_id=other, amount="20", reference="refused", reason="test")
    # In strict the same failure fails the request, and its journal row rolls back with it.
    phase_set("strict")
    with pytest.raises(StrictLedgerFailure):
        balance_debit(user_id=other, amount="10", reference="strict", reason="test")

    rows = {r.reference: r for r in BalanceMutation.objects.all()}
    assert sorted(rows) == ["differs", "equal", "refused"]
    assert [rows[r].mismatch for r in ("equal", "differs", "refused")] == [False, True, True]
    assert rows["refused"].ledger_status == "failed"
    assert all(r.legacy_us > 0 and r.ledger_us > 0 for r in rows.values())
    assert Discrepancy.objects.filter(reference="differs", source="dual_write").exists()
    assert Discrepancy.objects.filter(reference="refused", source="ledger_write_failed").exists()
    assert StrictFailure.objects.filter(reference="strict").count() == 1

    until = timezone.now() + timedelta(seconds=1)
    (bucket,) = experiment_per_bucket(since=since, until=until, width=until - since)
    assert (bucket.compared, bucket.mismatches, bucket.strict_failures) == (3, 2, 1)
    assert bucket.experiments == 4 and bucket.mismatch_rate == 0.75
    legacy = sorted(r.legacy_us for r in rows.values())
    ledger = sorted(r.ledger_us for r in rows.values())
    assert (bucket.legacy_p50_us, bucket.legacy_p95_us) == (legacy[1], legacy[2])
    assert (bucket.ledger_p50_us, bucket.ledger_p95_us) == (ledger[1], ledger[2])


@pytest.mark.django_db
def test_the_experiment_per_hour_from_rows_of_known_timings():
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    user = legacy_user("5")
    made = iter(range(1000))

    def row(at, legacy_us, ledger_us, mismatch=False, phase="shadow"):
        BalanceMutation.objects.create(
            reference=f"r{next(made)}",
            user_id=user,
            direction="credit",
            amount=1,
            currency="USDC",
            reason="t",
            phase=phase,
            ledger_status="not_written" if ledger_us is None else "posted",
            created_at=at,
            legacy_us=legacy_us,
            ledger_us=ledger_us,
            mismatch=mismatch,
        )

    def strict_failure(at, phase="strict"):
        StrictFailure.objects.create(at=at, phase=phase, user_id=user, reference="s", error="x")

    # Hour 0: four dual writes, one mismatched, and a strict failure.
    for n, (legacy_us, ledger_us) in enumerate(
        ((300, 1000), (100, 4000), (400, 2000), (200, 3000))
    ):
        row(hour + timedelta(minutes=10 + n), legacy_us, ledger_us, mismatch=n == 2)
    strict_failure(hour + timedelta(minutes=30))
    # ... and what is not an experiment: a legacy-only and a ledger-only write.
    row(hour + timedelta(minutes=40), 50, None, phase="legacy")
    row(hour + timedelta(minutes=41), None, 60, phase="cutover")
    # Hour 2: twenty dual writes, none mismatched; a strict failure in cutover (no control).
    for n in range(1, 21):
        row(hour + timedelta(hours=2, seconds=n), n * 10, 1000 + n, phase="read_switch")
    strict_failure(hour + timedelta(hours=2, minutes=5), phase="cutover")
    # Outside the window: just before it, and at its end.
    row(hour - timedelta(microseconds=1), 1, 1, mismatch=True)
    row(hour + timedelta(hours=3), 1, 1, mismatch=True)

    rows = experiment_per_bucket(
        since=hour, until=hour + timedelta(hours=3), width=timedelta(hours=1)
    )
    assert [
        (
            r.start - hour,
            r.compared,
            r.mismatches,
            r.strict_failures,
            r.legacy_p50_us,
            r.legacy_p95_us,
            r.ledger_p50_us,
            r.ledger_p95_us,
        )
        for r in rows
    ] == [
        (timedelta(0), 4, 1, 1, 200, 400, 2000, 4000),
        (timedelta(hours=1), 0, 0, 0, None, None, None, None),
        (timedelta(hours=2), 20, 0, 0, 100, 190, 1010, 1019),
    ]
    assert [r.mismatch_rate for r in rows] == [0.4, None, 0.0]


@pytest.mark.django_db(transaction=True)
def test_after_a_rollback_from_cutover_the_experiment_counts_dual_writes_only():
    """Cutover writes the ledger alone (no control to compare), the rollback rebuilds the
    legacy store from the ledger and goes back to legacy, and the dual writes of the next
    shadow are compared again: the buckets count the shadow writes before and after, none as
    a mismatch, and none of the ledger-only ones."""
    since = timezone.now() - timedelta(seconds=1)
    users = [legacy_user("100") for _ in range(2)]
    for user in users:
        ledger_balance_set(user, "100")
    phase_set("shadow")
    balance_credit(user_id=users[0], amount="1", reference="shadow", reason="test")
    phase_set("cutover")
    balance_credit(user_id=users[0], amount="2", reference="cutover-1", reason="test")
    balance_debit(user_id=users[1], amount="3", reference="cutover-2", reason="test")
    phase_rollback(actor=Actor("ops"), reason="incident")
    assert phase_state().phase == "legacy"
    phase_set("shadow")
    balance_credit(user_id=users[1], amount="4", reference="after", reason="test")

    rows = {r.reference: r for r in BalanceMutation.objects.all()}
    assert [rows[r].legacy_us is None for r in ("shadow", "cutover-1", "cutover-2", "after")] == [
        False,
        True,
        True,
        False,
    ]
    assert not any(r.mismatch for r in rows.values())
    assert not Discrepancy.objects.exists()
    until = timezone.now() + timedelta(seconds=1)
    (bucket,) = experiment_per_bucket(since=since, until=until, width=until - since)
    assert (bucket.compared, bucket.mismatches, bucket.strict_failures) == (2, 0, 0)
    assert bucket.legacy_p50_us is not None and bucket.ledger_p95_us is not None
    balances = dict(LegacyBalance.objects.values_list("user_id", "buying_power"))
    assert balances == {users[0]: Decimal("103"), users[1]: Decimal("101")}
