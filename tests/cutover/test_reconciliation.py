"""Reconciliation: set-based per chunk, a single leader per run, chunks taken by real Celery
workers over Redis (several at once, one killed mid-chunk, under traffic)."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import F

from config.celery import app
from cutover.balance_path import balance_credit, balance_debit
from cutover.exceptions import NotApplicable, ReconciliationBusy
from cutover.locks import RECONCILE_LOCK
from cutover.models import (
    Discrepancy,
    LegacyBalance,
    ReconciliationChunk,
    ReconciliationDifference,
    ReconciliationRun,
)
from cutover.reconciliation import reconciliation_run, reconciliation_start, reconciliation_work
from cutover.tasks import reconciliation_task
from tests.celery import wait_for
from tests.cutover.factories import database_url, ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent


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


def test_finds_records_and_resolves():
    phase_set("shadow")
    agree = legacy_user("10")
    ledger_balance_set(agree, "10")
    drift = legacy_user("10")
    ledger_balance_set(drift, "9.99")
    unbackfilled = legacy_user("3")
    first = reconciliation_run(triggered_by="test")
    assert (first.users_checked, first.differences, first.new_discrepancies) == (3, 2, 2)
    assert first.legacy_total == Decimal("23") and first.ledger_total == Decimal("19.99")
    assert Discrepancy.objects.get(user_id=drift).difference == Decimal("0.01")
    assert Discrepancy.objects.get(user_id=unbackfilled).ledger_balance is None
    second = reconciliation_run(triggered_by="test")
    assert (second.differences, second.new_discrepancies) == (2, 0)
    assert Discrepancy.objects.get(user_id=drift).occurrences == 2
    with connection.cursor() as cursor:
        cursor.execute("UPDATE balances SET buying_power = 9.99 WHERE user_id = %s", [drift])
    third = reconciliation_run(triggered_by="test")
    assert (third.differences, third.resolved) == (1, 1)
    resolved = Discrepancy.objects.get(user_id=drift)
    assert resolved.status == "resolved" and resolved.resolved_by == "reconciliation"
    assert ReconciliationRun.objects.count() == 3


@pytest.mark.parametrize("phase", ["legacy", "cutover"])
def test_not_applicable_outside_dual_write(phase):
    phase_set(phase)
    with pytest.raises(NotApplicable):
        reconciliation_run(triggered_by="test")
    assert not ReconciliationRun.objects.exists()


def test_one_leader_at_a_time():
    phase_set("shadow")
    with other_connection() as other:  # another worker holds the leader lock
        other.execute("SELECT pg_advisory_lock(%s)", [RECONCILE_LOCK])
        with pytest.raises(ReconciliationBusy):
            reconciliation_run(triggered_by="test")
        assert reconciliation_task() == {
            "skipped": "another reconciliation or a discrepancy repair is running"
        }
        other.execute("SELECT pg_advisory_unlock(%s)", [RECONCILE_LOCK])  # not on disconnect:
        # the server may end the session a moment after the client has gone
    assert reconciliation_run(triggered_by="test").clean


def test_a_candidate_mended_before_its_locks_is_not_recorded():
    """The chunk's snapshot sees the user differ; a transaction holding the user's legacy row
    mends it and commits while the chunk waits on that row: the chunk compares again under
    the lock and records nothing."""
    phase_set("shadow")
    user = legacy_user("10")
    ledger_balance_set(user, "9")
    with other_connection() as other:
        other.autocommit = False
        other.execute("SELECT 1 FROM balances WHERE user_id = %s FOR UPDATE", [user])
        other.execute("UPDATE balances SET buying_power = 9 WHERE user_id = %s", [user])
        threading.Timer(0.5, other.commit).start()
        result = reconciliation_run(triggered_by="test")
    assert (result.differences, result.new_discrepancies) == (0, 0)
    assert not Discrepancy.objects.exists()
    assert not ReconciliationDifference.objects.exists()


def test_a_concurrent_write_to_a_discrepancy_is_waited_for():
    """A transaction updates a user's open discrepancy while the chunk records it: the chunk
    waits on the row and ends with the current values (counted once more)."""
    phase_set("shadow")
    user = legacy_user("10")
    ledger_balance_set(user, "9")
    reconciliation_run(triggered_by="test")  # opens the discrepancy
    with other_connection() as other:
        other.autocommit = False
        other.execute("UPDATE cutover_discrepancies SET detail = 'touched' WHERE status = 'open'")
        threading.Timer(0.5, other.commit).start()
        result = reconciliation_run(triggered_by="test")
    assert result.differences == 1
    discrepancy = Discrepancy.objects.get(user_id=user, status="open")
    assert (discrepancy.occurrences, discrepancy.detail) == (2, "touched")


def test_chunks_split_the_users_and_a_started_run_is_joined(settings):
    """Users in ranges of about RECONCILE_CHUNK_USERS; a run started and left (its leader
    died before working it) is the run the next start works and completes."""
    settings.RECONCILE_CHUNK_USERS = 3
    phase_set("shadow")
    users = [legacy_user("5") for _ in range(20)]
    for user in users[1:]:
        ledger_balance_set(user, "5")
    left = reconciliation_start(triggered_by="test")
    assert reconciliation_start(triggered_by="test").pk == left.pk
    result = reconciliation_run(triggered_by="test")
    assert result.run_id == left.pk and ReconciliationRun.objects.get().status == "completed"
    chunks = ReconciliationChunk.objects.filter(run_id=left.pk)
    assert chunks.count() == left.chunks > 3
    assert all(chunk.done_at for chunk in chunks)
    assert sum(chunk.users_checked for chunk in chunks) == result.users_checked == 20
    assert (result.differences, result.legacy_total, result.ledger_total) == (1, 100, 95)
    assert list(ReconciliationDifference.objects.values_list("user_id", flat=True)) == [users[0]]


def test_a_difference_is_listed_once_per_run():
    phase_set("shadow")
    user = legacy_user("10")
    run = reconciliation_run(triggered_by="test")
    with pytest.raises(IntegrityError), transaction.atomic():
        ReconciliationDifference.objects.create(
            run_id=run.run_id,
            chunk=ReconciliationChunk.objects.get(run_id=run.run_id),
            user_id=user,
            currency="USDC",
            legacy_balance=Decimal(10),
            ledger_balance=None,
            known=False,
        )


def test_a_run_abandoned_when_the_phase_leaves_dual_writes():
    phase_set("shadow")
    legacy_user("1")
    run = reconciliation_start(triggered_by="test")
    phase_set("legacy")
    with pytest.raises(NotApplicable):
        reconciliation_work(run_id=run.pk)
    assert ReconciliationRun.objects.get().status == "abandoned"
    phase_set("shadow")
    assert reconciliation_run(triggered_by="test").run_id != run.pk


# Real Celery workers (prefork, one pool process each, as deployed) over Redis ----------------

BROKER = "redis://127.0.0.1:6379/15"
QUIET = ("--without-heartbeat", "--without-mingle", "--without-gossip")


@contextmanager
def workers(count: int, chunk_users: int) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """`count` Celery workers on a queue of their own; worker i's database sessions are named
    `reconcile-<i>` (application_name)."""
    queue = f"reconcile-{uuid.uuid4().hex[:8]}"
    url = database_url()
    processes = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queue),
                *("-c", "1", "-n", f"w{i}-{queue}@%h", *QUIET),
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "DATABASE_URL": f"{url}{'&' if '?' in url else '?'}application_name=reconcile-{i}",
                "CELERY_BROKER_URL": BROKER,
                "RECONCILE_CHUNK_USERS": str(chunk_users),
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


def beat(queue: str) -> None:
    """What beat sends every interval: a new leader message."""
    with app.connection_for_write(BROKER) as connection_:
        app.send_task("cutover.reconcile", queue=queue, connection=connection_)


def completed_run(count: int, seconds: float = 240) -> ReconciliationRun:
    done = ReconciliationRun.objects.filter(status="completed")
    assert wait_for(lambda: done.count() >= count, seconds, every=0.05)
    return done.order_by("-id").first()


def drifted_users(count: int, drifted: int) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """`count` users with 100 in both stores, the first `drifted` of them a cent more in the
    legacy store."""
    users = [legacy_user("100") for _ in range(count)]
    for user in users:
        ledger_balance_set(user, "100")
    LegacyBalance.objects.filter(user_id__in=users[:drifted]).update(
        buying_power=F("buying_power") + Decimal("0.01")
    )
    return users, users[:drifted]


def found(run: ReconciliationRun) -> list[uuid.UUID]:
    return list(ReconciliationDifference.objects.filter(run=run).values_list("user_id", flat=True))


def test_two_workers_find_exactly_the_seeded_differences():
    phase_set("shadow")
    _, drifted = drifted_users(60, 6)
    with workers(2, chunk_users=5) as (queue, _):
        beat(queue)
        run = completed_run(1)
    assert (run.triggered_by, run.users_checked) == ("celery", 60) and run.chunks >= 10
    assert sorted(found(run)) == sorted(drifted) and run.differences == 6
    assert ReconciliationChunk.objects.filter(run=run, done_at__isnull=True).count() == 0
    assert sorted(Discrepancy.objects.values_list("user_id", flat=True)) == sorted(drifted)


def test_two_operators_and_beat_at_once_record_each_difference_once():
    """Beat's leader messages reach two workers while two operators run `cutover reconcile`
    by hand at the same moment: each command ends with the run's report (it joined the run) or
    says another reconciliation is running, never a traceback; every completed run lists each
    seeded difference once; each drifted user has one open discrepancy; no chunk is left."""
    phase_set("shadow")
    _, drifted = drifted_users(60, 6)
    env = {**os.environ, "DATABASE_URL": database_url(), "RECONCILE_CHUNK_USERS": "5"}
    command = [sys.executable, "manage.py", "cutover", "reconcile", "--json"]
    with workers(2, chunk_users=5) as (queue, _):
        for _ in range(3):
            beat(queue)
        operators = [
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        answers = [operator.communicate(timeout=240) for operator in operators]
        completed_run(1)
        running = ReconciliationRun.objects.filter(status="running")
        assert wait_for(lambda: not running.exists(), 240, every=0.05)
    for operator, (out, err) in zip(operators, answers, strict=True):
        assert "Traceback" not in err
        assert operator.returncode == 1, err  # differences found, or busy: both said
        if out:
            report = json.loads(out)
            assert (report["users_checked"], report["differences"]) == (60, 6)
        else:
            assert "another reconciliation" in err
    for run in ReconciliationRun.objects.all():
        assert run.status == "completed"
        assert sorted(found(run)) == sorted(drifted) and run.differences == 6
    assert not ReconciliationChunk.objects.filter(done_at__isnull=True).exists()
    open_ = Discrepancy.objects.filter(status="open")
    assert sorted(open_.values_list("user_id", flat=True)) == sorted(drifted)


def test_traffic_during_runs_records_no_false_difference():
    """Credits and debits through the balance path (both stores in one transaction) on every
    user while two workers run three reconciliations: each finds the drifted users, only."""
    phase_set("shadow")
    users, drifted = drifted_users(40, 4)
    stop = threading.Event()
    mutations = []

    def traffic(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                mutate = rng.choice([balance_credit, balance_debit])
                mutate(
                    user_id=rng.choice(users),
                    amount=Decimal("0.37"),
                    reference=str(uuid.uuid4()),
                    reason="reconciliation under traffic",
                )
                mutations.append(1)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=traffic, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    try:
        with workers(2, chunk_users=3) as (queue, _):
            for count in range(1, 4):
                beat(queue)
                run = completed_run(count)
                assert sorted(found(run)) == sorted(drifted), count
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(mutations) > 20
    unresolved = Discrepancy.objects.filter(status__in=["open", "investigating"])
    assert sorted(unresolved.values_list("user_id", flat=True)) == sorted(drifted)


def pool_process(worker: subprocess.Popen) -> int:
    """The worker's pool process (once it has forked it: a worker may still be starting)."""
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    assert wait_for(lambda: children.read_text().split(), 180)
    return int(children.read_text().split()[0])


def test_a_worker_killed_mid_chunk_leaves_its_chunk_to_another():
    """A worker is killed (kill -9, its pool process and itself: a node lost) while its chunk
    waits on a drifted user's row: nothing of the chunk is recorded; the other worker takes
    the chunk once the dead session is gone, the run completes with every seeded difference,
    each once."""
    phase_set("shadow")
    _, drifted = drifted_users(30, 3)
    blocked = drifted[1]
    with (
        other_connection() as other,
        other_connection() as watcher,  # pg_stat_activity is read once per transaction
        workers(2, chunk_users=5) as (queue, processes),
    ):
        other.autocommit = False
        other.execute("SELECT 1 FROM balances WHERE user_id = %s FOR UPDATE", [blocked])
        (holder,) = other.execute("SELECT pg_backend_pid()").fetchone()
        waiting = (
            "SELECT application_name FROM pg_stat_activity"
            " WHERE %s = ANY(pg_blocking_pids(pid)) AND application_name LIKE 'reconcile-%%'"
        )
        beat(queue)
        assert wait_for(lambda: watcher.execute(waiting, [holder]).fetchone(), 180, every=0.05)
        (name,) = watcher.execute(waiting, [holder]).fetchone()
        killed = processes[int(name.rsplit("-", 1)[1])]
        survivor = processes[1 - processes.index(killed)]
        survivor_pool = pool_process(survivor)
        for pid in (pool_process(killed), killed.pid):
            os.kill(pid, signal.SIGKILL)
        other.rollback()
        run = completed_run(1)
    assert run.users_checked == 30 and run.differences == 3
    assert sorted(found(run)) == sorted(drifted)
    chunk = ReconciliationDifference.objects.get(run=run, user_id=blocked).chunk
    assert chunk.taken_by.endswith(f":{survivor_pool}")
    assert sorted(Discrepancy.objects.values_list("user_id", flat=True)) == sorted(drifted)
    assert set(Discrepancy.objects.values_list("occurrences", flat=True)) == {1}
