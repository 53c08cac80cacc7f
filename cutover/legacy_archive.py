"""The deployment checklist's Phase 5, "Archive legacy tables after 90 days": once the rollout has
been in cutover for CUTOVER_LEGACY_ARCHIVE_AFTER, the legacy store (`balances`, the one legacy
table; not written since the cutover) is copied into the schema `legacy_archive`, emptied, and
both copies are closed to writes. The rows stay in the database (and in its backups) for audit;
nothing in the product reads them any more: in cutover every balance is the ledger's, and an
empty `balances` leaves the one-currency checks and the checklist's `users` to the ledger.

The archive is the point of no return: the rollback from cutover rebuilds `balances` from the
ledger, and after the archive it is refused, here and by PostgreSQL (cutover/sql/cutover.sql)."""

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.exceptions import ArchiveRefused, ReasonRequired
from cutover.models import LegacyArchive, OperatorAudit
from cutover.operator_audit import operator_action_record
from cutover.phase_machine import phase_state_fenced
from cutover.phases import Phase
from cutover.selectors import legacy_archive_get

LEGACY_TABLE = "balances"
ARCHIVED_AS = f"legacy_archive.{LEGACY_TABLE}"

# Under the write fence. TRUNCATE takes `balances` exclusively too: the balance path's
# one-currency check, which reads it, waits for the commit and then finds it empty.
ARCHIVE_COPY_SQL = [
    "LOCK TABLE balances IN ACCESS EXCLUSIVE MODE",
    "CREATE TABLE legacy_archive.balances (LIKE balances INCLUDING ALL)",
    "INSERT INTO legacy_archive.balances SELECT * FROM balances",
]
ARCHIVE_TOTALS_SQL = """
    SELECT currency, count(*), sum(buying_power) FROM legacy_archive.balances
     GROUP BY currency ORDER BY currency
"""
ARCHIVE_CLOSE_SQL = [
    "TRUNCATE balances",
    # Statement triggers: no cost per row, and TRUNCATE is refused too.
    "CREATE TRIGGER cutover_legacy_archived BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE"
    " ON balances FOR EACH STATEMENT EXECUTE FUNCTION cutover_legacy_archived_refuse()",
    "CREATE TRIGGER cutover_legacy_archived BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE"
    " ON legacy_archive.balances FOR EACH STATEMENT"
    " EXECUTE FUNCTION cutover_legacy_archived_refuse()",
]
COMMENT_SQL = "COMMENT ON TABLE {table} IS %s"
LIVE_COMMENT = (
    "ARCHIVED: balances live in ledger_accounts; the legacy rows were moved to {archived_as} "
    "on {at:%Y-%m-%d}, after {days} in cutover. Empty and not written any more."
)
ARCHIVE_COMMENT = (
    "The legacy store (balances) as it stood when archived on {at:%Y-%m-%d} ({rows} rows), "
    "after {days} in cutover. Read-only."
)


@dataclass(frozen=True)
class LegacyArchiveResult:
    archive: LegacyArchive
    created: bool  # False: it was already archived, nothing changed
    audit: OperatorAudit | None


def days_text(duration: timedelta) -> str:
    return f"{round(duration / timedelta(days=1), 2):g} days"


def legacy_archive(*, actor: Actor, reason: str) -> LegacyArchiveResult:
    """Archive the legacy store, once, after CUTOVER_LEGACY_ARCHIVE_AFTER in cutover (read from
    the phase state's `entered_at`: a rollback and a new cutover start the time again), audited
    in the same transaction. Refused (ArchiveRefused, nothing changed) in another phase or
    before its time; a second run returns the first archive and changes nothing. Holds the
    write fence while it copies (the balance path waits: plan for a few seconds per million
    legacy rows)."""
    actor.require("cutover.archive_legacy")
    if not reason.strip():
        raise ReasonRequired("archiving the legacy store needs a written --reason")
    required = settings.CUTOVER_LEGACY_ARCHIVE_AFTER
    with transaction.atomic(durable=True):
        state = phase_state_fenced()
        archived = legacy_archive_get()
        if archived is not None:
            return LegacyArchiveResult(archived, created=False, audit=None)
        if state.phase != Phase.CUTOVER:
            raise ArchiveRefused(
                f"the legacy store is archived in cutover only, after {days_text(required)} "
                f"there; the phase is {state.phase}"
            )
        since = state.entered_at
        elapsed = timezone.now() - since
        if elapsed < required:
            raise ArchiveRefused(
                f"in cutover since {since:%Y-%m-%d %H:%M} UTC ({days_text(elapsed)}); the "
                f"legacy store is archived after {days_text(required)} in cutover "
                f"(CUTOVER_LEGACY_ARCHIVE_AFTER): from {since + required:%Y-%m-%d %H:%M} UTC"
            )
        totals = _archive_copy()
        rows = sum(total["rows"] for total in totals.values())
        archive = LegacyArchive.objects.create(
            table_name=LEGACY_TABLE,
            archived_as=ARCHIVED_AS,
            rows=rows,
            totals=totals,
            cutover_entered_at=since,
            min_time_in_cutover=required,
            archived_by=actor.name,
            reason=reason,
        )
        archive.refresh_from_db()
        _comments_set(archive, days_text(archive.archived_at - since))
        audit = operator_action_record(
            actor=actor,
            action="legacy.archive",
            target=f"table:{LEGACY_TABLE}",
            before={
                "phase": state.phase,
                "in_cutover_since": since.isoformat(),
                "rows": rows,
                "totals": totals,
            },
            after={"archived_as": ARCHIVED_AS, "rows": rows, "rows_left": 0},
            reason=reason,
        )
        return LegacyArchiveResult(archive, created=True, audit=audit)


def _archive_copy() -> dict[str, dict]:
    """Copy `balances` into the archive, empty it, close both to writes; per currency, the rows
    and total archived."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", [ARCHIVED_AS])
        if cursor.fetchone()[0] is not None:
            raise ArchiveRefused(
                f"{ARCHIVED_AS} already exists but no archive is recorded: keep its rows "
                "elsewhere, drop it, and run the archive again"
            )
        for statement in ARCHIVE_COPY_SQL:
            cursor.execute(statement)
        cursor.execute(ARCHIVE_TOTALS_SQL)
        totals = {
            currency: {"rows": count, "total": str(total or Decimal(0))}
            for currency, count, total in cursor.fetchall()
        }
        for statement in ARCHIVE_CLOSE_SQL:
            cursor.execute(statement)
    return totals


def _comments_set(archive: LegacyArchive, days: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            COMMENT_SQL.format(table=LEGACY_TABLE),
            [LIVE_COMMENT.format(archived_as=ARCHIVED_AS, at=archive.archived_at, days=days)],
        )
        cursor.execute(
            COMMENT_SQL.format(table=ARCHIVED_AS),
            [ARCHIVE_COMMENT.format(at=archive.archived_at, rows=archive.rows, days=days)],
        )
