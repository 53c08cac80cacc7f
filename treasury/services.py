"""The treasury engine: the settlement cycle (one at a time, under a PostgreSQL advisory lock)
creates conversion jobs for buffers outside their band; the worker submits them to the
provider with each job's own idempotency key; completion posts the conversion to the ledger
exactly once (fiat buffer <-> USDC buffer through the conversion clearing accounts); the
monitor retries, polls, times out and keeps providers' health.

Money and timeouts: nothing is posted before the provider reports a conversion completed. A
job still open after TREASURY_CONVERSION_TIMEOUT is marked timed_out (nothing posted; its
buffer's slot is free, so the next cycle may create a new job, with the next healthy provider).
If the provider completes a timed-out job later, that completion is posted then, once, and
logged: the ledger follows what the provider did.
"""

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_UP, Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from cutover.api import token_matches
from cutover.locks import SETTLEMENT_CYCLE_LOCK
from cutover.selectors import phase_state
from ledger.exceptions import LedgerError
from ledger.money import CURRENCY_DECIMALS
from ledger.selectors import system_account
from ledger.services import Leg, transaction_apply
from treasury import due, metrics
from treasury.exceptions import (
    CallbackRejected,
    DueRefused,
    DueUnavailable,
    JobRefused,
    ThresholdInvalid,
)
from treasury.models import (
    OPEN_STATUSES,
    BufferThreshold,
    ConversionJob,
    ConversionProvider,
    JobStatus,
    SettlementCycle,
)
from treasury.selectors import buffer_status_list, provider_pick

log = logging.getLogger(__name__)
BUFFER_ACCOUNT = {"USDC": "usdc_buffer", "USD": "fiat_buffer"}
OTHER = {"USDC": "USD", "USD": "USDC"}


def _quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-CURRENCY_DECIMALS[currency])


# Thresholds -------------------------------------------------------------------------------


def threshold_validate(
    *, currency: str, minimum: Decimal, target: Decimal, maximum: Decimal
) -> None:
    """A buffer's band must be 0 <= minimum <= target <= maximum, in the currency's precision;
    ThresholdInvalid names the field otherwise."""
    if currency not in BUFFER_ACCOUNT:
        raise ThresholdInvalid("currency", f"no buffer holds {currency!r}")
    for name, value in (("minimum", minimum), ("target", target), ("maximum", maximum)):
        if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
            raise ThresholdInvalid(name, f"{name} must be a decimal of at least 0")
        if value != value.quantize(_quantum(currency)) or value >= Decimal("1e20"):
            raise ThresholdInvalid(name, f"{name} has too many places or digits for {currency}")
    if minimum > target:
        raise ThresholdInvalid("minimum", "minimum must not exceed target")
    if target > maximum:
        raise ThresholdInvalid("maximum", "maximum must not be below target")


def threshold_set(
    *, currency: str, minimum: Decimal, target: Decimal, maximum: Decimal
) -> BufferThreshold:
    """Set a buffer's band (validated first: nothing changes when it is refused)."""
    threshold_validate(currency=currency, minimum=minimum, target=target, maximum=maximum)
    threshold, _ = BufferThreshold.objects.update_or_create(
        currency=currency,
        defaults={"minimum": minimum, "target": target, "maximum": maximum},
    )
    return threshold


# The settlement cycle ---------------------------------------------------------------------


@dataclass
class CycleResult:
    cycle_id: int | None
    skipped: str = ""
    buffers: list[dict] = field(default_factory=list)
    jobs_created: list[int] = field(default_factory=list)


def settlement_cycle_run(*, triggered_by: str) -> CycleResult:
    """One settlement cycle, if no other is running anywhere (a try of a transaction-level
    advisory lock: a second scheduler or worker skips instead of waiting). For each buffer
    below its minimum (above its maximum) one job is created to bring it to target, unless one
    is already open for it; the jobs are submitted afterwards (`jobs_submit`)."""
    started = time.perf_counter()
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [SETTLEMENT_CYCLE_LOCK])
            if not cursor.fetchone()[0]:
                return CycleResult(None, skipped="another settlement cycle is running")
        cycle = SettlementCycle.objects.create(triggered_by=triggered_by, started_at=timezone.now())
        result = CycleResult(cycle.pk)
        for reading in buffer_status_list():
            metrics.buffer_check.labels(currency=reading.currency, state=reading.state).inc()
            decision = _buffer_decide(reading, triggered_by)
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
    metrics.cycle_duration_ms.observe(cycle.duration_ms)
    log.info("settlement cycle %s: %s", cycle.pk, result.buffers)
    return result


def _buffer_decide(reading, triggered_by: str) -> dict:
    decision = {
        "currency": reading.currency,
        "balance": str(reading.balance),
        "state": reading.state,
        "action": "none",
    }
    if reading.state == "ok":
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
    if reading.state == "below_min":  # bring the other currency's buffer into this one
        source, target = OTHER[reading.currency], reading.currency
        wanted = reading.target - reading.balance
    else:  # above_max: the excess goes to the other buffer
        source, target = reading.currency, OTHER[reading.currency]
        wanted = reading.balance - reading.target
    # 1:1 between USD and USDC; whole cents, rounded towards reaching the target.
    rounding = ROUND_UP if reading.state == "below_min" else ROUND_DOWN
    amount = wanted.quantize(_quantum("USD"), rounding=rounding)
    # What the source buffer can give: its balance less what open jobs will take from it.
    committed = ConversionJob.objects.filter(
        source_currency=source, status__in=OPEN_STATUSES
    ).aggregate(total=Sum("source_amount"))["total"] or Decimal(0)
    available = system_account(code=BUFFER_ACCOUNT[source]).balance - committed
    amount = min(amount, available.quantize(_quantum("USD"), rounding=ROUND_DOWN))
    if amount <= 0:
        log.error(
            "ALERT treasury: %s buffer %s but the %s buffer has nothing to convert",
            reading.currency,
            reading.state,
            source,
        )
        decision["action"] = f"{source} buffer empty"
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


# Submission (the outbox worker) -----------------------------------------------------------


@dataclass
class SubmitReport:
    submitted: int = 0
    failed: int = 0
    retried: int = 0


def jobs_submit(*, limit: int = 50) -> SubmitReport:
    """Send due pending jobs to their provider, each claimed with FOR UPDATE SKIP LOCKED and
    sent with its own idempotency key (a resend after a crash or timeout names the same
    conversion). Nothing is submitted while the kill switch is on."""
    report = SubmitReport()
    if phase_state().kill_switch:
        log.warning("kill switch engaged: conversion jobs are not submitted")
        return report
    tried: list[int] = []
    for _ in range(limit):
        with transaction.atomic(durable=True):
            job = (
                ConversionJob.objects.select_for_update(skip_locked=True)
                .select_related("provider")
                .filter(status=JobStatus.PENDING, next_attempt_at__lte=timezone.now())
                .exclude(pk__in=tried)
                .order_by("next_attempt_at", "id")
                .first()
            )
            if job is None:
                break
            tried.append(job.pk)
            outcome = _job_submit(job)
        setattr(report, outcome, getattr(report, outcome) + 1)
    return report


def _job_submit(job: ConversionJob) -> str:
    job.attempts += 1
    try:
        conversion = due.conversion_create(
            base_url=job.provider.base_url or settings.DUE_API_BASE_URL,
            idempotency_key=str(job.idempotency_key),
            source_currency=job.source_currency,
            source_amount=job.source_amount,
            target_currency=job.target_currency,
        )
    except DueRefused as exc:
        _job_fail(job, str(exc))
        return "failed"
    except DueUnavailable as exc:
        _provider_failed(job.provider, str(exc))
        job.last_error = str(exc)
        if job.attempts >= settings.TREASURY_SUBMIT_MAX_ATTEMPTS:
            _job_fail(job, f"not submitted after {job.attempts} attempts: {exc}")
            return "failed"
        job.next_attempt_at = timezone.now() + settings.TREASURY_SUBMIT_BACKOFF * 2 ** (
            job.attempts - 1
        )
        job.save()
        return "retried"
    _provider_succeeded(job.provider)
    job.provider_reference = conversion["id"]
    job.status = JobStatus.SUBMITTED
    job.submitted_at = timezone.now()
    job.last_error = ""
    job.save()
    # What the provider already says of it is applied in a transaction of its own, once the
    # reference is safely recorded; if that fails, the monitor's poll applies it.
    transaction.on_commit(lambda: job_settle(job_id=job.pk, conversion=conversion), robust=True)
    return "submitted"


def _job_fail(job: ConversionJob, reason: str) -> None:
    job.status = JobStatus.FAILED
    job.last_error = reason
    job.finished_at = timezone.now()
    job.save()
    transaction.on_commit(metrics.jobs_failed.inc)
    log.error("ALERT treasury: conversion job %s failed: %s", job.pk, reason)


def _provider_failed(provider: ConversionProvider, error: str) -> None:
    with transaction.atomic():
        provider = ConversionProvider.objects.select_for_update().get(pk=provider.pk)
        provider.consecutive_failures += 1
        provider.last_error = error[:2000]
        provider.last_failure_at = timezone.now()
        if (
            provider.healthy
            and provider.consecutive_failures >= settings.TREASURY_PROVIDER_FAILURE_LIMIT
        ):
            provider.healthy = False
            log.error(
                "ALERT treasury: provider %s unhealthy after %s failures; new jobs fail over",
                provider.code,
                provider.consecutive_failures,
            )
        provider.save()


def _provider_succeeded(provider: ConversionProvider) -> None:
    ConversionProvider.objects.filter(pk=provider.pk).exclude(
        healthy=True, consecutive_failures=0
    ).update(healthy=True, consecutive_failures=0)


# Settling a job -------------------------------------------------------------------------


def job_settle(*, job_id: int, conversion: dict) -> str:
    """Bring a job to what the provider says of its conversion, exactly once: a completion
    posts the conversion to the ledger (reference `conversion:<idempotency key>`), a failure
    marks the job failed; anything else changes nothing."""
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().get(pk=job_id)
        status = conversion.get("status")
        if job.status == JobStatus.COMPLETED or status in ("pending", "processing"):
            return job.status
        if job.status not in (JobStatus.SUBMITTED, JobStatus.TIMED_OUT):
            log.error(
                "ALERT treasury: job %s is %s but the provider says %s", job.pk, job.status, status
            )
            return job.status
        if status == "failed":
            if job.status == JobStatus.TIMED_OUT:
                return job.status  # nothing was posted; it stays timed out
            _job_fail(job, f"the provider failed conversion {job.provider_reference}")
            return job.status
        target_amount = Decimal(conversion["destination"]["amount"]).quantize(
            _quantum(job.target_currency), rounding=ROUND_DOWN
        )
        posting = transaction_apply(
            namespace="treasury",
            reference_id=f"conversion:{job.idempotency_key}",
            kind="conversion",
            legs=[
                Leg.debit(
                    system_account(code=f"conversion_clearing_{job.source_currency.lower()}"),
                    job.source_amount,
                ),
                Leg.credit(
                    system_account(code=BUFFER_ACCOUNT[job.source_currency]), job.source_amount
                ),
                Leg.debit(system_account(code=BUFFER_ACCOUNT[job.target_currency]), target_amount),
                Leg.credit(
                    system_account(code=f"conversion_clearing_{job.target_currency.lower()}"),
                    target_amount,
                ),
            ],
            metadata={
                "job": job.pk,
                "provider": job.provider.code,
                "reference": job.provider_reference,
            },
        )
        if job.status == JobStatus.TIMED_OUT:
            log.warning("treasury: job %s completed after its timeout; posted now", job.pk)
        job.status = JobStatus.COMPLETED
        job.target_amount = target_amount
        job.ledger_transaction_id = posting.transaction_id
        job.finished_at = timezone.now()
        job.save()
        return job.status


def callback_receive(*, body: bytes, timestamp: str, signature: str) -> str:
    """A provider's signed callback about a conversion: verified (HMAC with DUE_API_SECRET),
    then settled like a poll's answer; duplicates change nothing."""
    if not settings.DUE_API_SECRET:
        raise CallbackRejected("DUE_API_SECRET is not configured")
    expected = due.signature(settings.DUE_API_SECRET, timestamp, body)
    if not signature or not token_matches(signature, expected):
        raise CallbackRejected("X-Due-Signature does not match the body", "X-Due-Signature")
    try:
        conversion = due.conversion_parse(json.loads(body))
    except (ValueError, DueUnavailable):
        raise CallbackRejected("the body is not a Due conversion") from None
    job = ConversionJob.objects.filter(provider_reference=conversion["id"]).first()
    if job is None:
        raise CallbackRejected(f"no job for conversion {conversion['id']}")
    return job_settle(job_id=job.pk, conversion=conversion)


# Monitor ----------------------------------------------------------------------------------


@dataclass
class MonitorReport:
    submitted: int = 0
    retried: int = 0
    polled: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0


def monitor_run() -> MonitorReport:
    """Submit what is due (retries), poll open jobs at their provider, then time out what is
    still open after TREASURY_CONVERSION_TIMEOUT."""
    sent = jobs_submit()
    report = MonitorReport(submitted=sent.submitted, retried=sent.retried, failed=sent.failed)
    for job in (
        ConversionJob.objects.select_related("provider")
        .filter(
            status__in=[JobStatus.SUBMITTED, JobStatus.TIMED_OUT], provider_reference__isnull=False
        )
        .exclude(
            status=JobStatus.TIMED_OUT,
            finished_at__lt=timezone.now() - settings.TREASURY_CONVERSION_TIMEOUT,
        )
    ):
        try:
            conversion = due.conversion_get(
                base_url=job.provider.base_url or settings.DUE_API_BASE_URL,
                conversion_id=job.provider_reference,
            )
        except (DueUnavailable, DueRefused) as exc:
            _provider_failed(job.provider, str(exc))
            continue
        report.polled += 1
        before = job.status
        try:
            after = job_settle(job_id=job.pk, conversion=conversion)
        except LedgerError as exc:  # e.g. the source buffer was spent meanwhile: next poll
            log.error("ALERT treasury: job %s completed but not posted: %s", job.pk, exc)
            continue
        report.completed += after == JobStatus.COMPLETED and before != after
        report.failed += after == JobStatus.FAILED and before != after
    deadline = timezone.now() - settings.TREASURY_CONVERSION_TIMEOUT
    for job_id in ConversionJob.objects.filter(
        status__in=OPEN_STATUSES, created_at__lt=deadline
    ).values_list("pk", flat=True):
        with transaction.atomic():
            job = ConversionJob.objects.select_for_update().get(pk=job_id)
            if job.status == JobStatus.SUBMITTED:
                job.status = JobStatus.TIMED_OUT
                job.finished_at = timezone.now()
                job.last_error = f"open after {settings.TREASURY_CONVERSION_TIMEOUT}"
                job.save()
                transaction.on_commit(metrics.jobs_failed.inc)
                log.error("ALERT treasury: conversion job %s timed out", job.pk)
                report.timed_out += 1
            elif job.status == JobStatus.PENDING:
                _job_fail(job, f"not submitted within {settings.TREASURY_CONVERSION_TIMEOUT}")
                report.failed += 1
    metrics.system_buffer_usdc.set(float(system_account(code="usdc_buffer").balance))
    return report


# Operators --------------------------------------------------------------------------------


def job_cancel(*, job_id: int, actor: str, reason: str) -> ConversionJob:
    """Cancel a job not yet submitted (nothing reached the provider under a recorded reference,
    and nothing was posted)."""
    if not reason.strip():
        raise JobRefused("a reason is required to cancel a job")
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().get(pk=job_id)
        if job.status != JobStatus.PENDING:
            raise JobRefused(f"{job} is {job.status}; only pending jobs are cancelled")
        job.status = JobStatus.CANCELLED
        job.last_error = f"cancelled by {actor}: {reason.strip()}"
        job.finished_at = timezone.now()
        job.save()
    return job


def job_retry(*, job_id: int, actor: str) -> ConversionJob:
    """A failed or timed-out job is tried again as a new job (a new idempotency key, the next
    healthy provider) for the same conversion, if its buffer has no open job."""
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().get(pk=job_id)
        if job.status not in (JobStatus.FAILED, JobStatus.TIMED_OUT):
            raise JobRefused(f"{job} is {job.status}; only failed or timed-out jobs are retried")
        provider = provider_pick()
        if provider is None:
            raise JobRefused("no enabled conversion provider")
        try:
            with transaction.atomic():
                return ConversionJob.objects.create(
                    idempotency_key=uuid.uuid4(),
                    buffer_currency=job.buffer_currency,
                    source_currency=job.source_currency,
                    source_amount=job.source_amount,
                    target_currency=job.target_currency,
                    provider=provider,
                    created_by=f"{actor} (retry of job {job.pk})",
                )
        except IntegrityError:
            raise JobRefused(f"the {job.buffer_currency} buffer already has an open job") from None
