"""`bench posting`: our posting path against pgbench running an equivalent plain-SQL posting
(two account UPDATEs, the transaction and two entry INSERTs, one commit) on the same server.
`bench reconcile` is in bench_reconcile.py, the HTTP benchmarks in bench_http.py."""

import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from decimal import Decimal

from django.conf import settings
from django.db import connection

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.phase_machine import phase_advance
from cutover.phases import ORDER, Phase
from ledger.models import Account
from ledger.services import (
    Leg,
    account_open,
    opening_balance_post,
    transaction_post,
)
from rehearsal.cpu import benchmark_groups, cpu_per_operation, cpu_read, cpu_spent
from rehearsal.runtime import (
    database_used,
    latency_summary,
    processes_run,
    scratch_database,
)

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
    """`count` bench accounts with a large opening balance."""
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


# Issue 14's goal for the shadow write, printed beside the figures.
POSTING_SHADOW_GOAL = {
    "clients": 16,
    "phase": "shadow",
    "p95_over_legacy_at_most": 1.6,
    "ratio_at_least": 0.55,
}


def posting_path(phase: str | None) -> str:
    """What `bench posting` measures: the balance path in a phase, or transaction_post."""
    return f"balance path ({phase})" if phase else "transaction_post"


def posting_compare(
    client_counts: list[int], seconds: int, accounts: int, phase: str | None, say
) -> list[dict]:
    """`bench posting`, one row per client count: ours (transaction_post transfers, or the
    balance path in `phase`; in a scratch database either way), pgbench's plain-SQL posting and the ratio.
    A phase that writes the ledger is also measured beside legacy-only (the same users in a
    scratch database of their own in phase legacy, each client count just before the phase's):
    "legacy" and "p95_over_legacy", what the dual write costs over the write it replaces."""
    rows = []
    with ExitStack() as stack:
        legacy_database = None
        if phase not in (None, Phase.LEGACY):
            legacy_database = stack.enter_context(scratch_database("bench"))
            say(f"Opening {accounts} users in legacy ...")
            bench_users_in_phase(accounts, Phase.LEGACY)
        # Always a scratch database: the ledger is append-only, and transfers written into
        # the configured one (found from outside: 350,000 of them) could never be taken back.
        stack.enter_context(scratch_database("bench"))
        if phase:
            say(f"Opening {accounts} users in {phase} ...")
            targets = bench_users_in_phase(accounts, phase)
        else:
            say(f"Opening {accounts} bench accounts ...")
            targets = bench_accounts_open(accounts)
        path = posting_path(phase)
        for clients in client_counts:
            row = {"clients": clients}
            if legacy_database:
                say(f"{clients} clients: legacy only for {seconds} s ...")
                with database_used(legacy_database):
                    row["legacy"] = posting_measure(clients, seconds, targets)
            say(f"{clients} clients: {path} for {seconds} s ...")
            row["ours"] = posting_measure(clients, seconds, targets)
            say(f"{clients} clients: pgbench for {seconds} s ...")
            row["pgbench"] = pgbench_measure(clients, seconds, accounts)
            per_second = row["pgbench"]["per_second"]
            row["ratio"] = round(row["ours"]["per_second"] / per_second if per_second else 0, 3)
            if legacy_database:
                legacy_p95 = row["legacy"]["p95_ms"]
                row["p95_over_legacy"] = round(
                    row["ours"]["p95_ms"] / legacy_p95 if legacy_p95 else 0, 2
                )
            rows.append(row)
    return rows


def posting_measure(clients: int, seconds: float, targets: list) -> dict:
    """`clients` concurrent connections laid out as pgbench lays out its own (-j 2): at most
    two processes (the machine's cores), the clients spread over them as threads."""
    processes = min(clients, PGBENCH_THREADS)
    layout = [list(range(p, clients, processes)) for p in range(processes)]
    start_at = time.time() + 1.0 + clients * 0.05  # after every client has connected
    before = cpu_read()
    results = processes_run(
        posting_process, [(group, targets, start_at, seconds) for group in layout]
    )
    spent = cpu_spent(before, cpu_read(), benchmark_groups("client"))
    latencies = [value for process in results for client in process for value in client]
    return {
        "postings": len(latencies),
        "per_second": round(len(latencies) / seconds, 1),
        **latency_summary(latencies),
        "cpu_us_per_posting": cpu_per_operation(spent, len(latencies)),
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
        before = cpu_read()
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
        spent = cpu_spent(before, cpu_read(), benchmark_groups("client"))
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed: {result.stderr.strip()}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", result.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", result.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    with connection.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS bench_pgbench CASCADE")
    postings = int(processed.group(1)) if processed else 0
    return {
        "postings": postings,
        "per_second": float(tps.group(1)) if tps else 0.0,
        "latency_avg_ms": float(latency.group(1)) if latency else 0.0,
        "cpu_us_per_posting": cpu_per_operation(spent, postings),
    }
