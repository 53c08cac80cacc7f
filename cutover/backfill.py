"""Backfill: bringing every user's ledger balance to their legacy balance with opening-balance
postings, online, chunk by chunk, resumable and never posting a difference twice.

A run is a pass over the legacy users in user_id order (cutover_backfill_runs). Each chunk is
one short database transaction, set-based in PostgreSQL (cutover_backfill_chunk,
cutover/sql/cutover.sql): the next users whose stores differ, locked as the balance path locks
them (the phase lock shared, the legacy rows, then the ledger accounts), their differences
computed under those locks and posted as one ledger transaction per currency against
opening-balance equity, a row per user in cutover_backfill_postings (unique per state of the
user's account), and the run's checkpoint moved past them. A run killed at any point resumes
after its last committed chunk (what a killed chunk did rolled back with it), and one more pass
then covers the users it had passed, who may have moved in legacy since."""

from dataclasses import dataclass, field
from decimal import Decimal

from django.db import IntegrityError, connection, transaction

from cutover.exceptions import (
    KillSwitchEngaged,
    NotApplicable,
)
from cutover.models import BackfillRun
from cutover.phase_machine import phase_lock_shared
from cutover.phases import (
    Phase,
)
from cutover.selectors import phase_state
from gateway.faults import fault_point
from ledger import metrics as ledger_metrics
from ledger.services import ledger_statistics_refresh

CHUNK_SQL = """
    SELECT examined, posted, moved, transactions, finished FROM cutover_backfill_chunk(%s, %s)
"""


@dataclass
class BackfillResult:
    runs: list[int] = field(default_factory=list)
    resumed: bool = False  # finished a run that a killed (or concurrent) backfill left
    users_examined: int = 0
    postings: int = 0
    amount: Decimal = Decimal(0)


def backfill_run_open() -> tuple[BackfillRun, bool]:
    """The unfinished run (there is at most one), or a new one; True when it was unfinished."""
    with transaction.atomic(durable=True):
        run = BackfillRun.objects.filter(finished_at__isnull=True).first()
        if run is not None:
            return run, True
        try:
            with transaction.atomic():
                return BackfillRun.objects.create(), False
        except IntegrityError:  # a concurrent backfill opened it first: run it together
            return BackfillRun.objects.get(finished_at__isnull=True), True


def backfill_run(*, chunk_size: int = 500, on_progress=None) -> BackfillResult:
    """Bring every user's ledger balance to their legacy balance, `chunk_size` users per
    transaction. A run a killed backfill left unfinished is resumed after its checkpoint, then
    one more pass runs from the first user, for the users it had passed before it was killed
    (only those whose stores differ since are locked and posted). `on_progress(done)` is
    called after each chunk with the users examined so far."""
    result = BackfillResult()
    run, result.resumed = backfill_run_open()
    _pass(run, chunk_size, result, on_progress)
    if result.resumed:
        run, _ = backfill_run_open()
        _pass(run, chunk_size, result, on_progress)
    return result


# The ledger's statistics are refreshed each time the users examined double from this many.
STATISTICS_FIRST_REFRESH = 1_000


def _pass(run: BackfillRun, chunk_size: int, result: BackfillResult, on_progress) -> None:
    """The run's chunks, each in a transaction of its own, until it is finished. Each time
    the users examined double, the ledger's statistics are refreshed: a first backfill grows
    its tables from nothing, and plans made for a few rows (the live traffic's too) would scan
    a million."""
    result.runs.append(run.pk)
    refresh_at = STATISTICS_FIRST_REFRESH
    while True:
        if result.users_examined >= refresh_at:
            ledger_statistics_refresh()
            refresh_at *= 2
        with transaction.atomic(durable=True):
            phase_lock_shared()
            state = phase_state()
            if state.kill_switch:
                raise KillSwitchEngaged(f"kill switch engaged: {state.kill_switch_reason}")
            if state.phase == Phase.CUTOVER:
                raise NotApplicable("after cutover the legacy store is no longer the source")
            with connection.cursor() as cursor:
                # The commit does not wait for its WAL to reach the disk, so the chunk's locks
                # (equity's among them) are not held through a flush. Safe: a server crash can
                # lose only whole chunks, each with its checkpoint, which the next run redoes.
                cursor.execute("SET LOCAL synchronous_commit = off")
                cursor.execute(CHUNK_SQL, [run.pk, chunk_size])
                examined, posted, moved, transactions, finished = cursor.fetchone()
            if finished:
                return
            if transactions:
                transaction.on_commit(
                    lambda n=transactions: ledger_metrics.transaction_created.labels(
                        kind="opening_balance"
                    ).inc(n)
                )
            fault_point("backfill:chunk-posted")
        result.users_examined += examined
        result.postings += posted
        result.amount += moved
        if on_progress:
            on_progress(result.users_examined)
