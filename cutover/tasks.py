"""Celery tasks of the cutover: thin shells over the services."""

import logging

from celery import shared_task
from django.conf import settings

from cutover.backfill import backfill_run, backfill_work
from cutover.deliveries import task_options
from cutover.exceptions import KillSwitchEngaged, NotApplicable, ReconciliationBusy
from cutover.reconciliation import reconciliation_start, reconciliation_work

log = logging.getLogger(__name__)

# Redelivery is harmless: a run's chunks are taken under row locks and each is recorded once, in
# one transaction with its differences (cutover.reconciliation); a message whose process died
# comes back (acks_late, reject_on_worker_lost) and takes whatever is left. 10M users took
# 12.7-17.8 s on 2 workers (README, bench reconcile).
# A message stopped at its soft limit leaves the run running with its chunk rolled back: the
# others', and the next beat run, take what is left.
RECONCILE_TASK_OPTIONS = task_options(soft_time_limit=600)


def _work(run_id: int) -> dict:
    try:
        run = reconciliation_work(run_id=run_id)
    except NotApplicable as exc:
        log.info("reconciliation run %s abandoned: %s", run_id, exc)
        return {"run_id": run_id, "abandoned": str(exc)}
    log.info(
        "reconciliation run %s %s: %s users, %s differences, %s new, %s resolved",
        run.pk,
        run.status,
        run.users_checked,
        run.differences,
        run.new_discrepancies,
        run.resolved,
    )
    return {"run_id": run.pk, "status": run.status, "differences": run.differences}


@shared_task(name="cutover.reconcile", bind=True, **RECONCILE_TASK_OPTIONS)
def reconciliation_task(self) -> dict:
    """The periodic full reconciliation. Starts a run (or joins the one running; another
    leader starting one at that moment makes it skip), asks up to RECONCILE_FANOUT - 1 more
    workers to help through its own queue, and works chunks itself until none is left."""
    try:
        run = reconciliation_start(triggered_by="celery")
    except (ReconciliationBusy, NotApplicable) as exc:
        log.info("reconciliation skipped: %s", exc)
        return {"skipped": str(exc)}
    queue = (self.request.delivery_info or {}).get("routing_key")
    for _ in range(min(settings.RECONCILE_FANOUT, run.chunks) - 1):
        reconciliation_chunks_task.apply_async(args=[run.pk], queue=queue)
    return _work(run.pk)


@shared_task(name="cutover.reconcile_chunks", **RECONCILE_TASK_OPTIONS)
def reconciliation_chunks_task(run_id: int) -> dict:
    """A helper of a running reconciliation: works its chunks until none is left."""
    return _work(run_id)


# Redelivery is harmless: a backfill's ranges are taken under row locks, a chunk at a time, and
# each user's difference is posted once per state of the account (cutover_backfill_postings is
# unique on it); a message whose process died comes back (acks_late, reject_on_worker_lost) and
# takes what is left, from each range's last committed checkpoint. A message stopped at its soft
# limit leaves its chunk rolled back and the run unfinished: the others, a redelivery, or the
# next `cutover backfill` take what is left.
BACKFILL_TASK_OPTIONS = task_options(soft_time_limit=3000)


def _backfill_summary(result) -> dict:
    return {
        "runs": result.runs,
        "resumed": result.resumed,
        "chunks": result.chunks,
        "users_examined": result.users_examined,
        "postings": result.postings,
        "amount": str(result.amount),
    }


def backfill_helpers_send(run, *, chunk_size: int, helpers: int, queue: str | None) -> None:
    """Ask up to `helpers` workers (never more than the run has ranges, less the asker's own)
    to take the run's ranges beside the asker, through `queue`."""
    for _ in range(min(helpers, run.ranges.count() - 1)):
        backfill_ranges_task.apply_async(args=[run.pk, chunk_size], queue=queue)


@shared_task(name="cutover.backfill", bind=True, **BACKFILL_TASK_OPTIONS)
def backfill_task(self, chunk_size: int = 500) -> dict:
    """A whole backfill led by a worker: opens the run (or joins the unfinished one), asks up to
    BACKFILL_FANOUT - 1 more workers to take its ranges through its own queue, and takes
    ranges itself until every one is finished (then the one more pass a joined run needs)."""
    queue = (self.request.delivery_info or {}).get("routing_key")
    try:
        result = backfill_run(
            chunk_size=chunk_size,
            on_run=lambda run: backfill_helpers_send(
                run, chunk_size=chunk_size, helpers=settings.BACKFILL_FANOUT - 1, queue=queue
            ),
        )
    except (KillSwitchEngaged, NotApplicable) as exc:
        log.info("backfill stopped: %s", exc)
        return {"stopped": str(exc)}
    log.info(
        "backfill runs %s: %s users, %s postings",
        result.runs,
        result.users_examined,
        result.postings,
    )
    return _backfill_summary(result)


@shared_task(name="cutover.backfill_ranges", **BACKFILL_TASK_OPTIONS)
def backfill_ranges_task(run_id: int, chunk_size: int = 500) -> dict:
    """A helper of a backfill run: takes its ranges until every one is finished; nothing once
    the run is finished."""
    try:
        result = backfill_work(run_id=run_id, chunk_size=chunk_size)
    except (KillSwitchEngaged, NotApplicable) as exc:
        log.info("backfill run %s stopped: %s", run_id, exc)
        return {"run_id": run_id, "stopped": str(exc)}
    return _backfill_summary(result)
