"""`bench backfill` and `bench gates` at a test size, on the test database: what they measure
happened (every seeded user backfilled once under the live traffic, by either path; the walk
reaches cutover through both gates, each with its fence time) and the ledger verifies."""

import pytest
from django.db import connection
from django.db.models import Count

from cutover.models import BackfillPosting, BalanceMutation, PhaseState
from ledger.models import Transaction
from ledger.selectors import ledger_integrity_checks
from rehearsal.bench_backfill import (
    backfill_measure,
    backfill_seed,
    backfill_workers_measure,
    gates_measure,
    gates_seed,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_chunked_backfill_under_live_traffic_posts_every_user_once():
    backfill_seed(300, custody=True)
    result = backfill_measure("chunked", 300, chunk_size=40, rps=20, idle=0.5)
    assert (result["users"], result["postings"]) == (300, 300)
    posted = BackfillPosting.objects.values("user_id").annotate(n=Count("id"))
    assert posted.count() == 300 and not posted.filter(n__gt=1).exists()
    assert BalanceMutation.objects.filter(reason="bench live traffic").exists()
    assert all(check.ok for check in ledger_integrity_checks())


def test_the_backfill_by_two_celery_workers_under_live_traffic_posts_every_user_once():
    """`bench backfill --workers 2`: real Celery workers take the run's ranges under the live
    traffic (custody open: each mutation mirrored against equity's shards)."""
    backfill_seed(300, custody=True)
    database = connection.settings_dict["NAME"]
    result = backfill_workers_measure(
        database, 2, 300, chunk_size=20, rps=20, idle=0.5, range_users=40
    )
    assert (result["users"], result["postings"], result["workers"]) == (300, 300, 2)
    assert result["ranges"] >= 5 and result["users_per_second"] > 0
    posted = BackfillPosting.objects.values("user_id").annotate(n=Count("id"))
    assert posted.count() == 300 and not posted.filter(n__gt=1).exists()
    assert all(check.ok for check in ledger_integrity_checks())


def test_the_per_user_path_posts_a_transaction_per_user():
    backfill_seed(60, custody=False)
    result = backfill_measure("per_user", 60, chunk_size=25, rps=20, idle=0.5)
    assert (result["users"], result["postings"]) == (60, 60)
    assert Transaction.objects.filter(namespace="backfill").count() == 60
    assert all(check.ok for check in ledger_integrity_checks())


def test_the_gates_walk_reaches_cutover_through_both_gates_with_their_fence_times():
    gates_seed(200)
    rows = gates_measure()
    assert [(row["gate"], row["passed"]) for row in rows] == [
        ("legacy -> shadow", True),
        ("strict -> cutover", True),
    ]
    assert all(row["fence_ms"] >= 0 for row in rows)
    assert PhaseState.objects.get(pk=1).phase == "cutover"
