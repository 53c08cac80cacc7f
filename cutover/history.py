"""Reads of the rollout's history, for the operators' charts: discrepancies opened and resolved,
the balance path's ledger writes, and the shadow experiment's figures (both stores' write times
and the mismatches of their comparisons), per time bucket; the phases, the kill switch and the
read-percentage steps as the audit trail tells them.

Buckets are `date_bin(width, moment, since)`: aligned on `since`, so a window that starts at
midnight has calendar days. Every bucket of the window is returned, empty ones as zeros."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection

from cutover.models import AuditAction, PhaseAudit
from cutover.phases import DUAL_WRITE

PHASE_ACTIONS = (AuditAction.SEED, AuditAction.ADVANCE, AuditAction.FORCE, AuditAction.ROLLBACK)

DISCREPANCIES_OPENED_SQL = """
    SELECT date_bin(%s, first_seen_at, %s), count(*)
      FROM cutover_discrepancies WHERE first_seen_at >= %s AND first_seen_at < %s GROUP BY 1
"""
DISCREPANCIES_RESOLVED_SQL = """
    SELECT date_bin(%s, resolved_at, %s), count(*)
      FROM cutover_discrepancies WHERE resolved_at >= %s AND resolved_at < %s GROUP BY 1
"""
LEDGER_WRITES_SQL = """
    SELECT date_bin(%s, created_at, %s),
           count(*) FILTER (WHERE ledger_status = 'posted'),
           count(*) FILTER (WHERE ledger_status = 'failed')
      FROM cutover_balance_mutations WHERE created_at >= %s AND created_at < %s GROUP BY 1
"""
STRICT_FAILURES_SQL = """
    SELECT date_bin(%s, at, %s), count(*), count(*) FILTER (WHERE phase = ANY(%s))
      FROM cutover_strict_failures WHERE at >= %s AND at < %s GROUP BY 1
"""
# The experiment: the journal rows with both timings (a dual write: shadow, read_switch,
# strict; rows journaled before cutover migration 0014 have none). percentile_disc, so a
# percentile is a time some mutation took (p50 of an even count is the lower middle one). Its
# cost is reading the window's rows, as a count of them costs (README: Performance).
EXPERIMENT_SQL = """
    SELECT date_bin(%s, created_at, %s), count(*), count(*) FILTER (WHERE mismatch),
           percentile_disc(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY legacy_us),
           percentile_disc(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY ledger_us)
      FROM cutover_balance_mutations
     WHERE created_at >= %s AND created_at < %s
       AND legacy_us IS NOT NULL AND ledger_us IS NOT NULL
     GROUP BY 1
"""


def bucket_starts(*, since: datetime, until: datetime, width: timedelta) -> list[datetime]:
    """The start of every bucket of `width` from `since` up to (not including) `until`."""
    count = max(0, -(-(until - since) // width))  # ceiling: a partly elapsed bucket counts
    return [since + n * width for n in range(count)]


def _per_bucket(sql: str, params: list, *, since, until, width) -> dict[datetime, tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, [width, since, *params, since, until])
        return {row[0]: row[1:] for row in cursor.fetchall()}


@dataclass(frozen=True)
class DiscrepancyBucket:
    start: datetime
    opened: int
    resolved: int


def discrepancies_per_bucket(
    *, since: datetime, until: datetime, width: timedelta
) -> list[DiscrepancyBucket]:
    """Discrepancies first seen, and resolved (by reconciliation or an operator), per bucket."""
    window = {"since": since, "until": until, "width": width}
    opened = _per_bucket(DISCREPANCIES_OPENED_SQL, [], **window)
    resolved = _per_bucket(DISCREPANCIES_RESOLVED_SQL, [], **window)
    return [
        DiscrepancyBucket(start, opened.get(start, (0,))[0], resolved.get(start, (0,))[0])
        for start in bucket_starts(**window)
    ]


@dataclass(frozen=True)
class LedgerWriteBucket:
    """The balance path's ledger writes in a bucket. `success_rate` is the gate's figure
    (cutover.selectors.ledger_write_stats): posted over posted, failed and strict failures;
    None without writes."""

    start: datetime
    posted: int
    failed: int
    strict_failures: int

    @property
    def attempts(self) -> int:
        return self.posted + self.failed + self.strict_failures

    @property
    def success_rate(self) -> float | None:
        return self.posted / self.attempts if self.attempts else None


DUAL_WRITE_PHASES = [phase.value for phase in DUAL_WRITE]


def _strict_failures(**window) -> dict[datetime, tuple]:
    """Per bucket: strict failures (every phase), and those of a dual-write phase."""
    return _per_bucket(STRICT_FAILURES_SQL, [DUAL_WRITE_PHASES], **window)


def ledger_writes_per_bucket(
    *, since: datetime, until: datetime, width: timedelta
) -> list[LedgerWriteBucket]:
    window = {"since": since, "until": until, "width": width}
    writes = _per_bucket(LEDGER_WRITES_SQL, [], **window)
    strict = _strict_failures(**window)
    return [
        LedgerWriteBucket(start, *writes.get(start, (0, 0)), strict.get(start, (0, 0))[0])
        for start in bucket_starts(**window)
    ]


@dataclass(frozen=True)
class ExperimentBucket:
    """The shadow experiment in a bucket, as Scientist reports one: the legacy write is the
    control, the ledger write the candidate. `compared`: dual writes journaled with both
    timings; `mismatches`: those whose stores' balances then differed; `strict_failures`:
    dual writes whose ledger write failed in strict (the request failed and its journal row
    rolled back with it: a candidate that raised, so a mismatch without timings). Times are
    microseconds (percentile_disc of the journal's legacy_us and ledger_us), None without
    comparisons."""

    start: datetime
    compared: int
    mismatches: int
    strict_failures: int
    legacy_p50_us: int | None
    legacy_p95_us: int | None
    ledger_p50_us: int | None
    ledger_p95_us: int | None

    @property
    def experiments(self) -> int:
        return self.compared + self.strict_failures

    @property
    def mismatch_rate(self) -> float | None:
        """Mismatches and strict failures over the experiments; None without any."""
        if not self.experiments:
            return None
        return (self.mismatches + self.strict_failures) / self.experiments


def experiment_per_bucket(
    *, since: datetime, until: datetime, width: timedelta
) -> list[ExperimentBucket]:
    window = {"since": since, "until": until, "width": width}
    compared = _per_bucket(EXPERIMENT_SQL, [], **window)
    strict = _strict_failures(**window)
    buckets = []
    for start in bucket_starts(**window):
        count, mismatches, legacy, ledger = compared.get(start, (0, 0, [None, None], [None, None]))
        buckets.append(
            ExperimentBucket(
                start, count, mismatches, strict.get(start, (0, 0))[1], *legacy, *ledger
            )
        )
    return buckets


@dataclass(frozen=True)
class Period:
    """A stretch of time in one state, as the audit row that began it tells."""

    state: str
    start: datetime
    end: datetime
    actor: str
    action: str
    reason: str


def _periods(rows: list[PhaseAudit], state_of, until: datetime) -> list[Period]:
    periods = []
    for index, row in enumerate(rows):
        end = rows[index + 1].at if index + 1 < len(rows) else until
        periods.append(Period(state_of(row), row.at, end, row.actor, row.action, row.reason))
    return periods


def phase_periods(*, until: datetime) -> list[Period]:
    """Each phase the rollout was in, from the audit trail (seeded, advanced, forced, rolled
    back), oldest first; the last one runs to `until`."""
    rows = list(PhaseAudit.objects.filter(action__in=PHASE_ACTIONS).order_by("at", "id"))
    return _periods(rows, lambda row: row.to_phase, until)


def kill_switch_periods(*, until: datetime) -> list[Period]:
    """Each time the kill switch was on: engaged by whom and why, until released (or `until`)."""
    rows = list(
        PhaseAudit.objects.filter(
            action__in=(AuditAction.KILL_SWITCH_ON, AuditAction.KILL_SWITCH_OFF)
        ).order_by("at", "id")
    )
    return [
        period
        for period in _periods(rows, lambda row: row.action, until)
        if period.state == AuditAction.KILL_SWITCH_ON
    ]


def read_percent_steps() -> list[PhaseAudit]:
    """The read percentage raised within read_switch, oldest first (evidence: before, after)."""
    return list(PhaseAudit.objects.filter(action=AuditAction.READ_PERCENT).order_by("at", "id"))


def kill_switch_engaged_by() -> PhaseAudit | None:
    """The audit row of the kill switch's last engagement (who, when, why)."""
    return (
        PhaseAudit.objects.filter(action=AuditAction.KILL_SWITCH_ON).order_by("-at", "-id").first()
    )
