"""Submission (the outbox worker): due pending jobs are sent to their provider, each with
its own idempotency key; a lost answer is resent with the same key, and when the attempts are
spent the provider is asked by that key what it has. A job is failed only when the provider
says it failed or that it never received it; a job whose fate is unknown is `timed_out`, still
open and still asked. Providers' health is kept here. Nothing is submitted under the kill
switch."""

import logging
from collections.abc import Mapping
from dataclasses import dataclass

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
    """One submission of a locked pending job. A lost answer (timeout, 5xx) is resent with the
    same key; when the attempts are spent the provider is asked by that key what it has."""
    try:
        base_url = due.provider_base_url(job.provider.code, base_urls)
    except ProviderNotConfigured as exc:  # nothing sent: not an attempt
        log.error("ALERT treasury: job %s not submitted: %s", job.pk, exc)
        job.last_error = str(exc)
        job.next_attempt_at = timezone.now() + settings.TREASURY_SUBMIT_BACKOFF
        job_save(job)
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
            return job_lost_answer_resolve(job, base_urls)
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
    if job.status == JobStatus.PENDING:
        job.status = JobStatus.SUBMITTED
    job.submitted_at = job.submitted_at or timezone.now()
    job.last_error = ""
    job_save(job)
    transaction.on_commit(lambda: job_settle(job_id=job.pk, conversion=conversion), robust=True)


def job_lost_answer_resolve(job: ConversionJob, base_urls: Mapping[str, str]) -> str:
    """A locked job was sent but no answer came back: ask the provider by the job's key. It
    has the conversion: recorded as submitted. It says it never received it: failed (nothing
    can exist there). It cannot say: timed_out, open, asked again on every monitor run."""
    try:
        conversion = due.conversion_find(
            base_url=due.provider_base_url(job.provider.code, base_urls),
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
