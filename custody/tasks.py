"""Custody's Celery task (a thin shell)."""

import logging

from celery import shared_task

from custody.services import custody_reconcile_from_providers
from cutover.deliveries import task_options
from cutover.exceptions import ReconciliationBusy
from onchain.exceptions import CircleUnavailable
from treasury.exceptions import DueUnavailable

log = logging.getLogger(__name__)


# Redelivery is harmless: one run at a time, one open discrepancy per currency updated in place;
# two provider reads (Circle, Due: a few tries of 5 s each).
@shared_task(name="custody.reconcile", **task_options(soft_time_limit=120))
def custody_reconcile_task() -> dict:
    """The periodic custody reconciliation: the buffers against Circle and Due. A provider that
    cannot answer skips the run (logged); a concurrent run makes this one skip."""
    try:
        comparisons = custody_reconcile_from_providers()
    except (ReconciliationBusy, CircleUnavailable, DueUnavailable) as exc:
        log.warning("custody reconciliation skipped: %s", exc)
        return {"skipped": str(exc)}
    differing = [c.currency for c in comparisons if not c.agrees]
    if differing:
        log.error("ALERT custody: %s differ from their custodians", ", ".join(differing))
    return {"differing": differing}
