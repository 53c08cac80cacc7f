"""Submission (the outbox worker): due pending jobs are sent to their provider, each as one
quote and one transfer. Due documents no idempotency, so a creation is never resent blindly:
before each attempt the provider's transfers are looked through for the job's
(treasury.due.conversion_find: a creation whose answer was lost, or whose process died before
the attempt was recorded), and only when it is not there is it created; when the attempts are
spent the job is `timed_out`, still open and still looked for. A job is failed
only when the provider refuses it or has nothing of it. Providers' health is kept here. Nothing
is submitted under the kill switch."""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cutover.selectors import phase_state
from gateway.faults import fault_point
from gateway.outbox import outbox_backoff, outbox_drain
from treasury import due, metrics
from treasury.exceptions import DueRefused, DueUnavailable, ProviderNotConfigured
from treasury.models import ConversionJob, ConversionProvider, JobStatus
from treasury.settlement import job_fail, job_save, job_settle

log = logging.getLogger(__name__)
# A lost creation is looked for among the transfers created from a little before the job's
# first send (the clocks of two machines apart).
LOOKUP_SLACK = timedelta(minutes=5)


@dataclass
class SubmitReport:
    submitted: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0


def jobs_submit(*, limit: int = 50, base_urls: Mapping[str, str] | None = None) -> SubmitReport:
    """Send due pending jobs to their provider, each claimed with FOR UPDATE SKIP LOCKED and
    sent with its own idempotency key (a resend after a crash or timeout names the same
    conversion; gateway.outbox). Providers are at `base_urls` (`due.provider_base_urls()`
    unless given). Nothing is submitted while the kill switch is on."""
    report = SubmitReport()
    if phase_state().kill_switch:
        log.warning("kill switch engaged: conversion jobs are not submitted")
        return report
    urls = due.provider_base_urls() if base_urls is None else base_urls
    outbox_drain(
        pending=ConversionJob.objects.select_related("provider").filter(status=JobStatus.PENDING),
        send=lambda job: _job_submit(job, urls),
        report=report,
        limit=limit,
    )
    return report


def _job_submit(job: ConversionJob, base_urls: Mapping[str, str]) -> str:
    """One submission of a locked pending job: its transfer is looked for at the provider, and
    created only when the provider has none. A lost answer (timeout, 5xx) is an attempt; when
    the attempts are spent the job is timed out and looked for by the monitor."""
    try:
        base_url = due.provider_base_url(job.provider.code, base_urls)
        due.recipient(job.target_currency)
    except ProviderNotConfigured as exc:  # nothing sent: not an attempt
        log.error("ALERT treasury: job %s not submitted: %s", job.pk, exc)
        job.last_error = str(exc)
        job.next_attempt_at = timezone.now() + settings.TREASURY_SUBMIT_BACKOFF
        job_save(job)
        return "retried"
    try:
        # Looked for first, every time: an earlier creation whose answer was lost, or whose
        # process was killed before its attempt was recorded, may have made the transfer.
        found = _job_find(job, base_url)
        if found is not None:
            log.warning("treasury: job %s found at the provider as %s", job.pk, found["id"])
            _provider_succeeded(job.provider)
            _job_submitted(job, found)
            return "submitted"
        job.attempts += 1
        conversion = due.conversion_create(
            base_url=base_url,
            source_currency=job.source_currency,
            source_amount=job.source_amount,
            target_currency=job.target_currency,
            external_id=str(job.idempotency_key),
        )
    except DueRefused as exc:
        job_fail(job, str(exc))  # the provider refused the creation itself: it holds nothing
        return "failed"
    except DueUnavailable as exc:
        provider_failed(job.provider, str(exc))
        job.last_error = str(exc)
        if job.attempts >= settings.TREASURY_SUBMIT_MAX_ATTEMPTS:
            return job_lost_answer_resolve(job, base_urls)
        job.next_attempt_at = timezone.now() + outbox_backoff(
            settings.TREASURY_SUBMIT_BACKOFF, job.attempts
        )
        job_save(job)
        return "retried"
    fault_point("conversion:due-answered")
    _provider_succeeded(job.provider)
    _job_submitted(job, conversion)
    return "submitted"


def _job_submitted(job: ConversionJob, conversion: dict) -> None:
    """Record the provider's reference of a locked job's conversion; what the provider already
    says of it is applied in a transaction of its own once the reference is safely recorded
    (if that fails, the monitor's poll applies it)."""
    job.provider_reference = conversion["id"]
    job.provider_status = conversion.get("due_status", "")
    if job.status == JobStatus.PENDING:
        job.status = JobStatus.SUBMITTED
    job.submitted_at = job.submitted_at or timezone.now()
    job.last_error = ""
    job_save(job)
    transaction.on_commit(lambda: job_settle(job_id=job.pk, conversion=conversion), robust=True)


def _job_find(job: ConversionJob, base_url: str) -> dict | None:
    """The transfer a locked job's lost creation made at the provider, if it has one
    (treasury.due.conversion_find): created since the job's first send, of its amount and
    currencies, held by no other job."""
    # Every other job's (a few a day): one made long ago may have sent its transfer lately.
    taken = ConversionJob.objects.exclude(pk=job.pk).filter(
        provider=job.provider, provider_reference__isnull=False
    )
    try:
        return due.conversion_find(
            base_url=base_url,
            source_currency=job.source_currency,
            source_amount=job.source_amount,
            target_currency=job.target_currency,
            since=(job.submitted_at or job.created_at) - LOOKUP_SLACK,
            taken=set(taken.values_list("provider_reference", flat=True)),
            external_id=str(job.idempotency_key),
        )
    except DueRefused as exc:  # a refused look-up says nothing of the transfer: ask again
        raise DueUnavailable(f"looking for job {job.pk}'s transfer: {exc}") from None


def job_lost_answer_resolve(job: ConversionJob, base_urls: Mapping[str, str]) -> str:
    """A locked job was sent (or may have been) but no answer came back: look for its transfer
    at the provider. It has it: recorded as submitted. It has nothing of it: failed (nothing can
    exist there). It cannot say: timed_out (pending when no attempt is recorded), open, looked
    for again on every monitor run."""
    try:
        conversion = _job_find(job, due.provider_base_url(job.provider.code, base_urls))
    except (DueUnavailable, DueRefused, ProviderNotConfigured) as exc:
        job.last_error = (
            f"answer lost after {job.attempts} attempts; the provider cannot say yet: {exc}"
        )
        if not job.attempts:  # none recorded (a killed worker's may exist): pending, asked again
            job_save(job)
            return "retried"
        if job.status != JobStatus.TIMED_OUT:
            job.status = JobStatus.TIMED_OUT
            job.finished_at = timezone.now()
            transaction.on_commit(metrics.jobs_failed.inc)
            log.error("ALERT treasury: conversion job %s: %s", job.pk, job.last_error)
        job_save(job)
        return "timed_out"
    if conversion is None:
        job_fail(job, f"the provider never received it (after {job.attempts} attempts)")
        return "failed"
    log.warning("treasury: job %s found at the provider as %s", job.pk, conversion["id"])
    _job_submitted(job, conversion)
    return "submitted"


def provider_failed(provider: ConversionProvider, error: str) -> None:
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
