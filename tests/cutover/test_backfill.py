"""The chunked backfill (cutover.backfill, cutover_backfill_range_chunk): several chunks under live
traffic through the balance path end exact; a rerun posts nothing; a backfill killed mid-chunk
resumes its run and posts every user once; the database refuses a second posting of one
difference. Real processes, real connections."""

import json
import os
import random
import re
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import Count

from cutover.backfill import backfill_progress, backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.models import (
    BackfillPosting,
    BackfillRange,
    BackfillRun,
    BalanceMutation,
    LegacyBalance,
)
from cutover.tasks import backfill_ranges_task
from ledger.exceptions import InsufficientFunds
from ledger.models import Account, Transaction
from ledger.selectors import ledger_integrity_checks
from rehearsal.runtime import processes_run
from tests.cutover.factories import custody_open_all, database_url, legacy_user, phase_set
from tests.model import invariants

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
CHUNK = 7


def legacy_users(count: int, seed: int = 14) -> list[uuid.UUID]:
    rng = random.Random(seed)
    return [legacy_user(Decimal(rng.randint(0, 100_000)) / 100) for _ in range(count)]


def differing(users) -> list[str]:
    """Users whose ledger balance (0 without an account) is not their legacy balance."""
    ledger = dict(
        Account.objects.filter(user_id__in=users, account_type="usdc_balance").values_list(
            "user_id", "balance"
        )
    )
    return [
        f"{row.user_id}: legacy {row.buying_power}, ledger {ledger.get(row.user_id)}"
        for row in LegacyBalance.objects.filter(user_id__in=users)
        if row.buying_power != ledger.get(row.user_id, Decimal(0))
    ]


def verify_problems() -> list[str]:
    return [problem for check in ledger_integrity_checks() for problem in check.problems]


def traffic(worker: int, users: list, start_at: float, seconds: float) -> int:
    """Credits and debits through the balance path until the window closes; how many applied."""
    rng = random.Random(worker)
    time.sleep(max(0.0, start_at - time.time()))
    applied = 0
    while time.time() < start_at + seconds:
        mutate = balance_credit if rng.random() < 0.5 else balance_debit
        try:
            mutate(
                user_id=rng.choice(users),
                amount=Decimal(rng.randint(1, 5000)) / 100,
                reference=str(uuid.uuid4()),
                reason="live",
            )
        except InsufficientFunds:
            continue
        applied += 1
    connection.close()
    return applied


def backfill_worker(start_at: float) -> dict:
    time.sleep(max(0.0, start_at - time.time() + 0.3))
    result = backfill_run(chunk_size=CHUNK)
    connection.close()
    return {"runs": result.runs, "users": result.users_examined, "postings": result.postings}


def role(name: str, *args):
    return {"traffic": traffic, "backfill": backfill_worker}[name](*args)


@pytest.mark.parametrize("phase", ["legacy", "shadow"])
def test_chunks_under_live_traffic_end_exact_and_verified(phase):
    """A backfill of several chunks while 3 processes credit and debit the same users through
    the balance path. In shadow (both stores written) every user is equal right after it: no
    mutation was lost or counted twice by a chunk. In legacy (custody open: each mutation's
    counterparty mirrored against equity, the account the chunks post against) the users the
    traffic moved after their chunk differ until a second run, which makes every user equal."""
    users = legacy_users(150)
    if phase == "legacy":
        custody_open_all(usdc=sum(row.buying_power for row in LegacyBalance.objects.all()))
    phase_set(phase)
    connections.close_all()
    start_at = time.time() + 1.0
    results = processes_run(
        role,
        [("backfill", start_at), *[("traffic", w, users, start_at, 3.0) for w in range(3)]],
    )
    backfilled = results[0]
    (run_id,) = backfilled["runs"]
    run = BackfillRun.objects.get(pk=run_id)
    assert run.finished_at is not None and run.chunks >= 150 // CHUNK
    during = BalanceMutation.objects.filter(
        created_at__gt=run.started_at, created_at__lt=run.finished_at
    ).count()
    assert during > 0, "the traffic should run while the chunks post"
    assert Transaction.objects.filter(namespace="backfill").count() == run.chunks
    if phase == "shadow":
        assert differing(users) == []
    else:
        backfill_run(chunk_size=CHUNK)
        assert differing(users) == []
        assert invariants.conservation() == []
    assert verify_problems() == []
    twice = BackfillPosting.objects.values("user_id", "entries_before").annotate(n=Count("id"))
    assert not twice.filter(n__gt=1).exists()


def test_a_rerun_posts_nothing():
    users = legacy_users(30)
    first = backfill_run(chunk_size=CHUNK)
    assert first.postings == 30 and first.users_examined == 30
    assert Transaction.objects.filter(namespace="backfill").count() == 5  # ceil(30 / 7)
    again = backfill_run(chunk_size=CHUNK)
    assert (again.users_examined, again.postings, again.amount) == (0, 0, 0)
    assert again.runs != first.runs and not again.resumed
    assert Transaction.objects.filter(namespace="backfill").count() == 5
    assert BackfillPosting.objects.count() == 30
    assert differing(users) == [] and verify_problems() == []


def test_a_user_moved_in_legacy_is_adjusted_by_the_next_run_only_by_the_difference():
    user = legacy_user("40")
    backfill_run()
    balance_debit(user_id=user, amount="15.5", reference="r1", reason="t")  # legacy only
    result = backfill_run()
    assert (result.postings, result.amount) == (1, Decimal("15.5"))
    postings = BackfillPosting.objects.filter(user_id=user).order_by("entries_before")
    assert [(p.entries_before, p.amount, p.legacy_balance) for p in postings] == [
        (0, Decimal("40"), Decimal("40")),
        (1, Decimal("-15.5"), Decimal("24.5")),
    ]
    assert differing([user]) == [] and verify_problems() == []


def test_killed_mid_chunk_resumes_the_run_and_posts_every_user_once():
    """kill -9 at `backfill:chunk-posted` (the chunk's postings made, not committed) in the
    third chunk: two chunks committed with the run's checkpoint, the third rolled back. A user
    the killed run had passed then moves in legacy. The next `cutover backfill` resumes the run
    after its checkpoint, then passes again from the first user: every user posted once, the
    moved one adjusted once by the difference."""
    users = legacy_users(100)
    env = {**os.environ, "DATABASE_URL": database_url()}
    command = [sys.executable, "manage.py", "cutover", "backfill", "--chunk-size", "20"]
    armed = {**env, "LEDGER_FAULT_POINT": "backfill:chunk-posted", "LEDGER_FAULT_AFTER": "3"}
    killed = subprocess.run(command, cwd=ROOT, env=armed, capture_output=True, text=True)
    assert killed.returncode == -9
    run = BackfillRun.objects.get()
    progress = backfill_progress(run_id=run.pk)
    assert run.finished_at is None and (progress["chunks"], progress["users_examined"]) == (2, 40)
    assert BackfillPosting.objects.count() == 40
    assert len(differing(users)) == 60
    moved = sorted(users)[0]  # passed by the killed run
    balance_credit(user_id=moved, amount="2.5", reference="moved", reason="t")  # legacy only
    resumed = subprocess.run([*command, "--json"], cwd=ROOT, env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["runs"][0] == run.pk and summary["resumed"] is True
    assert (summary["users_examined"], summary["postings"]) == (61, 61)
    assert summary["users_pending_now"] == 0
    posted = sorted(BackfillPosting.objects.values_list("user_id", flat=True))
    assert posted == sorted([*users, moved])  # each once, the moved one adjusted once more
    assert BackfillPosting.objects.get(user_id=moved, entries_before=1).amount == Decimal("2.5")
    assert differing(users) == [] and verify_problems() == []


def backends_waiting_in_backfill() -> int:
    """Sessions waiting on a lock in a backfill statement: a range's chunk (on a user's row) or
    a take of a range (on a range another holds)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # fresh within this transaction
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%cutover_backfill_range%%'"
        )
        return cursor.fetchone()[0]


def test_two_backfills_at_once_one_killed_mid_chunk_post_every_user_once():
    """Two operators run `cutover backfill` at once over a run of several user ranges, and one
    is killed at `backfill:chunk-posted` (its chunk's postings made, not committed) while the
    other works the run's other ranges. A user's legacy row is held by the test meanwhile, so
    the first cannot finish before the second dies: the second dies in its second chunk beside
    it, or waits for the held range (every other one finished) and dies once the row is let
    go. The first takes the dead one's range from its last committed checkpoint and goes on
    to the end; a run after both finds nothing pending: every user posted exactly once, the
    ledger verified, conservation kept."""
    users = legacy_users(60, seed=21)
    held = sorted(users)[20]
    env = {**os.environ, "DATABASE_URL": database_url()}
    command = [
        *(sys.executable, "manage.py", "cutover", "backfill", "--json"),
        *("--chunk-size", "1", "--range-users", "10"),
    ]
    armed = {**env, "LEDGER_FAULT_POINT": "backfill:chunk-posted", "LEDGER_FAULT_AFTER": "2"}
    with transaction.atomic():
        LegacyBalance.objects.select_for_update().get(user_id=held)
        survivor = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        killed = subprocess.Popen(command, cwd=ROOT, env=armed, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # Held until the second has died beside the first, or waits with it.
        while killed.poll() is None and backends_waiting_in_backfill() < 2:
            assert survivor.poll() is None
            assert time.monotonic() < deadline, "the two backfills never met"
            time.sleep(0.05)
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    shared, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0
    assert json.loads(shared)["users_examined"] < len(users)  # the other's chunks counted
    (run,) = BackfillRun.objects.filter(finished_at__isnull=False).order_by("pk")[:1]
    assert BackfillRange.objects.filter(run=run).count() >= 3
    assert run.users_examined == len(users) == run.postings  # the run's sums: each user once
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["users_pending_now"] == 0
    per_user = BackfillPosting.objects.values("user_id").annotate(n=Count("id"))
    assert sorted(row["user_id"] for row in per_user) == sorted(users)
    assert {row["n"] for row in per_user} == {1}
    assert differing(users) == [] and verify_problems() == []
    assert invariants.conservation() == [] and invariants.transactions_balanced() == []


def test_the_database_refuses_a_second_posting_of_the_same_difference():
    user = legacy_user("12.34")
    backfill_run()
    first = BackfillPosting.objects.get(user_id=user)
    with (
        pytest.raises(IntegrityError, match="cutover_backfill_postings_uniq_user_state"),
        transaction.atomic(),
    ):
        BackfillPosting.objects.create(
            run_id=first.run_id,
            user_id=user,
            currency="USDC",
            entries_before=first.entries_before,
            legacy_balance=first.legacy_balance,
            amount=first.amount,
            ledger_transaction_id=first.ledger_transaction_id,
        )


def test_one_unfinished_run_at_a_time():
    BackfillRun.objects.create()
    with (
        pytest.raises(IntegrityError, match="cutover_backfill_runs_uniq_unfinished"),
        transaction.atomic(),
    ):
        BackfillRun.objects.create()


def test_a_backfill_that_grows_the_ledger_refreshes_its_statistics():
    """From 1,000 users examined on (and at each doubling), the ledger's tables are analyzed:
    plans cached while they were empty would scan them whole once they hold a million rows."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        (started,) = cursor.fetchone()
        cursor.execute(
            "INSERT INTO balances (user_id, buying_power, currency) "
            "SELECT gen_random_uuid(), g / 100.0, 'USDC' FROM generate_series(1, 1200) g"
        )
    result = backfill_run(chunk_size=400)
    assert result.postings == 1200
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname FROM pg_stat_user_tables WHERE last_analyze >= %s ORDER BY 1",
            [started],
        )
        analyzed = [name for (name,) in cursor.fetchall()]
    assert analyzed == ["ledger_accounts", "ledger_entries", "ledger_transactions"]


def test_the_backfill_command_refuses_bad_flags_naming_them_and_opens_no_run():
    """A careless operator's backfill flags: each refused before anything is opened, the flag
    named (a negative helper count, a range or chunk of no users, not a number)."""
    legacy_users(5)
    refusals = [
        (("--helpers", "-1"), "argument --helpers: invalid int value: '-1' (a whole number"),
        (("--chunk-size", "3000000000"), "--chunk-size: invalid positive_int value"),
        (("--helpers", "two"), "argument --helpers: invalid int value: 'two'"),
        (("--range-users", "0"), "argument --range-users: invalid positive_int value: '0'"),
        (("--chunk-size", "0"), "argument --chunk-size: invalid positive_int value: '0'"),
    ]
    for flag, message in refusals:
        with pytest.raises(CommandError, match=re.escape(message)):
            call_command("cutover", "backfill", *flag, stdout=StringIO())
    assert not BackfillRun.objects.exists() and not BackfillRange.objects.exists()
    assert not BackfillPosting.objects.exists()


def test_a_helper_message_delivered_after_its_run_finished_changes_nothing():
    """`cutover.backfill_ranges` redelivered, or delivered late, after its run has finished:
    nothing is taken or posted, not even for a user whose legacy balance moved since (that is
    the next backfill's), and the run's figures stay as they were."""
    users = legacy_users(12)
    (run_id,) = backfill_run(chunk_size=CHUNK, range_users=4).runs
    run = BackfillRun.objects.get(pk=run_id)
    balance_credit(user_id=users[0], amount="3", reference="late", reason="t")  # legacy only
    answer = backfill_ranges_task(run_id, CHUNK)
    assert (answer["chunks"], answer["users_examined"], answer["postings"]) == (0, 0, 0)
    assert BackfillPosting.objects.count() == run.postings == 12
    again = BackfillRun.objects.get(pk=run_id)
    assert (again.finished_at, again.users_examined) == (run.finished_at, run.users_examined)
    assert len(differing(users)) == 1
