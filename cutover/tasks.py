"""Celery tasks of the cutover: thin shells over the services."""

import logging

from celery import shared_task
from django.conf import settings

from cutover.deliveries import task_options
from cutover.exceptions import NotApplicable, ReconciliationBusy
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
