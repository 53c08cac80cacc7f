"""`bench reconcile`'s seeding and timing, and the Celery worker replicas it and `bench backfill`
run (bench_workers, peak_rss_mb)."""

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

from django.db import connection, connections
from django.db.models import Max

from config.celery import app
from cutover.actors import Actor
from cutover.custody import custody_open
from cutover.models import ReconciliationDifference, ReconciliationRun, RunStatus
from cutover.phase_machine import phase_advance
from cutover.phases import Phase
from ledger.selectors import equity_account_code, system_account
from ledger.services import (
    user_accounts_open,
)
from rehearsal.runtime import (
    database_url,
)

# User g of N: its id's first 48 bits spread g over the id space in order, so that ids and
# rows are laid out in user_id order (as a backfill walking user_id ranges writes the ledger's,
# and as the legacy table is after CLUSTER on its primary key; README, "Performance").
BENCH_USER_ID = (
    "(lpad(to_hex(g * %(spacing)s), 12, '0') || '40008000' || lpad(to_hex(g), 12, '0'))::uuid"
)
# One user in FUNDED_EVERY holds money (posted through the ledger, one transaction per slice);
# the others hold 0 in both stores. Posting every user's opening balance through the entry
# trigger is what made 10M users take 45 minutes to seed; the comparison reads and sums every
# user's two balances alike, zero or not.
FUNDED_EVERY = 100
SEED_LEGACY_SQL = f"""
    INSERT INTO balances (user_id, buying_power, currency)
    SELECT {BENCH_USER_ID},
           CASE WHEN g %% {FUNDED_EVERY} = 0 THEN ((g * 7919) %% 10000000) / 100.0 + 1 ELSE 0 END,
           'USDC'
      FROM generate_series(%(low)s::bigint, %(high)s::bigint) g
    RETURNING user_id
"""
# The slice's funded users' opening balances through the one posting function: one
# transaction (a debit of their total on opening-balance equity, a credit to each user).
SEED_OPENING_SQL = """
    WITH funded AS (
        SELECT a.account_id AS id, b.buying_power
          FROM balances b JOIN ledger_user_balances a ON a.user_id = b.user_id
         WHERE b.user_id BETWEEN %(first)s AND %(last)s AND b.buying_power > 0
    )
    SELECT ledger_post_transaction(
        'bench', 'opening-' || %(low)s, 'opening_balance', '{}',
        (SELECT jsonb_agg(jsonb_build_object('account_id', id, 'side', 'credit',
                                             'amount', buying_power, 'currency', 'USDC'))
           FROM funded)
        || jsonb_build_array(jsonb_build_object(
               'account_id', %(equity)s, 'side', 'debit',
               'amount', (SELECT sum(buying_power) FROM funded), 'currency', 'USDC')))
     WHERE EXISTS (SELECT 1 FROM funded)
"""
INJECTED_SQL = f"""
    SELECT {BENCH_USER_ID} FROM generate_series(1::bigint, %(users)s::bigint, %(step)s) g
     LIMIT %(count)s
"""
INJECT_DRIFT_SQL = f"""
    UPDATE balances SET buying_power = buying_power + 0.01
     WHERE user_id IN ({INJECTED_SQL})
"""
SEED_SLICE = 200_000


def _bench_users(users: int, differences: int) -> dict:
    return {
        "users": users,
        "spacing": 2**48 // (users + 1),
        "step": max(1, users // max(differences, 1)),
        "count": differences,
    }


def reconcile_seed(users: int, differences: int, on_progress=None) -> None:
    """`users` users with equal balances in both stores, set-based (legacy rows in one
    statement, ledger accounts opened in one, the funded users' opening balances posted in
    one transaction, per slice of users), then `differences` of them drifted by a cent in the
    legacy store; phase shadow through its gate."""
    params = _bench_users(users, differences)
    equity = system_account(code=equity_account_code("USDC")).pk
    with connection.cursor() as cursor:
        for low in range(1, users + 1, SEED_SLICE):
            high = min(low + SEED_SLICE - 1, users)
            cursor.execute(SEED_LEGACY_SQL, {**params, "low": low, "high": high})
            ids = sorted(row[0] for row in cursor.fetchall())
            user_accounts_open(user_ids=ids, currency="USDC")
            cursor.execute(
                SEED_OPENING_SQL,
                {"first": ids[0], "last": ids[-1], "low": low, "equity": equity},
            )
            if on_progress:
                on_progress(high)
        cursor.execute("VACUUM ANALYZE balances")
        cursor.execute("ANALYZE")
        cursor.execute("SELECT coalesce(sum(buying_power), 0) FROM balances")
        (custody,) = cursor.fetchone()
    for currency, reported in (("USDC", custody), ("USD", Decimal(0))):  # the shadow gate's
        custody_open(
            currency=currency,
            reported=reported,
            source="bench",
            actor=Actor("bench"),
            reason="bench",
        )
    phase_advance(to=Phase.SHADOW, actor=Actor("bench"), force=False, reason="bench seeded")
    with connection.cursor() as cursor:
        cursor.execute(INJECT_DRIFT_SQL, params)


def reconcile_injected(users: int, differences: int) -> set[uuid.UUID]:
    with connection.cursor() as cursor:
        cursor.execute(INJECTED_SQL, _bench_users(users, differences))
        return {row[0] for row in cursor.fetchall()}


def peak_rss_mb(pid: int) -> list[float]:
    """VmHWM of a process and of its children, in MB (a Celery worker, then its pool process)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    own = int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024
    return [own, *(peak for child in children for peak in peak_rss_mb(int(child)))]


def _pinged(expected: set[str]) -> set[str]:
    """The workers that answer a ping, over a connection of its own, closed after: left in the
    app's pool, the reply consumer's connection keeps a BRPOP pending, and a process this one
    forks later would wait on that shared socket forever (kombu's after-fork clean-up)."""
    with app.connection_for_write() as connection:
        replies = app.control.ping(destination=sorted(expected), timeout=0.5, connection=connection)
    return {name for reply in replies for name in reply}


@contextmanager
def bench_workers(
    database: str, count: int, purpose: str = "reconcile", environment: dict | None = None
) -> Iterator[tuple[str, list]]:
    """`count` Celery workers (`celery -A config worker -c 1`, one pool process each, as
    deployed) on the scratch database and a queue of their own (with `environment` added);
    yields the queue and the processes once every worker answers a ping."""
    queue = f"bench-{purpose}-{uuid.uuid4().hex[:8]}"
    names = [f"bench{i}-{queue}@%h" for i in range(count)]
    env = {
        **os.environ,
        "DATABASE_URL": database_url(database),
        "LOG_LEVEL": "WARNING",
        **(environment or {}),
    }
    processes = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queue),
                *("-c", "1", "-n", name, "--without-heartbeat", "--without-gossip"),
                "--without-mingle",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 120
        expected = {name.replace("%h", socket.gethostname()) for name in names}
        while _pinged(expected) < expected:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError("the benchmark's Celery workers did not start")
        yield queue, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


def reconcile_measure(database: str, workers: int, injected: set[uuid.UUID]) -> dict:
    """One full reconciliation by `workers` Celery workers, from the leader's message to the
    run's completion; what it found against what was injected; each worker's peak RSS."""
    connections.close_all()
    with bench_workers(database, workers) as (queue, processes):
        before = ReconciliationRun.objects.aggregate(last=Max("pk"))["last"] or 0
        started = time.perf_counter()
        app.send_task("cutover.reconcile", queue=queue)
        while True:
            run = ReconciliationRun.objects.filter(pk__gt=before).first()
            if run is not None and run.status != RunStatus.RUNNING:
                break
            if any(process.poll() is not None for process in processes):
                raise RuntimeError("a benchmark worker died")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        peaks = [peak_rss_mb(process.pid) for process in processes]
    found = set(ReconciliationDifference.objects.filter(run=run).values_list("user_id", flat=True))
    return {
        "workers": workers,
        "status": run.status,
        "chunks": run.chunks,
        "users_checked": run.users_checked,
        "differences_found": run.differences,
        "all_injected_found": found == injected,
        "seconds": round(seconds, 3),
        # The pool process does the work; the worker's main process only hands it messages.
        "peak_rss_mb_pool_process": round(max(max(p[1:], default=0) for p in peaks), 1),
        "peak_rss_mb_per_worker": round(max(sum(p) for p in peaks), 1),
    }
