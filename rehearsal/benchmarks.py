"""`bench posting`: our posting path against pgbench running an equivalent plain-SQL posting
(two account UPDATEs, the transaction and two entry INSERTs, one commit) on the same server; and
`bench reconcile`'s seeding and timing. The HTTP benchmarks are in bench_http.py."""

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.db import connection, connections
from django.db.models import Max

from config.celery import app
from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.custody import custody_open
from cutover.models import ReconciliationDifference, ReconciliationRun, RunStatus
from cutover.phase_machine import phase_advance
from cutover.phases import ORDER, Phase
from ledger.models import Account
from ledger.selectors import equity_account_code, system_account
from ledger.services import (
    Leg,
    account_open,
    opening_balance_post,
    transaction_post,
    user_accounts_open,
)
from rehearsal.runtime import database_url, latency_summary, processes_run

BENCH_NAMESPACE = "bench"
PGBENCH_THREADS = 2  # pgbench -j: one thread per core of this machine kind
BENCH_ACCOUNT_TYPE = "bench_usdc"
OPENING = Decimal("1000000")

PGBENCH_SCHEMA = """
DROP SCHEMA IF EXISTS bench_pgbench CASCADE;
CREATE SCHEMA bench_pgbench;
CREATE TABLE bench_pgbench.accounts (id bigint PRIMARY KEY, balance numeric(38, 6) NOT NULL);
CREATE TABLE bench_pgbench.transactions (
    id bigserial PRIMARY KEY, reference text NOT NULL UNIQUE, created_at timestamptz DEFAULT now());
CREATE TABLE bench_pgbench.entries (
    id bigserial PRIMARY KEY, transaction_id bigint NOT NULL REFERENCES bench_pgbench.transactions,
    account_id bigint NOT NULL REFERENCES bench_pgbench.accounts, amount numeric(38, 6) NOT NULL);
CREATE INDEX ON bench_pgbench.entries (transaction_id);
INSERT INTO bench_pgbench.accounts SELECT g, 1000000 FROM generate_series(1, %(accounts)s) g;
"""

# Accounts are updated in id order, as our posting function locks them, so neither deadlocks.
PGBENCH_SCRIPT = """\\set a random(1, {accounts})
\\set b random(1, {accounts} - 1)
\\set b :b + case when :b >= :a then 1 else 0 end
\\set lo least(:a, :b)
\\set hi greatest(:a, :b)
\\set amount random(1, 100)
BEGIN;
UPDATE bench_pgbench.accounts SET balance = balance - :amount WHERE id = :lo;
UPDATE bench_pgbench.accounts SET balance = balance + :amount WHERE id = :hi;
INSERT INTO bench_pgbench.transactions (reference) VALUES (md5(random()::text || clock_timestamp()::text)) RETURNING id AS txn \\gset
INSERT INTO bench_pgbench.entries (transaction_id, account_id, amount) VALUES (:txn, :lo, -:amount), (:txn, :hi, :amount);
END;
"""


def bench_accounts_open(count: int) -> list[int]:
    """`count` bench accounts with a large opening balance (idempotent across runs)."""
    ids = []
    for index in range(count):
        account = account_open(
            user_id=uuid.uuid5(uuid.NAMESPACE_URL, f"bench-account-{index}"),
            account_type=BENCH_ACCOUNT_TYPE,
            currency="USDC",
        )
        opening_balance_post(namespace=BENCH_NAMESPACE, account=account, amount=OPENING)
        ids.append(account.pk)
    return ids


def _transfer(rng: random.Random, accounts: list, reference: str) -> None:
    source, target = rng.sample(accounts, 2)
    amount = Decimal(rng.randint(1, 100)) / 100
    transaction_post(
        namespace=BENCH_NAMESPACE,
        reference_id=reference,
        kind="transfer",
        legs=[Leg.debit(source, amount), Leg.credit(target, amount)],
    )


def _balance_mutation(rng: random.Random, users: list, reference: str) -> None:
    mutate = balance_credit if rng.random() < 0.5 else balance_debit
    amount = Decimal(rng.randint(1, 100)) / 100
    mutate(user_id=rng.choice(users), amount=amount, reference=reference, reason="bench")


def posting_client(client: int, targets: list, start_at: float, seconds: float) -> list:
    """One client: connects and loads what it needs, waits for the common start, then posts
    until the window closes (connection set-up is outside the window, as pgbench reports it).
    `targets` are ledger account ids (transfers through transaction_post) or user ids
    (credits and debits through the phase's balance path)."""
    rng = random.Random(client)
    if isinstance(targets[0], int):
        operate, items = _transfer, list(Account.objects.filter(pk__in=targets))
    else:
        operate, items = _balance_mutation, targets
    run = uuid.uuid4().hex[:12]
    latencies = []
    time.sleep(max(0.0, start_at - time.time()))
    deadline = start_at + seconds
    index = 0
    while time.time() < deadline:
        started = time.perf_counter()
        operate(rng, items, f"{run}-{client}-{index}")
        latencies.append((time.perf_counter() - started) * 1000)
        index += 1
    connection.close()
    return latencies


def posting_process(clients: list[int], targets: list, start_at: float, seconds: float):
    """One process running several clients as threads, each with its own connection."""
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        return list(pool.map(lambda c: posting_client(c, targets, start_at, seconds), clients))


def bench_users_in_phase(count: int, phase: str) -> list[uuid.UUID]:
    """`count` users with large balances in both stores, and the rollout moved to `phase`
    (forced, audited as the bench's): for a scratch database only."""
    users = [uuid.uuid5(uuid.NAMESPACE_URL, f"bench-user-{index}") for index in range(count)]
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO balances (user_id, buying_power, currency) VALUES (%s, %s, 'USDC')",
            [(user, OPENING) for user in users],
        )
    backfill_run(chunk_size=1000)
    actor = Actor("bench")
    for target in ORDER[1 : ORDER.index(Phase(phase)) + 1]:
        phase_advance(to=target, actor=actor, force=True, reason="bench", read_percent=100)
    return users


def posting_measure(clients: int, seconds: float, targets: list) -> dict:
    """`clients` concurrent connections laid out as pgbench lays out its own (-j 2): at most
    two processes (the machine's cores), the clients spread over them as threads."""
    processes = min(clients, PGBENCH_THREADS)
    layout = [list(range(p, clients, processes)) for p in range(processes)]
    start_at = time.time() + 1.0 + clients * 0.05  # after every client has connected
    results = processes_run(
        posting_process, [(group, targets, start_at, seconds) for group in layout]
    )
    latencies = [value for process in results for client in process for value in client]
    return {
        "postings": len(latencies),
        "per_second": round(len(latencies) / seconds, 1),
        **latency_summary(latencies),
    }


def _pg_env() -> tuple[list[str], dict]:
    db = settings.DATABASES["default"]
    host = db.get("HOST") or db.get("OPTIONS", {}).get("host") or "/var/run/postgresql"
    args = ["-h", host, "-U", db.get("USER") or "postgres"]
    if db.get("PORT"):
        args += ["-p", str(db["PORT"])]
    env = dict(os.environ)
    if db.get("PASSWORD"):
        env["PGPASSWORD"] = db["PASSWORD"]
    return args, env


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if not found:
        raise FileNotFoundError("pgbench not found: install Debian's postgresql-client package")
    return found


def pgbench_measure(clients: int, seconds: int, accounts: int) -> dict:
    with connection.cursor() as cursor:
        cursor.execute(PGBENCH_SCHEMA % {"accounts": int(accounts)})
    connection.close()
    args, env = _pg_env()
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(PGBENCH_SCRIPT.format(accounts=accounts))
        script.flush()
        result = subprocess.run(
            [
                pgbench_binary(),
                *args,
                "-n",
                "-c",
                str(clients),
                "-j",
                str(min(clients, PGBENCH_THREADS)),
                "-T",
                str(seconds),
                "-f",
                script.name,
                settings.DATABASES["default"]["NAME"],
            ],
            capture_output=True,
            text=True,
            env=env,
        )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed: {result.stderr.strip()}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", result.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", result.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    with connection.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS bench_pgbench CASCADE")
    return {
        "postings": int(processed.group(1)) if processed else 0,
        "per_second": float(tps.group(1)) if tps else 0.0,
        "latency_avg_ms": float(latency.group(1)) if latency else 0.0,
    }


# --- bench reconcile --------------------------------------------------------------------------

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
