"""The backfill spread over processes and Celery workers (cutover.backfill: a run's disjoint
user ranges, each with its own checkpoint, taken FOR UPDATE SKIP LOCKED), tried as an adversary
would: two backfills must really work at once, and each user must still be posted exactly once
under live traffic, with a worker SIGKILLed mid-chunk, the ledger verified and money conserved;
the ranges' chunks post against different shards of opening-balance equity, and every reader
sums them. Real processes, real Celery workers over Redis, real connections."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from django.db import connection, connections
from django.db.models import Count, Sum

from config.celery import app
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.exceptions import MutationConflict
from cutover.models import (
    BackfillPosting,
    BackfillRange,
    BackfillRun,
    BalanceMutation,
    LegacyBalance,
)
from ledger.exceptions import InsufficientFunds
from ledger.models import Account, Entry, Transaction
from ledger.selectors import ledger_integrity_checks, shard_codes, system_balance
from ledger.services import account_open
from rehearsal.runtime import processes_run
from tests.celery import wait_for
from tests.cutover.factories import custody_open_all, database_url, legacy_user, phase_set
from tests.model import invariants

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
EQUITY = "opening_balance_equity_usdc"
BROKER = "redis://127.0.0.1:6379/11"
QUIET = ("--without-heartbeat", "--without-mingle", "--without-gossip")


def legacy_users(count: int, seed: int = 14) -> list[uuid.UUID]:
    rng = random.Random(seed)
    return [legacy_user(Decimal(rng.randint(1, 100_000)) / 100) for _ in range(count)]


def differing(users) -> list[str]:
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


def posted_once_each(users) -> None:
    """Every user has exactly one backfill posting per state of their account, and the ones no
    traffic moved exactly one."""
    twice = BackfillPosting.objects.values("user_id", "entries_before").annotate(n=Count("id"))
    assert not twice.filter(n__gt=1).exists()
    assert set(BackfillPosting.objects.values_list("user_id", flat=True)) == set(users)


def other_connection() -> psycopg.Connection:
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"],
        port=db["PORT"] or None,
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname=db["NAME"],
        autocommit=True,
    )


def waiting_on(watcher: psycopg.Connection, holder: int, names: str) -> list[str]:
    """The application names of the sessions (named like `names`) that `holder` blocks."""
    rows = watcher.execute(
        "SELECT application_name FROM pg_stat_activity"
        " WHERE %s = ANY(pg_blocking_pids(pid)) AND application_name LIKE %s",
        [holder, names],
    ).fetchall()
    return [name for (name,) in rows]


def named_url(name: str) -> str:
    url = database_url()
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


# Two processes at once --------------------------------------------------------------------------


def test_a_second_backfill_works_other_ranges_while_the_first_waits_on_a_user():
    """The first backfill is stopped inside a chunk of the first range (the test holds a user's
    legacy row there, as a slow live mutation would). A second one, started after, finishes
    every other range meanwhile: the ranges are worked at once, not in turn behind the run's
    lock. Let go, the first finishes its range; each user is posted once."""
    users = legacy_users(50)
    held = sorted(users)[0]  # in the first range, whatever the bounds
    command = [
        *(sys.executable, "manage.py", "cutover", "backfill", "--json"),
        *("--chunk-size", "3", "--range-users", "10"),
    ]
    with other_connection() as holder, other_connection() as watcher:
        holder.autocommit = False
        holder.execute("SELECT 1 FROM balances WHERE user_id = %s FOR UPDATE", [held])
        (holder_pid,) = holder.execute("SELECT pg_backend_pid()").fetchone()
        first = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "DATABASE_URL": named_url("backfill-1")}
        )
        assert wait_for(lambda: waiting_on(watcher, holder_pid, "backfill-1"), 120, every=0.05)
        second = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": named_url("backfill-2")},
            stdout=subprocess.DEVNULL,
        )
        run = BackfillRun.objects.get()
        ranges = BackfillRange.objects.filter(run=run)
        assert ranges.count() >= 3
        # Every range but the held user's finishes while the first still waits in it (the
        # second then waits for that range too, to take it over if the first dies).
        assert wait_for(lambda: ranges.filter(finished_at__isnull=True).count() == 1, 120)
        assert first.poll() is None and waiting_on(watcher, holder_pid, "backfill-1")
        holder.rollback()
        assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    run.refresh_from_db()
    assert run.finished_at is not None and run.users_examined == 50 == run.postings
    posted_once_each(users)
    assert differing(users) == [] and verify_problems() == []


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
    result = backfill_run(chunk_size=5, range_users=15)
    connection.close()
    return {"runs": result.runs, "users": result.users_examined, "chunks": result.chunks}


def role(name: str, *args):
    return {"traffic": traffic, "backfill": backfill_worker}[name](*args)


@pytest.mark.parametrize("phase", ["legacy", "shadow"])
def test_two_backfills_under_live_traffic_post_each_difference_once(phase):
    """Two backfills at once over a run of ranges while 3 processes credit and debit the same
    users through the balance path. Both take chunks; in shadow every user is equal right
    after; in legacy with custody open (each mutation mirrored against the user's equity shard,
    beside the ranges' shards the chunks post against) a second run makes every user equal.
    Each difference posted once, the ledger verified, money conserved."""
    users = legacy_users(150)
    if phase == "legacy":
        custody_open_all(usdc=sum(row.buying_power for row in LegacyBalance.objects.all()))
    phase_set(phase)
    connections.close_all()
    start_at = time.time() + 1.0
    results = processes_run(
        role,
        [
            ("backfill", start_at),
            ("backfill", start_at),
            *[("traffic", w, users, start_at, 3.0) for w in range(3)],
        ],
    )
    first, second = results[0], results[1]
    assert first["chunks"] > 0 and second["chunks"] > 0, "both backfills take chunks"
    run = BackfillRun.objects.get(pk=first["runs"][0])
    assert run.finished_at is not None and run.users_examined >= 150
    assert BackfillRange.objects.filter(run=run).count() >= 5
    during = BalanceMutation.objects.filter(
        created_at__gt=run.started_at, created_at__lt=run.finished_at
    ).count()
    assert during > 0, "the traffic should run while the chunks post"
    if phase == "legacy":
        backfill_run(chunk_size=5)
    assert differing(users) == []
    posted_once_each(users)
    assert verify_problems() == []
    assert invariants.conservation() == [] and invariants.transactions_balanced() == []


# Equity's shards --------------------------------------------------------------------------------


def equity_accounts_posted() -> dict[str, Decimal]:
    """Each equity shard a backfill posting touched, with its balance."""
    touched = Entry.objects.filter(
        transaction__namespace="backfill", account__code__in=shard_codes(EQUITY)
    ).values_list("account__code", flat=True)
    return dict(Account.objects.filter(code__in=set(touched)).values_list("code", "balance"))


def test_parallel_ranges_post_against_equity_shards_that_every_reader_sums():
    """Ranges post their chunks against different shards of opening-balance equity (no two
    parallel chunks on one row); no posting touches two of them. Equity's balance is the sum
    over its shards: what the users were given, which its base alone no longer shows; custody
    opened before (against the base) and the legacy mirror (against the user's shard) net out
    in the conservation equation."""
    users = legacy_users(60, seed=3)
    total = sum(LegacyBalance.objects.values_list("buying_power", flat=True))
    connections.close_all()
    processes_run(backfill_worker, [(time.time(),), (time.time(),)])
    shards = equity_accounts_posted()
    assert len(shards) >= 3, shards
    per_posting = (
        Entry.objects.filter(
            transaction__namespace="backfill", account__code__in=shard_codes(EQUITY)
        )
        .values("transaction_id")
        .annotate(n=Count("id"))
    )
    assert {row["n"] for row in per_posting} == {1}
    assert system_balance(code=EQUITY) == total  # debit-normal: what the backfill gave out
    assert Account.objects.get(code=EQUITY).balance != total
    assert sum(shards.values()) == total
    users_total = Account.objects.filter(user_id__in=users).aggregate(s=Sum("balance"))["s"]
    assert users_total == total
    # Custody opened afterwards books the buffer against equity's base: the shards' sum nets.
    custody_open_all(usdc=total)
    assert system_balance(code=EQUITY) == 0
    assert invariants.conservation() == []


def test_the_legacy_mirror_posts_against_the_users_equity_shard():
    """In legacy with custody open, a mutation's counterparty side is mirrored against the
    user's shard of equity (hashtext(user_id) modulo 64, as the clearing accounts); a reversal
    against equity itself moves nothing in the ledger."""
    user = legacy_user("50")
    custody_open_all(usdc="50")
    with connection.cursor() as cursor:
        cursor.execute("SELECT abs(hashtext(%s::text)::bigint) %% 64", [str(user)])
        (shard,) = cursor.fetchone()
    code = EQUITY if shard == 0 else f"{EQUITY}#{shard}"
    mirrored = balance_credit(user_id=user, amount="5", reference="m1", reason="t")
    legs = list(
        Entry.objects.filter(transaction_id=mirrored.ledger_transaction_id).values_list(
            "account__code", "side"
        )
    )
    assert len(legs) == 2 and (code, "credit") in legs, legs
    assert system_balance(code=EQUITY) == Decimal("-55")  # custody's 50, the mirror's 5
    reversal = balance_credit(
        user_id=user, amount="2", reference="m2", reason="t", counterparty=EQUITY
    )
    assert reversal.ledger_transaction_id is None
    assert invariants.conservation() == []


def test_a_user_whose_ledger_account_holds_another_currency_is_refused():
    """CU003, as before ranges: the chunk rolls back, nothing of it posted."""
    user = legacy_user("10")
    account_open(user_id=user, account_type="usd_balance", currency="USD")
    with pytest.raises(MutationConflict, match="a user has one currency"):
        backfill_run()
    assert not BackfillPosting.objects.exists()
    assert not Transaction.objects.filter(namespace="backfill").exists()


# Real Celery workers (prefork, one pool process each, as deployed) ------------------------------


@contextmanager
def workers(count: int, range_users: int) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """`count` Celery workers on a queue of their own; worker i's database sessions are named
    `backfill-w<i>` (application_name)."""
    queue = f"backfill-{uuid.uuid4().hex[:8]}"
    processes = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queue),
                *("-c", "1", "-n", f"w{i}-{queue}@%h", *QUIET),
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "DATABASE_URL": named_url(f"backfill-w{i}"),
                "CELERY_BROKER_URL": BROKER,
                "BACKFILL_RANGE_USERS": str(range_users),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
    ]
    try:
        yield queue, processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=60)


def lead(queue: str, chunk_size: int) -> None:
    """An operator's (or the bench's) leader message."""
    with app.connection_for_write(BROKER) as broker:
        app.send_task("cutover.backfill", args=[chunk_size], queue=queue, connection=broker)


def finished_run(seconds: float = 240) -> BackfillRun:
    done = BackfillRun.objects.filter(finished_at__isnull=False)
    assert wait_for(done.exists, seconds, every=0.05)
    return done.order_by("pk").first()


def pool_process(worker: subprocess.Popen) -> int:
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    assert wait_for(lambda: children.read_text().split(), 180)
    return int(children.read_text().split()[0])


def test_two_celery_workers_take_a_runs_ranges():
    """The leader message opens the run and asks a helper. The worker that takes the first
    range is stopped inside its chunk (the test holds a user's legacy row there); every other
    range finishes meanwhile, which only the other worker can have done. Let go, the run
    finishes: every user posted once, verified, conserved."""
    users = legacy_users(80, seed=5)
    held = sorted(users)[0]  # in the first range, whatever the bounds
    custody_open_all(usdc=sum(row.buying_power for row in LegacyBalance.objects.all()))
    with (
        other_connection() as holder,
        other_connection() as watcher,
        workers(2, range_users=8) as (queue, _),
    ):
        holder.autocommit = False
        holder.execute("SELECT 1 FROM balances WHERE user_id = %s FOR UPDATE", [held])
        (holder_pid,) = holder.execute("SELECT pg_backend_pid()").fetchone()
        lead(queue, 2)
        assert wait_for(lambda: waiting_on(watcher, holder_pid, "backfill-w%"), 180, every=0.05)
        (stopped,) = waiting_on(watcher, holder_pid, "backfill-w%")
        ranges = BackfillRange.objects.filter(run=BackfillRun.objects.get())
        assert ranges.count() >= 3
        assert wait_for(lambda: ranges.filter(finished_at__isnull=True).count() == 1, 180)
        assert waiting_on(watcher, holder_pid, "backfill-w%") == [stopped]
        holder.rollback()
        run = finished_run()
    assert run.users_examined == 80 == run.postings
    posted_once_each(users)
    assert differing(users) == [] and verify_problems() == []
    assert invariants.conservation() == []


def test_a_celery_worker_killed_mid_chunk_leaves_its_range_to_the_other():
    """A worker is SIGKILLed (its pool process and itself: a node lost) while its chunk waits
    on a user's legacy row, its postings not made: the chunk rolls back, and the other worker
    takes the range from its last committed checkpoint once PostgreSQL ends the dead session.
    The run finishes with every user posted exactly once."""
    users = legacy_users(60, seed=9)
    held = sorted(users)[25]
    with (
        other_connection() as holder,
        other_connection() as watcher,
        workers(2, range_users=10) as (queue, processes),
    ):
        holder.autocommit = False
        holder.execute("SELECT 1 FROM balances WHERE user_id = %s FOR UPDATE", [held])
        (holder_pid,) = holder.execute("SELECT pg_backend_pid()").fetchone()
        lead(queue, 2)
        assert wait_for(lambda: waiting_on(watcher, holder_pid, "backfill-w%"), 180, every=0.05)
        (name,) = waiting_on(watcher, holder_pid, "backfill-w%")
        killed = processes[int(name.removeprefix("backfill-w"))]
        survivor = processes[1 - processes.index(killed)]
        for pid in (pool_process(killed), killed.pid):
            os.kill(pid, signal.SIGKILL)
        holder.rollback()
        run = finished_run()
        assert survivor.poll() is None
    assert run.users_examined == 60 == run.postings
    posted_once_each(users)
    per_user = BackfillPosting.objects.values("user_id").annotate(n=Count("id"))
    assert {row["n"] for row in per_user} == {1}
    assert differing(users) == [] and verify_problems() == []
    assert invariants.conservation() == [] and invariants.transactions_balanced() == []


def test_the_command_hands_ranges_to_celery_workers_beside_itself():
    """`cutover backfill --helpers 1 --queue Q`: the command asks a worker to take the run's
    ranges while it takes them too. Whichever of the two takes the first range is stopped inside
    its chunk (the test holds a user's legacy row there); every other range finishes meanwhile,
    which only the other can have done. Let go, both have posted chunks, every user once."""
    users = legacy_users(60, seed=11)
    held = sorted(users)[0]  # in the first range, whatever the bounds
    parties = "backfill-%"  # the command's session and the worker's
    with (
        other_connection() as holder,
        other_connection() as watcher,
        workers(1, range_users=10) as (queue, _),
    ):
        holder.autocommit = False
        holder.execute("SELECT 1 FROM balances WHERE user_id = %s FOR UPDATE", [held])
        (holder_pid,) = holder.execute("SELECT pg_backend_pid()").fetchone()
        command = subprocess.Popen(
            [
                *(sys.executable, "manage.py", "cutover", "backfill", "--json"),
                *("--chunk-size", "1", "--range-users", "10", "--helpers", "1", "--queue", queue),
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "DATABASE_URL": named_url("backfill-command"),
                "CELERY_BROKER_URL": BROKER,
            },
            stdout=subprocess.PIPE,
            text=True,
        )
        assert wait_for(lambda: waiting_on(watcher, holder_pid, parties), 180, every=0.05)
        ranges = BackfillRange.objects.filter(run=BackfillRun.objects.get())
        assert ranges.count() >= 3
        assert wait_for(lambda: ranges.filter(finished_at__isnull=True).count() == 1, 180)
        assert len(waiting_on(watcher, holder_pid, parties)) == 1
        holder.rollback()
        out, _ = command.communicate(timeout=300)
    assert command.returncode == 0
    summary = json.loads(out)
    assert summary["helpers"] == 1 and summary["users_pending_now"] == 0
    assert 0 < summary["users_examined"] < 60  # the worker's chunks are not the command's
    run = BackfillRun.objects.get(pk=summary["runs"][0])
    assert run.users_examined == 60 == run.postings
    posted_once_each(users)
    assert differing(users) == [] and verify_problems() == []


def test_a_run_left_from_before_ranges_gets_them_when_resumed():
    """A run the run-wide checkpoint left unfinished (cutover 0019 came after it) is given
    ranges by the next backfill, which covers every user from the first (only differences are
    posted: the users it had passed are equal already)."""
    users = legacy_users(20, seed=4)
    old = BackfillRun.objects.create(position=sorted(users)[9])
    result = backfill_run(chunk_size=4, range_users=5)
    assert result.runs[0] == old.pk and result.resumed
    assert BackfillRange.objects.filter(run=old).count() >= 3
    old.refresh_from_db()
    assert old.finished_at is not None and old.postings == 20
    posted_once_each(users)
    assert differing(users) == [] and verify_problems() == []
