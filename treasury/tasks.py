"""Celery tasks of the treasury: thin shells over the services, scheduled by beat
(django-celery-beat). `ENABLE_TREASURY_SCHEDULER=false` makes them do nothing; the command and
the endpoint still run a cycle on demand."""

import dataclasses
import logging

from celery import shared_task
from django.conf import settings

from cutover.deliveries import task_options
from treasury.cycle import settlement_cycle_run
from treasury.monitor import monitor_run
from treasury.submission import jobs_submit

log = logging.getLogger(__name__)


# Redelivery is harmless: one cycle at a time, never a second open job per buffer, jobs sent
# under their own idempotency key; a few Due calls of DUE_HTTP_ATTEMPTS tries.
@shared_task(name="treasury.settlement_cycle", **task_options(soft_time_limit=300))
def settlement_cycle_task() -> dict:
    """Any number of beat replicas and workers may fire it: one cycle runs, the others skip."""
    if not settings.ENABLE_TREASURY_SCHEDULER:
        return {"skipped": "ENABLE_TREASURY_SCHEDULER is off"}
    result = settlement_cycle_run(triggered_by="celery")
    if result.skipped:
        log.info("settlement cycle skipped: %s", result.skipped)
        return {"skipped": result.skipped}
    return {"cycle": result.cycle_id, **dataclasses.asdict(jobs_submit())}


# Redelivery is harmless: completions post once (reference conversion:<key>), polls only
# record what the provider did; a few Due calls per open job.
@shared_task(name="treasury.monitor", **task_options(soft_time_limit=300))
def monitor_task() -> dict:
    if not settings.ENABLE_TREASURY_SCHEDULER:
        return {"skipped": "ENABLE_TREASURY_SCHEDULER is off"}
    return dataclasses.asdict(monitor_run())
