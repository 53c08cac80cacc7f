"""The treasury engine: the settlement cycle (one at a time, under a PostgreSQL advisory lock)
creates conversion jobs for buffers outside their band; the worker submits them to the
provider with each job's own idempotency key; completion posts the conversion to the ledger
exactly once (fiat buffer <-> USDC buffer through the conversion clearing accounts); the
monitor retries, polls, times out and keeps providers' health.

Money and the provider's word: a job is failed only when the provider says it failed or that it
never received it (a lookup by the job's idempotency key after a lost answer). A job whose fate
is unknown (its submit's answer was lost, or it is open after TREASURY_CONVERSION_TIMEOUT) is
`timed_out`: still open, it keeps its buffer's slot and its source amount reserved, and is asked
about on every monitor run until the provider gives a final answer, however late. Nothing is
posted before the provider reports a conversion completed, and a completion whose amounts do
not match the job is not posted: the job is `disputed`, with an ALERT, for an operator.

The kill switch stops new outbound movement: the cycle creates no jobs (its record says why),
nothing is submitted, retries are refused. What a provider reports about conversions already
submitted is still recorded and booked.
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

from cutover.actors import Actor
from cutover.api import token_matches
from cutover.locks import SETTLEMENT_CYCLE_LOCK
from cutover.operator_audit import operator_action_record
from cutover.selectors import phase_state
from ledger.exceptions import InvalidAmount, LedgerError
from ledger.money import CURRENCY_DECIMALS, amount_parse
from ledger.selectors import system_account
from ledger.services import Leg, transaction_apply
from treasury import due, metrics
from treasury.exceptions import (
    CallbackRejected,
    DueRefused,
    DueUnavailable,
    JobRefused,
    ProviderInvalid,
    ProviderNotConfigured,
    ThresholdInvalid,
    job_rules_translated,
)
from treasury.models import (
    OPEN_STATUSES,
    RESERVING_STATUSES,
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
# USD and USDC convert 1:1. A completion may pay up to 1 % less than the source amount (the
# provider's fee or spread; the sandbox takes none) and never more: anything outside that is a
# provider error or a different conversion, and is not posted.
CONVERSION_TOLERANCE = Decimal("0.01")
KILL_SWITCH_NOTE = "kill switch engaged: no conversion jobs are created"
JOB_PERMISSION = "treasury.change_conversionjob"


def _quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-CURRENCY_DECIMALS[currency])


def _reason_required(reason: str, what: str) -> str:
    if not reason or not reason.strip():
        raise JobRefused(f"a reason is required to {what}")
    return reason.strip()


def _job_save(job: ConversionJob) -> None:
    """Save a job (in a savepoint); the database's refusal of the change (TR001) becomes
    JobTransitionRefused."""
    with job_rules_translated(), transaction.atomic():
        job.save()


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


def _threshold_values(threshold: BufferThreshold | None) -> dict:
    if threshold is None:
        return {}
    return {name: str(getattr(threshold, name)) for name in ("minimum", "target", "maximum")}


def threshold_set(
    *,
    currency: str,
    minimum: Decimal,
    target: Decimal,
    maximum: Decimal,
    actor: Actor,
    reason: str,
) -> BufferThreshold:
    """Set a buffer's band (validated first: nothing changes when it is refused), audited in
    the same transaction."""
    threshold_validate(currency=currency, minimum=minimum, target=target, maximum=maximum)
    if not reason or not reason.strip():
        raise ThresholdInvalid("reason", "a reason is required to change a threshold")
    actor.require("treasury.change_bufferthreshold")
    with transaction.atomic():
        before = BufferThreshold.objects.select_for_update().filter(currency=currency).first()
        before_values = _threshold_values(before)
        threshold, _ = BufferThreshold.objects.update_or_create(
            currency=currency,
            defaults={"minimum": minimum, "target": target, "maximum": maximum},
        )
        threshold.refresh_from_db()  # the stored values, as `before` shows them
        operator_action_record(
            actor=actor,
            action="threshold.set",
            target=f"threshold:{currency}",
            before=before_values,
            after=_threshold_values(threshold),
            reason=reason.strip(),
        )
    return threshold


# Providers --------------------------------------------------------------------------------


def provider_set(
    *,
    code: str,
    actor: Actor,
    reason: str,
    enabled: bool | None = None,
    priority: int | None = None,
) -> ConversionProvider:
    """Enable or disable a provider, or change its priority (lower goes first), audited in the
    same transaction. Where its API is stays in the settings."""
    if not reason or not reason.strip():
        raise ProviderInvalid("reason", "a reason is required to change a provider")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or priority < 0
    ):
        raise ProviderInvalid("priority", "priority must be a whole number of at least 0")
    actor.require("treasury.change_conversionprovider")
    with transaction.atomic():
        provider = ConversionProvider.objects.select_for_update().get(code=code)
        before = {"enabled": provider.enabled, "priority": provider.priority}
        if enabled is not None:
            provider.enabled = bool(enabled)
        if priority is not None:
            provider.priority = priority
        provider.save(update_fields=["enabled", "priority"])
        operator_action_record(
            actor=actor,
            action="provider.set",
            target=f"provider:{code}",
            before=before,
            after={"enabled": provider.enabled, "priority": provider.priority},
            reason=reason.strip(),
        )
    return provider


# The settlement cycle ---------------------------------------------------------------------


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
    metrics.cycle_duration_ms.observe(cycle.duration_ms)
    if note:
        log.warning("settlement cycle %s: %s", cycle.pk, note)
    log.info("settlement cycle %s: %s", cycle.pk, result.buffers)
    return result


def _reserved(source: str) -> Decimal:
    """What jobs already take, or may have taken, from the `source` buffer."""
    return ConversionJob.objects.filter(
        source_currency=source, status__in=RESERVING_STATUSES
    ).aggregate(total=Sum("source_amount"))["total"] or Decimal(0)


def source_available(source: str) -> Decimal:
    """What a new conversion may take from the `source` buffer, in whole cents: what it holds
    above its own minimum (so feeding one buffer never puts the other below its band) less
    what jobs already reserve from it."""
    minimum = BufferThreshold.objects.filter(currency=source).values_list("minimum", flat=True)
    balance = system_account(code=BUFFER_ACCOUNT[source]).balance
    available = balance - (minimum.first() or Decimal(0)) - _reserved(source)
    return max(available, Decimal(0)).quantize(_quantum("USD"), rounding=ROUND_DOWN)


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
            _quantum("USD"), rounding=ROUND_UP
        )
    else:  # above_max: the excess, less what jobs already take out, goes to the other buffer
        source, target = reading.currency, OTHER[reading.currency]
        wanted = (reading.balance - _reserved(source) - reading.target).quantize(
            _quantum("USD"), rounding=ROUND_DOWN
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


# Submission (the outbox worker) -----------------------------------------------------------


@dataclass
class SubmitReport:
    submitted: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0


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
    """One submission of a locked pending job. A lost answer (timeout, 5xx) is resent with the
    same key; when the attempts are spent the provider is asked by that key what it has."""
    try:
        base_url = due.provider_base_url(job.provider.code)
    except ProviderNotConfigured as exc:  # nothing sent: not an attempt
        log.error("ALERT treasury: job %s not submitted: %s", job.pk, exc)
        job.last_error = str(exc)
        job.next_attempt_at = timezone.now() + settings.TREASURY_SUBMIT_BACKOFF
        _job_save(job)
        return "retried"
    job.attempts += 1
    try:
        conversion = due.conversion_create(
            base_url=base_url,
            idempotency_key=str(job.idempotency_key),
            source_currency=job.source_currency,
            source_amount=job.source_amount,
            target_currency=job.target_currency,
        )
    except DueRefused as exc:
        if job.attempts > 1:  # an earlier attempt's answer was lost: that one may exist
            job.last_error = str(exc)
            return _job_lost_answer_resolve(job)
        _job_fail(job, str(exc))  # the provider refused the creation itself: it holds nothing
        return "failed"
    except DueUnavailable as exc:
        _provider_failed(job.provider, str(exc))
        job.last_error = str(exc)
        if job.attempts >= settings.TREASURY_SUBMIT_MAX_ATTEMPTS:
            return _job_lost_answer_resolve(job)
        job.next_attempt_at = timezone.now() + settings.TREASURY_SUBMIT_BACKOFF * 2 ** (
            job.attempts - 1
        )
        _job_save(job)
        return "retried"
    _provider_succeeded(job.provider)
    _job_submitted(job, conversion)
    return "submitted"


def _job_submitted(job: ConversionJob, conversion: dict) -> None:
    """Record the provider's reference of a locked job's conversion; what the provider already
    says of it is applied in a transaction of its own once the reference is safely recorded
    (if that fails, the monitor's poll applies it)."""
    job.provider_reference = conversion["id"]
    if job.status == JobStatus.PENDING:
        job.status = JobStatus.SUBMITTED
    job.submitted_at = job.submitted_at or timezone.now()
    job.last_error = ""
    _job_save(job)
    transaction.on_commit(lambda: job_settle(job_id=job.pk, conversion=conversion), robust=True)


def _job_lost_answer_resolve(job: ConversionJob) -> str:
    """A locked job was sent but no answer came back: ask the provider by the job's key. It
    has the conversion: recorded as submitted. It says it never received it: failed (nothing
    can exist there). It cannot say: timed_out, open, asked again on every monitor run."""
    try:
        conversion = due.conversion_find(
            base_url=due.provider_base_url(job.provider.code),
            idempotency_key=str(job.idempotency_key),
        )
    except (DueUnavailable, DueRefused, ProviderNotConfigured) as exc:
        job.last_error = (
            f"answer lost after {job.attempts} attempts; the provider cannot say yet: {exc}"
        )
        if job.status != JobStatus.TIMED_OUT:
            job.status = JobStatus.TIMED_OUT
            job.finished_at = timezone.now()
            transaction.on_commit(metrics.jobs_failed.inc)
            log.error("ALERT treasury: conversion job %s: %s", job.pk, job.last_error)
        _job_save(job)
        return "timed_out"
    if conversion is None:
        _job_fail(job, f"the provider never received it (after {job.attempts} attempts)")
        return "failed"
    log.warning("treasury: job %s found at the provider as %s", job.pk, conversion["id"])
    _job_submitted(job, conversion)
    return "submitted"


def _job_fail(job: ConversionJob, reason: str) -> None:
    job.status = JobStatus.FAILED
    job.last_error = reason
    job.finished_at = timezone.now()
    _job_save(job)
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


def completion_mismatch(job: ConversionJob, conversion: dict) -> str:
    """Why a completed conversion's amounts cannot be this job's (empty when they can): the
    source must be exactly the job's, the destination in the target currency's scale and within
    CONVERSION_TOLERANCE below 1:1, never above."""
    source = conversion.get("source") or {}
    destination = conversion.get("destination") or {}
    if source.get("currency") != job.source_currency:
        return f"source currency {source.get('currency')!r} is not {job.source_currency}"
    if destination.get("currency") != job.target_currency:
        return f"destination currency {destination.get('currency')!r} is not {job.target_currency}"
    try:
        source_amount = amount_parse(str(source.get("amount")), job.source_currency)
        target_amount = amount_parse(str(destination.get("amount")), job.target_currency)
    except InvalidAmount as exc:
        return f"amounts unreadable: {exc}"
    if source_amount != job.source_amount:
        return f"source amount {source_amount} is not the job's {job.source_amount}"
    floor = job.source_amount * (1 - CONVERSION_TOLERANCE)
    if not floor <= target_amount <= job.source_amount:
        return (
            f"destination amount {target_amount} is outside [{floor}, {job.source_amount}] "
            f"(1:1 less at most {CONVERSION_TOLERANCE:%})"
        )
    return ""


def job_settle(*, job_id: int, conversion: dict) -> str:
    """Bring a job to what the provider says of its conversion, exactly once, in any phase and
    under the kill switch (a fact about money that already moved): a completion whose amounts
    match the job posts it to the ledger (reference `conversion:<idempotency key>`), one that
    does not marks the job disputed (nothing posted, ALERT); a failure marks it failed;
    anything else changes nothing."""
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().select_related("provider").get(pk=job_id)
        status = conversion.get("status")
        if job.status == JobStatus.COMPLETED or status in ("pending", "processing"):
            return job.status
        if job.status not in (JobStatus.SUBMITTED, JobStatus.TIMED_OUT):
            log.error(
                "ALERT treasury: job %s is %s but the provider says %s", job.pk, job.status, status
            )
            return job.status
        if status == "failed":
            _job_fail(job, f"the provider failed conversion {job.provider_reference}")
            return job.status
        mismatch = completion_mismatch(job, conversion)
        if mismatch:
            job.status = JobStatus.DISPUTED
            job.last_error = f"completed by the provider but not posted: {mismatch}"
            job.finished_at = timezone.now()
            _job_save(job)
            log.error("ALERT treasury: conversion job %s disputed: %s", job.pk, mismatch)
            return job.status
        target_amount = Decimal(conversion["destination"]["amount"])
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
        _job_save(job)
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
    job = _job_by_reference_adopt(conversion) or (
        ConversionJob.objects.filter(provider_reference=conversion["id"]).first()
    )
    if job is None:
        raise CallbackRejected(f"no job for conversion {conversion['id']}")
    return job_settle(job_id=job.pk, conversion=conversion)


def _job_by_reference_adopt(conversion: dict) -> ConversionJob | None:
    """A signed callback about a conversion we never got the answer for (its submit's answer
    was lost): its `reference` is the job's idempotency key, so the job learns its provider
    reference here and the completion is booked now rather than at the next lookup."""
    try:
        key = uuid.UUID(str(conversion.get("reference") or ""))
    except ValueError:
        return None
    with transaction.atomic():
        job = (
            ConversionJob.objects.select_for_update()
            .filter(
                idempotency_key=key,
                provider_reference__isnull=True,
                status__in=[JobStatus.PENDING, JobStatus.TIMED_OUT],
            )
            .first()
        )
        if job is None:
            return None
        job.provider_reference = conversion["id"]
        if job.status == JobStatus.PENDING:
            job.status = JobStatus.SUBMITTED
        job.submitted_at = job.submitted_at or timezone.now()
        _job_save(job)
    log.warning(
        "treasury: job %s learnt its reference %s from a callback", job.pk, job.provider_reference
    )
    return job


# Monitor ----------------------------------------------------------------------------------


@dataclass
class MonitorReport:
    submitted: int = 0
    retried: int = 0
    polled: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    disputed: int = 0


def monitor_run() -> MonitorReport:
    """Submit what is due (retries); ask the provider by key about jobs whose answer was lost;
    poll every job it has, for as long as it takes; mark jobs still open after
    TREASURY_CONVERSION_TIMEOUT timed out (still open, still asked). A job never sent within
    the timeout fails (the provider cannot have it). Polls and lookups run under the kill
    switch too: they only record what the provider did."""
    sent = jobs_submit()
    report = MonitorReport(
        submitted=sent.submitted,
        retried=sent.retried,
        failed=sent.failed,
        timed_out=sent.timed_out,
    )
    lost = ConversionJob.objects.filter(
        status=JobStatus.TIMED_OUT, provider_reference__isnull=True
    ).values_list("pk", flat=True)
    for job_id in lost:
        with transaction.atomic():
            job = (
                ConversionJob.objects.select_for_update(skip_locked=True)
                .select_related("provider")
                .filter(pk=job_id, status=JobStatus.TIMED_OUT, provider_reference__isnull=True)
                .first()
            )
            if job is not None and _job_lost_answer_resolve(job) == "failed":
                report.failed += 1
    for job in ConversionJob.objects.select_related("provider").filter(
        status__in=[JobStatus.SUBMITTED, JobStatus.TIMED_OUT], provider_reference__isnull=False
    ):
        try:
            conversion = due.conversion_get(
                base_url=due.provider_base_url(job.provider.code),
                conversion_id=job.provider_reference,
            )
        except (DueUnavailable, DueRefused, ProviderNotConfigured) as exc:
            _provider_failed(job.provider, str(exc))
            continue
        report.polled += 1
        before = job.status
        try:
            after = job_settle(job_id=job.pk, conversion=conversion)
        except LedgerError as exc:  # e.g. the source buffer was spent meanwhile: next poll
            log.error("ALERT treasury: job %s completed but not posted: %s", job.pk, exc)
            continue
        if before != after:
            report.completed += after == JobStatus.COMPLETED
            report.failed += after == JobStatus.FAILED
            report.disputed += after == JobStatus.DISPUTED
    deadline = timezone.now() - settings.TREASURY_CONVERSION_TIMEOUT
    for job_id in ConversionJob.objects.filter(
        status__in=[JobStatus.PENDING, JobStatus.SUBMITTED], created_at__lt=deadline
    ).values_list("pk", flat=True):
        with transaction.atomic():
            job = (
                ConversionJob.objects.select_for_update(skip_locked=True)
                .select_related("provider")
                .filter(pk=job_id)
                .first()
            )
            if job is None:
                continue
            if job.status == JobStatus.SUBMITTED:
                job.status = JobStatus.TIMED_OUT
                job.finished_at = timezone.now()
                job.last_error = (
                    f"open after {settings.TREASURY_CONVERSION_TIMEOUT}; still asked until the "
                    "provider answers"
                )
                _job_save(job)
                transaction.on_commit(metrics.jobs_failed.inc)
                log.error("ALERT treasury: conversion job %s timed out", job.pk)
                report.timed_out += 1
            elif job.status == JobStatus.PENDING and job.attempts == 0:
                _job_fail(job, f"not sent within {settings.TREASURY_CONVERSION_TIMEOUT}")
                report.failed += 1
            elif job.status == JobStatus.PENDING:  # sent, its answer lost: ask by key
                outcome = _job_lost_answer_resolve(job)
                report.failed += outcome == "failed"
                report.timed_out += outcome == "timed_out"
    metrics.system_buffer_usdc.set(float(system_account(code="usdc_buffer").balance))
    return report


# Operators --------------------------------------------------------------------------------


def _job_values(job: ConversionJob) -> dict:
    return {
        "status": job.status,
        "source": f"{job.source_amount} {job.source_currency}",
        "target_currency": job.target_currency,
        "provider": job.provider.code,
        "provider_reference": job.provider_reference,
        "attempts": job.attempts,
    }


def job_cancel(*, job_id: int, actor: Actor, reason: str) -> ConversionJob:
    """Cancel a job never sent (the provider cannot have it, and nothing was posted), audited
    in the same transaction. A job sent even once may exist at the provider: its fate is the
    provider's to tell."""
    reason = _reason_required(reason, "cancel a job")
    actor.require(JOB_PERMISSION)
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().select_related("provider").get(pk=job_id)
        if job.status != JobStatus.PENDING:
            raise JobRefused(f"{job} is {job.status}; only pending jobs are cancelled")
        if job.attempts:
            raise JobRefused(
                f"{job} was sent {job.attempts} time(s) and may exist at the provider; it is "
                "not cancelled (the provider's answer, or a lookup by its key, settles it)"
            )
        before = _job_values(job)
        job.status = JobStatus.CANCELLED
        job.last_error = f"cancelled by {actor.name}: {reason}"
        job.finished_at = timezone.now()
        _job_save(job)
        operator_action_record(
            actor=actor,
            action="job.cancel",
            target=f"job:{job.pk}",
            before=before,
            after=_job_values(job),
            reason=reason,
        )
    return job


def job_retry(*, job_id: int, actor: Actor, reason: str) -> ConversionJob:
    """A job the provider failed (or never received) is tried again as a new job (a new
    idempotency key, the next healthy provider) for the same conversion, if its buffer has no
    open job and the source buffer can give it; audited in the same transaction. Refused under
    the kill switch, and for any job whose fate is not final (it may still complete)."""
    reason = _reason_required(reason, "retry a job")
    actor.require(JOB_PERMISSION)
    with transaction.atomic():
        with connection.cursor() as cursor:  # never beside a cycle: both plan from reservations
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SETTLEMENT_CYCLE_LOCK])
        if phase_state().kill_switch:
            raise JobRefused("the kill switch is engaged: no new conversion jobs")
        job = ConversionJob.objects.select_for_update().select_related("provider").get(pk=job_id)
        if job.status != JobStatus.FAILED:
            raise JobRefused(
                f"{job} is {job.status}; only a job the provider failed or never received is "
                "retried"
            )
        provider = provider_pick()
        if provider is None:
            raise JobRefused("no enabled conversion provider")
        available = source_available(job.source_currency)
        if job.source_amount > available:
            raise JobRefused(
                f"the {job.source_currency} buffer can give {available} above its minimum and "
                f"what open jobs reserve, not {job.source_amount}"
            )
        try:
            with transaction.atomic():
                again = ConversionJob.objects.create(
                    idempotency_key=uuid.uuid4(),
                    buffer_currency=job.buffer_currency,
                    source_currency=job.source_currency,
                    source_amount=job.source_amount,
                    target_currency=job.target_currency,
                    provider=provider,
                    created_by=f"{actor.name} (retry of job {job.pk})",
                )
        except IntegrityError:
            raise JobRefused(f"the {job.buffer_currency} buffer already has an open job") from None
        operator_action_record(
            actor=actor,
            action="job.retry",
            target=f"job:{job.pk}",
            before=_job_values(job),
            after={"retried_as": again.pk, **_job_values(again)},
            reason=reason,
        )
    return again
