"""Reconciliation: comparing every user's legacy and ledger balance while both stores are
written (set-based, one snapshot), recording discrepancies (labelled known differences where an
active known-difference rule matches them) and resolving the ones that agree again."""

from dataclasses import dataclass
from decimal import Decimal

from django.db import OperationalError, connection, transaction
from django.utils import timezone

from cutover import metrics
from cutover.exceptions import (
    NotApplicable,
    ReconciliationBusy,
)
from cutover.locks import RECONCILE_LOCK
from cutover.models import (
    ReconciliationRun,
)
from cutover.phases import (
    DUAL_WRITE,
)
from cutover.selectors import (
    DIFFERENCES_SQL,
    TOTALS_SQL,
    phase_state,
)
from gateway.faults import fault_point

# Each difference found, with the active known-difference rule matching it (same user,
# currency and difference to the last unit; cutover.selectors.known_difference_matching), is
# recorded on the user's one unresolved discrepancy: an open one a rule matches becomes a known
# difference, a known difference no rule matches any more (expired, or the difference moved)
# is open again, one under investigation stays so. Unresolved ones that agree again resolve.
RECONCILE_RECORD_SQL = f"""
    WITH differences AS ({DIFFERENCES_SQL}),
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
         WHERE d.status IN ('open', 'investigating', 'known_difference')
           AND NOT EXISTS (SELECT 1 FROM differences r
                            WHERE r.user_id = d.user_id AND r.currency = d.currency)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted),
           (SELECT count(*) FROM upserted WHERE inserted),
           (SELECT count(*) FROM resolved),
           (SELECT count(*) FROM found WHERE rule_id IS NOT NULL)
"""


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


RECONCILE_ATTEMPTS = 3


def reconciliation_run(*, triggered_by: str) -> ReconciliationResult:
    """Compare every user's legacy and ledger balance in one snapshot, set-based; record new
    discrepancies, resolve the ones that agree again. One at a time, and never while a
    discrepancy repair posts (RECONCILE_LOCK, tried: ReconciliationBusy). A run whose every
    difference an active known-difference rule matches is clean.

    The snapshot is REPEATABLE READ: a discrepancy row that a concurrent mutation changed after
    it was taken makes PostgreSQL refuse the write (40001); the run is then repeated, a bounded
    number of times, on a fresh snapshot."""
    for attempt in range(1, RECONCILE_ATTEMPTS + 1):
        try:
            return _reconciliation_attempt(triggered_by)
        except OperationalError as exc:
            if getattr(exc.__cause__, "sqlstate", None) != "40001" or attempt == RECONCILE_ATTEMPTS:
                raise
    raise AssertionError("unreachable: the loop returns or raises")


def _reconciliation_attempt(triggered_by: str) -> ReconciliationResult:
    started = timezone.now()
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [RECONCILE_LOCK])
            if not cursor.fetchone()[0]:
                raise ReconciliationBusy(
                    "another reconciliation or a discrepancy repair is running"
                )
            phase = phase_state().phase
            if phase not in DUAL_WRITE:
                raise NotApplicable(
                    f"reconciliation compares the two stores while both are written "
                    f"(shadow, read_switch, strict); the phase is {phase}"
                )
            cursor.execute(TOTALS_SQL)
            legacy_total, ledger_total, users = cursor.fetchone()
            cursor.execute(RECONCILE_RECORD_SQL, {"phase": phase})
            differences, new, resolved, known = cursor.fetchone()
            fault_point("reconcile:recorded")
        finished = timezone.now()
        run = ReconciliationRun.objects.create(
            started_at=started,
            finished_at=finished,
            phase=phase,
            users_checked=users,
            differences=differences,
            new_discrepancies=new,
            resolved=resolved,
            legacy_total=legacy_total,
            ledger_total=ledger_total,
            triggered_by=triggered_by,
            known_differences=known,
        )
    if new:
        metrics.discrepancy_count.inc(new)
    return ReconciliationResult(
        run.pk,
        phase,
        users,
        differences,
        new,
        resolved,
        legacy_total,
        ledger_total,
        (finished - started).total_seconds(),
        known,
    )
