"""`bench backfill`: the chunked backfill (cutover.backfill) of N seeded legacy users while live
traffic flows through the balance path at a fixed rate, beside the per-user path it replaced;
and `bench gates`: how long the gates into shadow and cutover hold the write fence at N users."""

import contextlib
import hashlib
import multiprocessing
import random
import resource
import threading
import time
import uuid
from decimal import Decimal

from django.db import connection, connections, transaction

from config.celery import app
from cutover.actors import Actor
from cutover.backfill import BackfillResult, backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.custody import custody_open
from cutover.exceptions import KillSwitchEngaged, NotApplicable
from cutover.models import BackfillRange, BackfillRun
from cutover.phase_machine import phase_advance, phase_lock_shared
from cutover.phases import ORDER, Phase
from cutover.selectors import DIFFERENCES_SQL, phase_state
from ledger.exceptions import InsufficientFunds
from ledger.selectors import (
    account_lock,
    equity_account_code,
    ledger_integrity_checks,
    system_account,
    user_account_type,
)
from ledger.services import Leg, account_open, transaction_apply
from rehearsal.bench_reconcile import bench_workers, peak_rss_mb
from rehearsal.runtime import latency_summary

LIVE_CLIENTS = 8  # threads of the live traffic, each with its own connection


# Seeded users' ids are md5('bench-user-' || g) (bench_user), each funded; the opening
# balances of the gates' seed go through the one posting function, a transaction per chunk.
SEED_LEGACY_SQL = """
    INSERT INTO balances (user_id, buying_power, currency)
    SELECT md5('bench-user-' || g)::uuid, ((g::bigint * 7919) %% 10000000) / 100.0, 'USDC'
      FROM generate_series(1, %(users)s) g
"""
SEED_ACCOUNTS_SQL = """
    SELECT ledger_user_account_open(md5('bench-user-' || g)::uuid, 'USDC')
      FROM generate_series(1, %(users)s) g
"""
# Opening balances through the one posting function: one transaction per chunk of users
# (a debit of the chunk's total on opening-balance equity, a credit to each user).
SEED_OPENING_SQL = """
    WITH chunk AS (
        SELECT a.account_id AS id, b.buying_power
          FROM ledger_user_balances a JOIN balances b ON b.user_id = a.user_id
         WHERE a.currency = 'USDC' AND b.buying_power > 0
           AND a.account_id >= %(low)s AND a.account_id < %(high)s
    )
    SELECT ledger_post_transaction(
        'bench', 'opening-' || %(low)s, 'opening_balance', '{}',
        (SELECT jsonb_agg(jsonb_build_object('account_id', id, 'side', 'credit',
                                             'amount', buying_power, 'currency', 'USDC'))
           FROM chunk)
        || jsonb_build_array(jsonb_build_object(
               'account_id', %(equity)s, 'side', 'debit',
               'amount', (SELECT sum(buying_power) FROM chunk), 'currency', 'USDC')))
     WHERE EXISTS (SELECT 1 FROM chunk)
"""
SEED_CHUNK = 10_000


def bench_user(index: int) -> uuid.UUID:
    """The id SEED_LEGACY_SQL gives seeded user `index` (md5('bench-user-' || g)::uuid)."""
    return uuid.UUID(hashlib.md5(f"bench-user-{index}".encode()).hexdigest())  # noqa: S324


def backfill_seed(users: int, custody: bool) -> None:
    """`users` legacy users (set-based), none in the ledger yet. With `custody`, custody is
    opened from their total first (as the rehearsal does before its backfill): each live legacy
    mutation is then mirrored against opening-balance equity, the account every chunk posts
    against, and waits for a chunk's posting to commit. Without it (the deployment checklist's
    order: the backfill first, then custody), live mutations write the legacy store only."""
    with connection.cursor() as cursor:
        cursor.execute(SEED_LEGACY_SQL, {"users": users})
        cursor.execute("ANALYZE balances")
        cursor.execute("SELECT coalesce(sum(buying_power), 0) FROM balances")
        (total,) = cursor.fetchone()
    if custody:
        custody_open_from(total)


def custody_open_from(usdc: Decimal) -> None:
    """Custody opened as the shadow gate wants it: USDC from the users' total, USD empty."""
    for currency, reported in (("USDC", usdc), ("USD", Decimal(0))):
        custody_open(
            currency=currency,
            reported=reported,
            source="bench",
            actor=Actor("bench"),
            reason="bench",
        )


def _live_traffic(users: int, rps: int, stop, results) -> None:
    """Credits and debits of random seeded users through the balance path at `rps` a second,
    open loop: each latency counts from the request's scheduled time, so a request that waited
    for a lock or a client cannot hide it. Puts [(scheduled epoch, ms)] on `results`."""
    samples: list[tuple[float, float]] = []
    lock = threading.Lock()
    start = time.time() + 0.2

    def client(first: int) -> None:
        rng = random.Random(first)  # noqa: S311 (load, not secrets)
        index = first
        while not stop.is_set():
            scheduled = start + index / rps
            time.sleep(max(0.0, scheduled - time.time()))
            mutate = balance_credit if rng.random() < 0.5 else balance_debit
            with contextlib.suppress(InsufficientFunds):  # a refusal is an answer too
                mutate(
                    user_id=bench_user(rng.randint(1, users)),
                    amount=Decimal(rng.randint(1, 100)) / 100,
                    reference=f"live-{uuid.uuid4()}",
                    reason="bench live traffic",
                )
            with lock:
                samples.append((scheduled, (time.time() - scheduled) * 1000))
            index += LIVE_CLIENTS
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(LIVE_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(samples)


def _backfill_child(path: str, chunk_size: int, results) -> None:
    started = time.time()
    result = (backfill_run if path == "chunked" else backfill_per_user_run)(chunk_size=chunk_size)
    finished = time.time()
    connection.close()
    results.put(
        {
            "started": started,
            "finished": finished,
            "users": result.users_examined,
            "postings": result.postings,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )


def backfill_measure(path: str, users: int, chunk_size: int, rps: int, idle: float) -> dict:
    """Live traffic for `idle` seconds alone, then with the backfill (`path`: chunked or
    per_user) in a process of its own (its peak RSS is the backfill's), until it finishes."""
    connections.close_all()
    context = multiprocessing.get_context("fork")
    stop, traffic_out, backfill_out = context.Event(), context.Queue(), context.Queue()
    traffic = context.Process(target=_live_traffic, args=(users, rps, stop, traffic_out))
    traffic.start()
    time.sleep(idle)
    backfill = context.Process(target=_backfill_child, args=(path, chunk_size, backfill_out))
    backfill.start()
    outcome = backfill_out.get()
    backfill.join()
    stop.set()
    samples = traffic_out.get()
    traffic.join()
    if backfill.exitcode or traffic.exitcode:
        raise RuntimeError(f"bench processes exited {backfill.exitcode}, {traffic.exitcode}")
    seconds = outcome["finished"] - outcome["started"]
    during = [ms for at, ms in samples if outcome["started"] <= at < outcome["finished"]]
    before = [ms for at, ms in samples if at < outcome["started"]]
    return {
        "path": path,
        "users": outcome["users"],
        "postings": outcome["postings"],
        "seconds": round(seconds, 1),
        "users_per_second": round(outcome["users"] / seconds, 1) if seconds else 0.0,
        "peak_rss_mb": outcome["peak_rss_mb"],
        "chunk_size": chunk_size,
        "live_rps": rps,
        "live_requests_during": len(during),
        "live_during": latency_summary(during),
        "live_before": latency_summary(before),
    }


def backfill_workers_measure(
    database: str,
    workers: int,
    users: int,
    chunk_size: int,
    rps: int,
    idle: float,
    range_users: int | None = None,
) -> dict:
    """Live traffic for `idle` seconds alone, then with a whole backfill taken by `workers`
    real Celery workers (the leader message `cutover.backfill`, which asks the others to help
    through their queue), from the leader's message until the run is finished; users/s, the
    live latency before and during it, each worker's peak RSS."""
    connections.close_all()
    environment = {"BACKFILL_RANGE_USERS": str(range_users)} if range_users else {}
    with bench_workers(database, workers, "backfill", environment) as (queue, processes):
        context = multiprocessing.get_context("fork")
        stop, traffic_out = context.Event(), context.Queue()
        traffic = context.Process(target=_live_traffic, args=(users, rps, stop, traffic_out))
        traffic.start()
        time.sleep(idle)
        started_at, started = time.time(), time.perf_counter()
        with app.connection_for_write() as broker:
            app.send_task("cutover.backfill", args=[chunk_size], queue=queue, connection=broker)
        finished = BackfillRun.objects.filter(finished_at__isnull=False)
        while not finished.exists():
            if any(process.poll() is not None for process in processes):
                stop.set()
                raise RuntimeError("a benchmark worker died")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        finished_at = started_at + seconds
        peaks = [peak_rss_mb(process.pid) for process in processes]
        stop.set()
        samples = traffic_out.get()
        traffic.join()
    run = finished.order_by("pk").first()
    during = [ms for at, ms in samples if started_at <= at < finished_at]
    before = [ms for at, ms in samples if at < started_at]
    return {
        "path": f"chunked, {workers} Celery worker{'s' if workers > 1 else ''}",
        "workers": workers,
        "users": run.users_examined,
        "postings": run.postings,
        "ranges": BackfillRange.objects.filter(run=run).count(),
        "seconds": round(seconds, 1),
        "users_per_second": round(run.users_examined / seconds, 1) if seconds else 0.0,
        # The pool process does the work; the worker's main process only hands it messages.
        "peak_rss_mb": round(max(max(p[1:], default=0) for p in peaks), 1),
        "chunk_size": chunk_size,
        "live_rps": rps,
        "live_requests_during": len(during),
        "live_during": latency_summary(during),
        "live_before": latency_summary(before),
    }


def ledger_verified() -> bool:
    return all(check.ok for check in ledger_integrity_checks())


# The per-user path the chunked backfill replaced (as it was until issue 14), kept here as the
# benchmark's reference: the candidates from the stores' full comparison, then one ledger
# transaction per user, each against equity, under the user's legacy row and account locks.
PER_USER_CANDIDATES_SQL = f"""
    SELECT d.user_id, d.currency FROM ({DIFFERENCES_SQL}) d
     WHERE d.legacy IS NOT NULL AND d.user_id > %s
     ORDER BY d.user_id LIMIT %s
"""
PER_USER_LOCK_ROWS_SQL = """
    SELECT user_id, buying_power, currency FROM balances
     WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE
"""


def backfill_per_user_run(*, chunk_size: int = 500) -> BackfillResult:
    result = BackfillResult()
    cursor_user = uuid.UUID(int=0)
    while True:
        with transaction.atomic(durable=True):
            phase_lock_shared()
            state = phase_state()
            if state.kill_switch:
                raise KillSwitchEngaged(f"kill switch engaged: {state.kill_switch_reason}")
            if state.phase == Phase.CUTOVER:
                raise NotApplicable("after cutover the legacy store is no longer the source")
            with connection.cursor() as cursor:
                cursor.execute(PER_USER_CANDIDATES_SQL, [cursor_user, chunk_size])
                candidates = [row[0] for row in cursor.fetchall()]
                if not candidates:
                    break
                cursor.execute(PER_USER_LOCK_ROWS_SQL, [candidates])
                rows = cursor.fetchall()
            for user_id, legacy, currency in rows:
                account = account_open(
                    user_id=user_id, account_type=user_account_type(currency), currency=currency
                )
                ledger, entries = account_lock(account_id=account.pk)
                difference = legacy - ledger
                result.users_examined += 1
                if not difference:
                    continue
                equity = system_account(code=equity_account_code(currency))
                legs = (
                    [Leg.debit(equity, difference), Leg.credit(account, difference)]
                    if difference > 0
                    else [Leg.debit(account, -difference), Leg.credit(equity, -difference)]
                )
                transaction_apply(
                    namespace="backfill",
                    reference_id=f"{user_id}:{entries}",
                    kind="opening_balance" if entries == 0 else "backfill_adjustment",
                    legs=legs,
                    metadata={"user_id": str(user_id), "legacy_balance": str(legacy)},
                )
                result.postings += 1
                result.amount += abs(difference)
            cursor_user = candidates[-1]
    return result


# --- bench gates --------------------------------------------------------------------------------


def gates_seed(users: int, on_progress=None) -> None:
    """`users` users with equal balances in both stores (opening balances posted through the
    ledger in chunks, as `bench reconcile` seeds them) and custody opened from their total."""
    with connection.cursor() as cursor:
        cursor.execute(SEED_LEGACY_SQL, {"users": users})
        cursor.execute(SEED_ACCOUNTS_SQL, {"users": users})
        cursor.execute(
            "SELECT min(account_id), max(account_id) FROM ledger_user_balances "
            "WHERE currency = 'USDC'"
        )
        low, high = cursor.fetchone()
        equity = system_account(code=equity_account_code("USDC")).pk
        for start in range(low, high + 1, SEED_CHUNK):
            cursor.execute(
                SEED_OPENING_SQL, {"low": start, "high": start + SEED_CHUNK, "equity": equity}
            )
            if on_progress:
                on_progress(min(start + SEED_CHUNK, high + 1) - low)
        cursor.execute("ANALYZE")
        cursor.execute("SELECT coalesce(sum(buying_power), 0) FROM balances")
        (total,) = cursor.fetchone()
    custody_open_from(total)


def gates_measure() -> list[dict]:
    """legacy -> shadow (its gate met: ledger verify, the backfill's equality, custody) and
    strict -> cutover (its equality proof, never forcible; the gate's other checks, which wait
    for days in strict, forced as on the way through read_switch), each timed whole and under
    the write fence (the audit's fence_ms)."""
    actor = Actor("bench")
    rows = []
    for target in ORDER[1:]:
        started = time.perf_counter()
        audit = phase_advance(
            to=target,
            actor=actor,
            force=target != Phase.SHADOW,
            reason="bench",
            read_percent=100,
        )
        seconds = time.perf_counter() - started
        if target in GATED:
            evidence = audit.evidence
            rows.append(
                {
                    "gate": f"{audit.from_phase} -> {audit.to_phase}",
                    "evidence": GATED[target],
                    "passed": evidence["proof"]["ok"]
                    if "proof" in evidence
                    else evidence["passed"],
                    "seconds": round(seconds, 2),
                    "fence_ms": evidence["fence_ms"],
                }
            )
    return rows


GATED = {Phase.SHADOW: "ledger verify, backfill", Phase.CUTOVER: "equality proof"}
