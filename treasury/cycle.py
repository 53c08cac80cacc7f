"""The settlement cycle (one at a time, under a PostgreSQL advisory lock): it creates a
conversion job for each buffer outside its band, to bring it to target, taking from the other
buffer only what it holds above its own minimum less what open jobs reserve. Under the kill
switch the cycle is recorded, with why, and creates no jobs."""

import logging
import time
import uuid
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_UP, Decimal

from django.db import IntegrityError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from cutover.locks import SETTLEMENT_CYCLE_LOCK
from cutover.selectors import phase_state
from gateway.faults import fault_point
from treasury import metrics
from treasury.models import OPEN_STATUSES, ConversionJob, SettlementCycle
from treasury.selectors import (
    buffer_status_list,
    provider_pick,
    quantum,
    reserved,
    source_available,
)

log = logging.getLogger(__name__)
OTHER = {"USDC": "USD", "USD": "USDC"}
KILL_SWITCH_NOTE = "kill switch engaged: no conversion jobs are created"


@dataclass
class CycleResult:
    cycle_id: int | None
    skipped: str = ""
    note: str = ""
    buffers: list[dict] = field(default_factory=list)
    jobs_created: list[int] = field(default_factory=list)


def settlement_cycle_run(*, triggered_by: str) -> CycleResult:
    """One settlement cycle, if no other is running anywhere (a try of a transaction-level
    advisory lock: a second scheduler or worker skips instead of waiting). For each buffer
    below its minimum (above its maximum) one job is created to bring it to target, unless one
    is already open for it, taking from the source buffer only what it holds above its own
    minimum less what jobs already reserve from it; the jobs are submitted afterwards
    (`jobs_submit`). Under the kill switch the cycle is recorded, with why, and creates
    nothing."""
    started = time.perf_counter()
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [SETTLEMENT_CYCLE_LOCK])
            if not cursor.fetchone()[0]:
                return CycleResult(None, skipped="another settlement cycle is running")
        note = KILL_SWITCH_NOTE if phase_state().kill_switch else ""
        cycle = SettlementCycle.objects.create(
            triggered_by=triggered_by, started_at=timezone.now(), note=note
        )
        result = CycleResult(cycle.pk, note=note)
        for reading in buffer_status_list():
            metrics.buffer_check.labels(currency=reading.currency, state=reading.state).inc()
            decision = _buffer_decide(reading, triggered_by, note)
            result.buffers.append(decision)
            if decision.get("job"):
                result.jobs_created.append(decision["job"])
                metrics.jobs_created.labels(currency=reading.currency).inc()
            if reading.currency == "USDC":
                metrics.system_buffer_usdc.set(float(reading.balance))
        cycle.finished_at = timezone.now()
        cycle.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        cycle.buffers = result.buffers
        cycle.jobs_created = len(result.jobs_created)
        cycle.save()
    fault_point("cycle:committed")
    metrics.cycle_duration_ms.observe(cycle.duration_ms)
    if note:
        log.warning("settlement cycle %s: %s", cycle.pk, note)
    log.info("settlement cycle %s: %s", cycle.pk, result.buffers)
    return result


def _buffer_decide(reading, triggered_by: str, halted: str) -> dict:
    decision = {
        "currency": reading.currency,
        "balance": str(reading.balance),
        "state": reading.state,
        "action": "none",
    }
    if reading.state == "ok":
        return decision
    if halted:
        decision["action"] = halted
        return decision
    open_job = ConversionJob.objects.filter(
        buffer_currency=reading.currency, status__in=OPEN_STATUSES
    ).first()
    if open_job is not None:
        decision["action"] = f"job {open_job.pk} already open"
        return decision
    provider = provider_pick()
    if provider is None:
        log.error("ALERT treasury: no enabled conversion provider for %s", reading.currency)
        decision["action"] = "no enabled provider"
        return decision
    # 1:1 between USD and USDC; whole cents, rounded towards reaching the target.
    if reading.state == "below_min":  # bring the other currency's buffer into this one
        source, target = OTHER[reading.currency], reading.currency
        incoming = ConversionJob.objects.filter(
            target_currency=reading.currency, status__in=OPEN_STATUSES
        ).aggregate(total=Sum("source_amount"))["total"] or Decimal(0)
        wanted = (reading.target - reading.balance - incoming).quantize(
            quantum("USD"), rounding=ROUND_UP
        )
    else:  # above_max: the excess, less what jobs already take out, goes to the other buffer
        source, target = reading.currency, OTHER[reading.currency]
        wanted = (reading.balance - reserved(source) - reading.target).quantize(
            quantum("USD"), rounding=ROUND_DOWN
        )
    if wanted <= 0:
        decision["action"] = "open jobs already bring it to target"
        return decision
    available = source_available(source)
    amount = min(wanted, available)
    if amount <= 0:
        log.error(
            "ALERT treasury: %s buffer %s but the %s buffer has nothing above its minimum",
            reading.currency,
            reading.state,
            source,
        )
        decision["action"] = f"{source} buffer has nothing above its minimum"
        return decision
    try:
        with transaction.atomic():
            job = ConversionJob.objects.create(
                idempotency_key=uuid.uuid4(),
                buffer_currency=reading.currency,
                source_currency=source,
                source_amount=amount,
                target_currency=target,
                provider=provider,
                created_by=triggered_by,
            )
    except IntegrityError:  # an open job appeared meanwhile (the partial unique index)
        decision["action"] = "job already open"
        return decision
    decision.update(action=f"convert {amount} {source} -> {target}", job=job.pk)
    return decision
