"""Reconciliation: comparing every user's legacy and ledger balance while both stores are
written (set-based, one snapshot), recording and resolving discrepancies, and an operator's
resolution of a discrepancy."""

from dataclasses import dataclass
from decimal import Decimal

from django.db import OperationalError, connection, transaction
from django.utils import timezone

from cutover import metrics
from cutover.actors import Actor
from cutover.exceptions import (
    NotApplicable,
    ReasonRequired,
    ReconciliationBusy,
    TransitionRefused,
)
from cutover.locks import RECONCILE_LOCK
from cutover.models import (
    DiscrepancyStatus,
    ReconciliationRun,
)
from cutover.operator_audit import operator_action_record
from cutover.phases import (
    DUAL_WRITE,
)
from cutover.selectors import (
    DIFFERENCES_SQL,
    TOTALS_SQL,
    phase_state,
)

RECONCILE_RECORD_SQL = f"""
    WITH differences AS ({DIFFERENCES_SQL}),
    upserted AS (
        INSERT INTO cutover_discrepancies
            (user_id, currency, legacy_balance, ledger_balance, difference, status, source,
             phase, reference, detail, occurrences)
        SELECT user_id, currency, legacy, ledger, coalesce(legacy, 0) - coalesce(ledger, 0),
               'open', 'reconciliation', %(phase)s, '', '', 1
          FROM differences
        ON CONFLICT (user_id, currency) WHERE status = 'open' DO UPDATE
           SET legacy_balance = EXCLUDED.legacy_balance,
               ledger_balance = EXCLUDED.ledger_balance, difference = EXCLUDED.difference,
               occurrences = cutover_discrepancies.occurrences + 1, last_seen_at = now()
        RETURNING (xmax = 0) AS inserted
    ),
    resolved AS (
        UPDATE cutover_discrepancies d
           SET status = 'resolved', resolved_at = now(), resolved_by = 'reconciliation',
               resolution_note = 'legacy and ledger agree again'
         WHERE d.status = 'open'
           AND NOT EXISTS (SELECT 1 FROM differences r
                            WHERE r.user_id = d.user_id AND r.currency = d.currency)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted),
           (SELECT count(*) FROM upserted WHERE inserted),
           (SELECT count(*) FROM resolved)
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

    @property
    def clean(self) -> bool:
        return self.differences == 0


RECONCILE_ATTEMPTS = 3


def reconciliation_run(*, triggered_by: str) -> ReconciliationResult:
    """Compare every user's legacy and ledger balance in one snapshot, set-based; record new
    discrepancies, resolve the ones that agree again. One at a time (advisory lock).

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
                raise ReconciliationBusy("another reconciliation is running")
            phase = phase_state().phase
            if phase not in DUAL_WRITE:
                raise NotApplicable(
                    f"reconciliation compares the two stores while both are written "
                    f"(shadow, read_switch, strict); the phase is {phase}"
                )
            cursor.execute(TOTALS_SQL)
            legacy_total, ledger_total, users = cursor.fetchone()
            cursor.execute(RECONCILE_RECORD_SQL, {"phase": phase})
            differences, new, resolved = cursor.fetchone()
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
    )


def discrepancy_resolve(*, discrepancy_id: int, actor: Actor, note: str) -> None:
    from cutover.models import Discrepancy

    if not note.strip():
        raise ReasonRequired("resolving a discrepancy needs a note")
    with transaction.atomic(durable=True):
        discrepancy = Discrepancy.objects.select_for_update().get(pk=discrepancy_id)
        if discrepancy.status != DiscrepancyStatus.OPEN:
            raise TransitionRefused(f"discrepancy {discrepancy_id} is already resolved")
        discrepancy.status = DiscrepancyStatus.RESOLVED
        discrepancy.resolved_at = timezone.now()
        discrepancy.resolved_by = actor.name
        discrepancy.resolution_note = note
        discrepancy.save()
        operator_action_record(
            actor=actor,
            action="discrepancy.resolve",
            target=f"discrepancy:{discrepancy_id}",
            before={"status": DiscrepancyStatus.OPEN},
            after={"status": DiscrepancyStatus.RESOLVED, "resolved_by": actor.name},
            reason=note,
        )
