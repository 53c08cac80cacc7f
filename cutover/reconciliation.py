"""Reconciliation: comparing every user's legacy and ledger balance while both stores are
written, in chunks of users that any number of workers take in parallel; recording
discrepancies (labelled known differences where an active known-difference rule matches them)
and resolving the ones that agree again.

A run (ReconciliationRun) is started by one leader at a time: it splits the users into
user_id ranges (ReconciliationChunk, about RECONCILE_CHUNK_USERS each, bounds from a sample of
the legacy table) in one short transaction; while it runs, another start joins it instead. A
worker takes a chunk with SELECT ... FOR UPDATE SKIP LOCKED and works it in one database
transaction, the chunk's row lock held to the end: a worker that dies mid-chunk leaves it to be
taken again with nothing of it recorded; a worker that finds no free chunk waits on the ones
still taken, so it takes over a dead worker's chunk as soon as its session is gone. The run is
completed, with the chunks' sums, by whoever finishes its last chunk.

Exact while traffic continues: a chunk's comparison is one statement, so one snapshot of both
stores (a mutation writes both in one database transaction: a snapshot sees both sides or
neither). Its candidates (users that differ in the snapshot, and users with an unresolved
discrepancy) are then locked as the balance path locks them (the phase lock shared, the legacy
rows, then the ledger accounts) and compared again on the committed values: a difference is
recorded only if it still stands under the locks, a discrepancy resolved only if the stores
agree under them. Each difference is listed once per run (ReconciliationDifference, unique per
run, user and currency)."""

import itertools
import os
import socket
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from cutover import metrics
from cutover.exceptions import NotApplicable, ReconciliationBusy
from cutover.locks import RECONCILE_LOCK
from cutover.models import ReconciliationChunk, ReconciliationRun, RunStatus
from cutover.phase_machine import phase_lock_shared
from cutover.phases import DUAL_WRITE
from cutover.selectors import phase_state, user_range_bounds
from gateway.faults import fault_point

# A chunk's snapshot: its users, both totals, and the users that differ (a missing account or
# legacy row counts as 0), in one statement.
CHUNK_SCAN_SQL = """
    SELECT count(b.user_id), coalesce(sum(b.buying_power), 0), coalesce(sum(a.balance), 0),
           coalesce(array_agg(coalesce(b.user_id, a.user_id))
                    FILTER (WHERE coalesce(b.buying_power, 0) <> coalesce(a.balance, 0)), '{{}}')
      FROM (SELECT user_id, currency, buying_power FROM balances WHERE {range}) b
      FULL JOIN (SELECT user_id, currency, balance FROM ledger_user_balances WHERE {range}) a
        ON a.user_id = b.user_id AND a.currency = b.currency
"""
CHUNK_UNRESOLVED_SQL = """
    SELECT coalesce(array_agg(DISTINCT user_id), '{{}}') FROM cutover_discrepancies
     WHERE status IN ('open', 'investigating', 'known_difference') AND {range}
"""
# The candidates' rows, locked in the balance path's order (legacy rows, then accounts).
LOCK_LEGACY_SQL = """
    SELECT 1 FROM balances WHERE user_id = ANY(%(users)s::uuid[]) ORDER BY user_id FOR UPDATE
"""
LOCK_LEDGER_SQL = """
    SELECT 1 FROM ledger_user_balances WHERE user_id = ANY(%(users)s::uuid[])
     ORDER BY account_id FOR UPDATE
"""

# The candidates compared again under their locks. Each difference, with the active
# known-difference rule matching it (same user, currency and difference to the last unit;
# cutover.selectors.known_difference_matching), is listed for the run and recorded on the
# user's one unresolved discrepancy: an open one a rule matches becomes a known difference, a
# known difference no rule matches any more (expired, or the difference moved) is open again,
# one under investigation stays so. Unresolved ones of the candidates that agree resolve.
RECONCILE_RECORD_SQL = """
    WITH differences AS (
        SELECT coalesce(b.user_id, a.user_id) AS user_id,
               coalesce(b.currency, a.currency) AS currency,
               b.buying_power AS legacy, a.balance AS ledger
          FROM (SELECT user_id, currency, buying_power FROM balances
                 WHERE user_id = ANY(%(users)s::uuid[])) b
          FULL JOIN (SELECT user_id, currency, balance FROM ledger_user_balances
                      WHERE user_id = ANY(%(users)s::uuid[])) a
            ON a.user_id = b.user_id AND a.currency = b.currency
         WHERE coalesce(b.buying_power, 0) <> coalesce(a.balance, 0)
    ),
    found AS (
        SELECT f.user_id, f.currency, f.legacy, f.ledger,
               coalesce(f.legacy, 0) - coalesce(f.ledger, 0) AS difference,
               (SELECT k.id FROM cutover_known_differences k
                 WHERE k.user_id = f.user_id AND k.currency = f.currency
                   AND k.difference = coalesce(f.legacy, 0) - coalesce(f.ledger, 0)
                   AND k.expires_at > now()
                 ORDER BY k.expires_at DESC, k.id DESC LIMIT 1) AS rule_id
          FROM differences f
    ),
    listed AS (
        INSERT INTO cutover_reconciliation_differences
            (run_id, chunk_id, user_id, currency, legacy_balance, ledger_balance, known)
        SELECT %(run)s, %(chunk)s, user_id, currency, legacy, ledger, rule_id IS NOT NULL
          FROM found
        RETURNING 1
    ),
    upserted AS (
        INSERT INTO cutover_discrepancies
            (user_id, currency, legacy_balance, ledger_balance, difference, status,
             known_difference_id, source, phase, reference, detail, occurrences)
        SELECT user_id, currency, legacy, ledger, difference,
               CASE WHEN rule_id IS NULL THEN 'open' ELSE 'known_difference' END, rule_id,
               'reconciliation', %(phase)s, '', '', 1
          FROM found
        ON CONFLICT (user_id, currency)
           WHERE status IN ('open', 'investigating', 'known_difference') DO UPDATE
           SET legacy_balance = EXCLUDED.legacy_balance,
               ledger_balance = EXCLUDED.ledger_balance, difference = EXCLUDED.difference,
               occurrences = cutover_discrepancies.occurrences + 1, last_seen_at = now(),
               status = CASE
                   WHEN cutover_discrepancies.status = 'investigating' THEN 'investigating'
                   WHEN EXCLUDED.known_difference_id IS NOT NULL THEN 'known_difference'
                   ELSE 'open' END,
               known_difference_id = CASE
                   WHEN cutover_discrepancies.status = 'investigating' THEN NULL
                   ELSE EXCLUDED.known_difference_id END
        RETURNING (xmax = 0) AS inserted
    ),
    resolved AS (
        UPDATE cutover_discrepancies d
           SET status = 'resolved', resolved_at = now(), resolved_by = 'reconciliation',
               resolution_note = 'legacy and ledger agree again'
         WHERE d.user_id = ANY(%(users)s::uuid[])
           AND d.status IN ('open', 'investigating', 'known_difference')
           AND NOT EXISTS (SELECT 1 FROM differences r
                            WHERE r.user_id = d.user_id AND r.currency = d.currency)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM listed),
           (SELECT count(*) FROM upserted WHERE inserted),
           (SELECT count(*) FROM resolved),
           (SELECT count(*) FROM found WHERE rule_id IS NOT NULL)
"""

TAKE_FREE_SQL = """
    SELECT id, low, high FROM cutover_reconciliation_chunks
     WHERE run_id = %s AND done_at IS NULL ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED
"""
# No free chunk: wait on the ones still taken (a chunk its worker finishes drops out once it
# commits; one whose worker died is taken here once the dead session is gone).
TAKE_WAITING_SQL = """
    SELECT id, low, high FROM cutover_reconciliation_chunks
     WHERE run_id = %s AND done_at IS NULL ORDER BY seq LIMIT 1 FOR UPDATE
"""

DEADLOCK_ATTEMPTS = 3


@dataclass(frozen=True)
class ReconciliationResult:
    run_id: int
    phase: str
    users_checked: int
    differences: int
    new_discrepancies: int
    resolved: int
    legacy_total: Decimal
    ledger_total: Decimal
    seconds: float
    known_differences: int  # of `differences`, those an active known-difference rule matched

    @property
    def clean(self) -> bool:
        return self.differences == self.known_differences


def reconciliation_run(*, triggered_by: str, on_progress=None) -> ReconciliationResult:
    """A whole reconciliation in this process: starts a run (or joins the one running), works
    its chunks until none is left, completes it; `on_progress(done, chunks)` after each chunk.
    Refused with ReconciliationBusy while another leader starts a run or a discrepancy repair
    posts (RECONCILE_LOCK, tried), with NotApplicable outside shadow, read_switch and strict.
    A run whose every difference an active known-difference rule matches is clean."""
    run = reconciliation_start(triggered_by=triggered_by)
    completed = reconciliation_work(run_id=run.pk, on_progress=on_progress)
    return ReconciliationResult(
        completed.pk,
        completed.phase,
        completed.users_checked,
        completed.differences,
        completed.new_discrepancies,
        completed.resolved,
        completed.legacy_total,
        completed.ledger_total,
        (completed.finished_at - completed.started_at).total_seconds(),
        completed.known_differences,
    )


def reconciliation_start(*, triggered_by: str) -> ReconciliationRun:
    """The running run, or a new one with its chunks. The single leader: RECONCILE_LOCK tried
    (ReconciliationBusy if another leader or a discrepancy repair holds it) and at most one
    running run (a partial unique index)."""
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [RECONCILE_LOCK])
            if not cursor.fetchone()[0]:
                raise ReconciliationBusy(
                    "another reconciliation or a discrepancy repair is running"
                )
        running = ReconciliationRun.objects.filter(status=RunStatus.RUNNING).first()
        if running is not None:
            return running
        phase = phase_state().phase
        _require_dual_write(phase)
        bounds = user_range_bounds(settings.RECONCILE_CHUNK_USERS)
        run = ReconciliationRun.objects.create(
            started_at=timezone.now(),
            phase=phase,
            chunks=len(bounds) - 1,
            triggered_by=triggered_by,
        )
        ReconciliationChunk.objects.bulk_create(
            ReconciliationChunk(run=run, seq=seq, low=low, high=high)
            for seq, (low, high) in enumerate(itertools.pairwise(bounds))
        )
    return run


def reconciliation_work(*, run_id: int, on_progress=None) -> ReconciliationRun:
    """Take and work `run_id`'s chunks until none is left, then complete the run (if another
    worker has not): the run as it stands then. NotApplicable if the phase left dual writes
    (the run is then abandoned). `on_progress(done, chunks)` after each chunk worked here."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    chunks = ReconciliationChunk.objects.filter(run_id=run_id)
    while _chunk_work(run_id, worker):
        fault_point("reconcile:recorded")
        if on_progress:
            on_progress(chunks.filter(done_at__isnull=False).count(), chunks.count())
    return _run_complete(run_id)


def _require_dual_write(phase: str) -> None:
    if phase not in DUAL_WRITE:
        raise NotApplicable(
            f"reconciliation compares the two stores while both are written "
            f"(shadow, read_switch, strict); the phase is {phase}"
        )


def _range(low, high) -> tuple[str, dict]:
    clauses = [
        clause
        for clause, bound in (("user_id >= %(low)s", low), ("user_id < %(high)s", high))
        if bound
    ]
    return " AND ".join(clauses) or "true", {"low": low, "high": high}


def _chunk_work(run_id: int, worker: str) -> bool:
    """Take one chunk of the run and work it in one transaction; False when none is left.
    A deadlock with traffic (PostgreSQL ends one side) makes the chunk start again."""
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return _chunk_attempt(run_id, worker)
        except OperationalError as exc:
            if getattr(exc.__cause__, "sqlstate", None) != "40P01" or attempt == DEADLOCK_ATTEMPTS:
                raise
    raise AssertionError("unreachable: the loop returns or raises")


def _chunk_attempt(run_id: int, worker: str) -> bool:
    abandoned_in = None
    new = 0
    with transaction.atomic(durable=True), connection.cursor() as cursor:
        cursor.execute(TAKE_FREE_SQL, [run_id])
        taken = cursor.fetchone()
        if taken is None:
            cursor.execute(TAKE_WAITING_SQL, [run_id])
            taken = cursor.fetchone()
        if taken is None:
            return False
        chunk_id, low, high = taken
        where, bounds = _range(low, high)
        cursor.execute(CHUNK_SCAN_SQL.format(range=where), bounds)
        users, legacy_total, ledger_total, differing = cursor.fetchone()
        cursor.execute(CHUNK_UNRESOLVED_SQL.format(range=where), bounds)
        candidates = sorted(set(differing) | set(cursor.fetchone()[0]))
        phase_lock_shared()
        phase = phase_state().phase
        if phase not in DUAL_WRITE:
            abandoned_in = phase
            ReconciliationRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
                status=RunStatus.ABANDONED, finished_at=timezone.now()
            )
        else:
            differences = resolved = known = 0
            if candidates:
                cursor.execute(LOCK_LEGACY_SQL, {"users": candidates})
                cursor.execute(LOCK_LEDGER_SQL, {"users": candidates})
                cursor.execute(
                    RECONCILE_RECORD_SQL,
                    {"users": candidates, "run": run_id, "chunk": chunk_id, "phase": phase},
                )
                differences, new, resolved, known = cursor.fetchone()
            ReconciliationChunk.objects.filter(pk=chunk_id).update(
                done_at=timezone.now(),
                taken_by=worker,
                users_checked=users,
                legacy_total=legacy_total,
                ledger_total=ledger_total,
                differences=differences,
                new_discrepancies=new,
                resolved=resolved,
                known_differences=known,
            )
    if abandoned_in is not None:
        _require_dual_write(abandoned_in)
    if new:
        metrics.discrepancy_count.inc(new)
    return True


def _run_complete(run_id: int) -> ReconciliationRun:
    """Complete the run with its chunks' sums once every chunk is done (under the run's row
    lock, so once); the run as it stands."""
    with transaction.atomic(durable=True):
        run = ReconciliationRun.objects.select_for_update().get(pk=run_id)
        if run.status != RunStatus.RUNNING:
            return run
        chunks = ReconciliationChunk.objects.filter(run_id=run_id)
        if chunks.filter(done_at__isnull=True).exists():
            return run
        sums = chunks.aggregate(
            users_checked=Sum("users_checked"),
            differences=Sum("differences"),
            new_discrepancies=Sum("new_discrepancies"),
            resolved=Sum("resolved"),
            known_differences=Sum("known_differences"),
            legacy_total=Sum("legacy_total"),
            ledger_total=Sum("ledger_total"),
        )
        for field, value in sums.items():
            setattr(run, field, value or 0)
        run.status = RunStatus.COMPLETED
        run.finished_at = timezone.now()
        run.save()
    return run
