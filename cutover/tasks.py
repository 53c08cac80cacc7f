"""Celery tasks of the cutover: thin shells over the services."""

import logging

from celery import shared_task

from cutover.exceptions import NotApplicable, ReconciliationBusy
from cutover.reconciliation import reconciliation_run

log = logging.getLogger(__name__)


# Redelivery is harmless: one run at a time (advisory lock), one REPEATABLE READ snapshot per
# run, discrepancies recorded once per user; 1M users take about 2 s (README, bench).
@shared_task(
    name="cutover.reconcile",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=600,
    time_limit=630,
    max_retries=0,  # no Celery retry: the next beat run is the retry
)
def reconciliation_task() -> dict:
    """The periodic full reconciliation. Any number of beat replicas and workers may fire it:
    the advisory lock in reconciliation_run lets one run at a time, the others skip."""
    try:
        result = reconciliation_run(triggered_by="celery")
    except (ReconciliationBusy, NotApplicable) as exc:
        log.info("reconciliation skipped: %s", exc)
        return {"skipped": str(exc)}
    log.info(
        "reconciliation run %s: %s users, %s differences, %s new, %s resolved",
        result.run_id,
        result.users_checked,
        result.differences,
        result.new_discrepancies,
        result.resolved,
    )
    return {"run_id": result.run_id, "differences": result.differences}
