"""Celery tasks of the on-chain engine: thin shells over the services, scheduled by beat.
`ENABLE_ONCHAIN_ENGINE=false` makes them do nothing (the webhook still stores and applies)."""

import dataclasses
import logging

from celery import shared_task
from django.conf import settings

from cutover.deliveries import task_options
from onchain.exceptions import CircleUnavailable
from onchain.polling import transfers_poll
from onchain.withdrawals import withdrawals_send

log = logging.getLogger(__name__)


# Redelivery is harmless: rows claimed with SKIP LOCKED, every send under the withdrawal's own
# idempotency key; up to 100 rows a pass, each one Circle call of CIRCLE_HTTP_TIMEOUT (5 s).
@shared_task(name="onchain.withdrawals_send", **task_options(soft_time_limit=600))
def withdrawals_send_task() -> dict:
    """The outbox worker's pass; rows are claimed with SKIP LOCKED, so overlapping passes on
    any number of workers share the work instead of repeating it."""
    if not settings.ENABLE_ONCHAIN_ENGINE:
        return {"skipped": "ENABLE_ONCHAIN_ENGINE is off"}
    return dataclasses.asdict(withdrawals_send())


# Redelivery is harmless: each transfer credited once by its reference; every page of the
# lookback plus one call per submitted withdrawal.
@shared_task(name="onchain.transfers_poll", **task_options(soft_time_limit=600))
def transfers_poll_task() -> dict:
    """The deposit polling fallback (every ONCHAIN_DEPOSIT_POLL_INTERVAL)."""
    if not settings.ENABLE_ONCHAIN_ENGINE:
        return {"skipped": "ENABLE_ONCHAIN_ENGINE is off"}
    try:
        report = transfers_poll()
    except CircleUnavailable as exc:  # the next poll tries again
        log.warning("transfer poll failed: %s", exc)
        return {"failed": str(exc)}
    return dataclasses.asdict(report)
