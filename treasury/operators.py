"""Operators' actions on conversion jobs: cancelling a job never sent, retrying one the
provider failed (or never received) as a new job, resolving a disputed one with the provider's
final answer, and reversing a completed one the provider refunded, each with a reason and
audited in the same transaction; a retry is refused under the kill switch."""

import uuid
from collections.abc import Mapping
from decimal import Decimal

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.locks import SETTLEMENT_CYCLE_LOCK
from cutover.operator_audit import operator_action_record
from cutover.selectors import phase_state
from gateway.faults import fault_point
from ledger.exceptions import LedgerError
from ledger.selectors import transaction_reference
from treasury import due
from treasury.exceptions import DueRefused, DueUnavailable, JobRefused, ProviderNotConfigured
from treasury.models import ConversionJob, JobStatus
from treasury.selectors import provider_pick, source_available
from treasury.settlement import (
    completion_mismatch,
    conversion_book,
    conversion_reversal_post,
    job_asked,
    job_save,
    job_settle,
    job_transfer_get,
)

JOB_PERMISSION = "treasury.change_conversionjob"


def _reason_required(reason: str, what: str) -> str:
    if not reason or not reason.strip():
        raise JobRefused(f"a reason is required to {what}")
    if not reason.isprintable():  # (a NUL PostgreSQL cannot store, a control character)
        raise JobRefused(f"the reason to {what} holds a character that is not printable text")
    return reason.strip()


def _job_values(job: ConversionJob) -> dict:
    return {
        "status": job.status,
        "source": f"{job.source_amount} {job.source_currency}",
        "target_currency": job.target_currency,
        "provider": job.provider.code,
        "provider_reference": job.provider_reference,
        "attempts": job.attempts,
        "provider_status": job.provider_status,
        "ledger_transaction_id": job.ledger_transaction_id,
    }


def job_cancel(*, job_id: int, actor: Actor, reason: str) -> ConversionJob:
    """Cancel a job never sent (the provider cannot have it, and nothing was posted), audited
    in the same transaction. A job sent even once may exist at the provider: its fate is the
    provider's to tell."""
    reason = _reason_required(reason, "cancel a job")
    actor.require(JOB_PERMISSION)
    with transaction.atomic(durable=True):
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
        job_save(job)
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
    with transaction.atomic(durable=True):
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


def _reversible(job: ConversionJob) -> None:
    if job.status != JobStatus.COMPLETED:
        raise JobRefused(f"{job} is {job.status}; only a completed job is reversed")
    posted = job.ledger_transaction_id and transaction_reference(
        transaction_id=job.ledger_transaction_id
    )
    if posted != ("treasury", f"conversion:{job.idempotency_key}"):  # (a job made by hand)
        raise JobRefused(f"{job} has no conversion posted to the ledger: nothing to reverse")


def _provider_answer(job: ConversionJob, base_urls: Mapping[str, str] | None) -> dict:
    """What the provider says of a job's transfer now; JobRefused when it cannot be asked."""
    try:
        return job_transfer_get(job, due.provider_base_urls() if base_urls is None else base_urls)
    except (DueUnavailable, DueRefused, ProviderNotConfigured) as exc:
        raise JobRefused(f"{job}: the provider cannot be asked now: {exc}") from None


def job_reverse(
    *, job_id: int, actor: Actor, reason: str, base_urls: Mapping[str, str] | None = None
) -> ConversionJob:
    """Reverse a completed conversion that the provider refunded: the mirror image of its
    posting (treasury.settlement.conversion_reversal_post), the job `reversed`, audited in the
    same transaction; once. Only when the provider, asked now, says its transfer is
    `refund_processed` (what it says is recorded on the job either way, as a poll would): Due
    documents no refund after a transfer is processed, so the provider's word makes an ALERT,
    and the operator who has seen the source money back reverses it. In any phase and under
    the kill switch: it books money that already moved. Providers are at `base_urls`
    (`due.provider_base_urls()` unless given)."""
    reason = _reason_required(reason, "reverse a job")
    actor.require(JOB_PERMISSION)
    job = ConversionJob.objects.select_related("provider").get(pk=job_id)
    _reversible(job)  # (before Due is asked)
    with job_asked(job.pk):  # (one asker of the provider at a time: webhooks, polls)
        job_settle(job_id=job.pk, conversion=_provider_answer(job, base_urls))
        with transaction.atomic(durable=True):
            with connection.cursor() as cursor:  # never beside a cycle: it plans from buffers
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SETTLEMENT_CYCLE_LOCK])
            job = (
                ConversionJob.objects.select_for_update().select_related("provider").get(pk=job_id)
            )
            _reversible(job)
            if job.provider_status != due.REFUNDED:
                raise JobRefused(
                    f"{job}: the provider says its transfer is "
                    f"{job.provider_status or 'unknown'}, not {due.REFUNDED}; a conversion is "
                    "reversed once the provider has refunded it"
                )
            before = _job_values(job)
            job.reversal_transaction_id = conversion_reversal_post(job)
            fault_point("treasury:reversal-posted")
            job.status = JobStatus.REVERSED
            job.last_error = f"reversed by {actor.name}: {reason}"
            job_save(job)
            operator_action_record(
                actor=actor,
                action="job.reverse",
                target=f"job:{job.pk}",
                before=before,
                after={**_job_values(job), "reversal_transaction_id": job.reversal_transaction_id},
                reason=reason,
            )
    return job


def job_resolve(
    *, job_id: int, actor: Actor, reason: str, base_urls: Mapping[str, str] | None = None
) -> ConversionJob:
    """Resolve a disputed job (the provider completed it with amounts outside what is posted
    unasked: a fee over TREASURY_CONVERSION_TOLERANCE, say) with what the provider says of its
    transfer now: processed, its conversion is booked as the provider made it (the source
    exactly the job's, the destination in its currency, paying more than 0 and never more
    than 1:1); failed or refunded, the job fails. Either way its reservation of the source
    buffer ends. In flight, or the provider unreachable: refused, nothing written. Audited in
    the same transaction; in any phase and under the kill switch (money that already moved).
    Providers are at `base_urls` (`due.provider_base_urls()` unless given)."""
    reason = _reason_required(reason, "resolve a job")
    actor.require(JOB_PERMISSION)
    job = ConversionJob.objects.select_related("provider").get(pk=job_id)
    if job.status != JobStatus.DISPUTED:
        raise JobRefused(f"{job} is {job.status}; only a disputed job is resolved")
    with job_asked(job.pk):  # (one asker of the provider at a time: webhooks, polls)
        conversion = _provider_answer(job, base_urls)
        with transaction.atomic(durable=True):
            with connection.cursor() as cursor:  # never beside a cycle: it plans reservations
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SETTLEMENT_CYCLE_LOCK])
            job = (
                ConversionJob.objects.select_for_update().select_related("provider").get(pk=job_id)
            )
            if job.status != JobStatus.DISPUTED:
                raise JobRefused(f"{job} is {job.status}; only a disputed job is resolved")
            before = _job_values(job)
            said = conversion.get("due_status") or conversion["status"]
            job.provider_status = conversion.get("due_status", job.provider_status)
            if conversion["status"] == "failed":
                job.status = JobStatus.FAILED
                job.last_error = f"resolved by {actor.name} as the provider's {said}: {reason}"
                job_save(job)
            elif conversion["status"] == "completed":
                mismatch = completion_mismatch(job, conversion, tolerance=Decimal(1))
                if mismatch:
                    raise JobRefused(
                        f"{job}: the provider's conversion cannot be booked: {mismatch}"
                    )
                job.last_error = f"resolved by {actor.name} as the provider made it: {reason}"
                try:
                    conversion_book(job, Decimal(conversion["destination"]["amount"]))
                except LedgerError as exc:  # the source buffer no longer holds it, say
                    raise JobRefused(f"{job}: not booked: {exc}") from None
                fault_point("treasury:resolution-booked")
            else:
                raise JobRefused(
                    f"{job}: the provider says its transfer is {said}, not final; resolve it "
                    "once the provider has"
                )
            operator_action_record(
                actor=actor,
                action="job.resolve",
                target=f"job:{job.pk}",
                before=before,
                after={**_job_values(job), "target_amount": str(job.target_amount)},
                reason=reason,
            )
    return job
