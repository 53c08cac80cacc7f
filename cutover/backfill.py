"""Backfill: bringing every user's ledger balance to their legacy balance with opening-balance
postings, online, chunk by chunk, resumable, never posting a difference twice, and spread over
as many processes or Celery workers as take part.

A run (cutover_backfill_runs, at most one unfinished) is one pass over the legacy users, split
when it opens into disjoint user_id ranges (cutover_backfill_ranges, about
BACKFILL_RANGE_USERS users each, bounds from a block sample of `balances`, open at both ends),
each with its own checkpoint. A worker takes a range with SELECT ... FOR UPDATE SKIP LOCKED and
works one chunk of it in one short database transaction, set-based in PostgreSQL
(cutover_backfill_range_chunk, cutover/sql/cutover.sql): the range's next users whose stores
differ, locked as the balance path locks them (the phase lock shared, the legacy rows, then the
ledger accounts), their differences computed under those locks and posted as one ledger
transaction per currency against the range's shard of opening-balance equity (so parallel
chunks lock different equity rows), a row per user in cutover_backfill_postings (unique per
state of the user's account), and the range's checkpoint moved past them. Then it takes a range
again (the same one if still free). A worker with no free range waits on a taken one, so it
takes over a dead worker's range as soon as PostgreSQL ends the dead session; whoever sees
every range finished finishes the run with their sums. A chunk killed at any point rolls back;
its range resumes from its last committed checkpoint. A backfill that joined an unfinished run
(one a killed backfill left, or one running beside it) then passes once more from the first
user, over a new run, for the users that run had passed, who may have moved in legacy since."""

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from cutover.exceptions import (
    KillSwitchEngaged,
    NotApplicable,
    cutover_error_from,
)
from cutover.models import BackfillRange, BackfillRun
from cutover.phase_machine import phase_lock_shared
from cutover.phases import (
    Phase,
)
from cutover.selectors import phase_state, user_range_bounds
from gateway.faults import fault_point
from ledger import metrics as ledger_metrics
from ledger.services import ledger_statistics_refresh

CHUNK_SQL = """
    SELECT examined, posted, moved, transactions, finished
      FROM cutover_backfill_range_chunk(%s, %s)
"""
# A free range of the run, the one this worker worked last first (its pages are warm).
TAKE_FREE_SQL = """
    SELECT id FROM cutover_backfill_ranges
     WHERE run_id = %(run)s AND finished_at IS NULL
     ORDER BY id = %(last)s DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED
"""
# No free range: wait on a taken one (its worker's chunk commits, or its dead session ends).
TAKE_WAITING_SQL = """
    SELECT id FROM cutover_backfill_ranges
     WHERE run_id = %(run)s AND finished_at IS NULL ORDER BY seq LIMIT 1 FOR UPDATE
"""
UNFINISHED_SQL = """
    SELECT EXISTS (SELECT 1 FROM cutover_backfill_ranges
                    WHERE run_id = %(run)s AND finished_at IS NULL)
"""


@dataclass
class BackfillResult:
    runs: list[int] = field(default_factory=list)
    resumed: bool = False  # joined a run that a killed (or concurrent) backfill left unfinished
    users_examined: int = 0
    postings: int = 0
    amount: Decimal = Decimal(0)
    chunks: int = 0


def backfill_run_open(*, range_users: int | None = None) -> tuple[BackfillRun, bool]:
    """The unfinished run (there is at most one), or a new one with its ranges (of about
    `range_users` users, BACKFILL_RANGE_USERS by default), made in one transaction; True when
    it was unfinished. A run left from before ranges (cutover migration 0019) gets its ranges
    here, from the first user (only users whose stores differ are posted)."""
    range_users = range_users or settings.BACKFILL_RANGE_USERS
    with transaction.atomic(durable=True):
        run = BackfillRun.objects.select_for_update().filter(finished_at__isnull=True).first()
        if run is not None:
            if not BackfillRange.objects.filter(run=run).exists():
                _ranges_create(run, range_users)
            return run, True
        try:
            with transaction.atomic():
                run = BackfillRun.objects.create()
        except IntegrityError:  # a concurrent backfill opened it first (its ranges with it)
            return BackfillRun.objects.get(finished_at__isnull=True), True
        _ranges_create(run, range_users)
        return run, False


def _ranges_create(run: BackfillRun, range_users: int) -> None:
    bounds = user_range_bounds(range_users)
    BackfillRange.objects.bulk_create(
        BackfillRange(run=run, seq=seq, low=low, high=high)
        for seq, (low, high) in enumerate(itertools.pairwise(bounds))
    )


def backfill_run(
    *,
    chunk_size: int = 500,
    range_users: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_run: Callable[[BackfillRun], None] | None = None,
) -> BackfillResult:
    """Bring every user's ledger balance to their legacy balance, `chunk_size` users per
    transaction: open the run (or join the unfinished one) and take its ranges' chunks until
    every range is finished. A run that was unfinished (a killed backfill's, or one running
    beside this one) is followed by one more pass, over a new run, for the users it had passed
    before this one joined (only those whose stores differ since are locked and posted).
    `on_run(run)` is called as each run opens (a Celery leader asks workers to help there);
    `on_progress(done)` after each chunk with the users examined here so far."""
    result = BackfillResult()

    def pass_over() -> bool:
        run, resumed = backfill_run_open(range_users=range_users)
        if on_run:
            on_run(run)
        backfill_work(run_id=run.pk, chunk_size=chunk_size, result=result, on_progress=on_progress)
        return resumed

    result.resumed = pass_over()
    if result.resumed:
        pass_over()
    return result


# The ledger's statistics are refreshed each time the users examined double from this many.
STATISTICS_FIRST_REFRESH = 1_000


def backfill_work(
    *,
    run_id: int,
    chunk_size: int = 500,
    result: BackfillResult | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> BackfillResult:
    """Take run `run_id`'s ranges, a chunk at a time, each in a transaction of its own, until
    every range is finished (waiting on ranges other workers hold), then finish the run if
    nobody has: what was done here, added to `result`. Nothing once the run is finished. Each
    time the users examined here double, the ledger's statistics are refreshed: a first
    backfill grows its tables from nothing, and plans made for a few rows (the live traffic's
    too) would scan a million."""
    result = result if result is not None else BackfillResult()
    result.runs.append(run_id)
    refresh_at = STATISTICS_FIRST_REFRESH
    last = 0
    while True:
        if result.users_examined >= refresh_at:
            ledger_statistics_refresh()
            refresh_at *= 2
        outcome = _chunk(run_id, last, chunk_size)
        if outcome is None:
            break
        last, examined, posted, moved = outcome
        if examined:
            result.chunks += 1
            result.users_examined += examined
            result.postings += posted
            result.amount += moved
            if on_progress:
                on_progress(result.users_examined)
    backfill_run_finish(run_id=run_id)
    return result


def _chunk(run_id: int, last: int, chunk_size: int):
    """One chunk of a range of the run, in one transaction: (range id, users examined,
    postings, amount moved), or None once every range is finished."""
    with transaction.atomic(durable=True), connection.cursor() as cursor:
        params = {"run": run_id, "last": last}
        cursor.execute(TAKE_FREE_SQL, params)
        taken = cursor.fetchone()
        if taken is None:
            cursor.execute(TAKE_WAITING_SQL, params)
            taken = cursor.fetchone()
        if taken is None:  # the range waited on finished meanwhile: any other left?
            cursor.execute(UNFINISHED_SQL, params)
            return (last, 0, 0, Decimal(0)) if cursor.fetchone()[0] else None
        (range_id,) = taken
        phase_lock_shared()
        state = phase_state()
        if state.kill_switch:
            raise KillSwitchEngaged(f"kill switch engaged: {state.kill_switch_reason}")
        if state.phase == Phase.CUTOVER:
            raise NotApplicable("after cutover the legacy store is no longer the source")
        # The commit does not wait for its WAL to reach the disk, so the chunk's locks (its
        # equity shard's among them) are not held through a flush. Safe: a server crash can
        # lose only whole chunks, each with its range's checkpoint, which the next taker redoes.
        cursor.execute("SET LOCAL synchronous_commit = off")
        try:
            cursor.execute(CHUNK_SQL, [range_id, chunk_size])
        except DatabaseError as exc:  # CU003: a user's ledger account in another currency
            error = cutover_error_from(exc)
            if error is None:
                raise
            raise error from exc
        examined, posted, moved, transactions, finished = cursor.fetchone()
        if finished:
            return range_id, 0, 0, Decimal(0)
        if transactions:
            transaction.on_commit(
                lambda n=transactions: ledger_metrics.transaction_created.labels(
                    kind="opening_balance"
                ).inc(n)
            )
        fault_point("backfill:chunk-posted")
    return range_id, examined, posted, moved


def backfill_run_finish(*, run_id: int) -> BackfillRun:
    """Finish the run with its ranges' sums once every range is finished (under the run's row
    lock, so once); the run as it stands."""
    with transaction.atomic(durable=True):
        run = BackfillRun.objects.select_for_update().get(pk=run_id)
        if run.finished_at is not None:
            return run
        figures = backfill_progress(run_id=run_id)
        if not figures["ranges"] or figures["ranges_finished"] < figures["ranges"]:
            return run
        for name in ("chunks", "users_examined", "postings", "amount"):
            setattr(run, name, figures[name])
        run.finished_at = timezone.now()
        run.updated_at = run.finished_at
        run.save()
    return run


def backfill_progress(*, run_id: int) -> dict:
    """A run's figures so far, summed over its ranges (the run's own are written when it
    finishes): ranges, ranges finished, chunks, users examined, postings, amount."""
    figures = BackfillRange.objects.filter(run_id=run_id).aggregate(
        ranges=Count("id"),
        ranges_finished=Count("id", filter=Q(finished_at__isnull=False)),
        chunks=Sum("chunks"),
        users_examined=Sum("users_examined"),
        postings=Sum("postings"),
        amount=Sum("amount"),
    )
    return {name: value or 0 for name, value in figures.items()}
