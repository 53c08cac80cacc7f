"""The monitor: it submits what is due (retries), asks the provider by key about jobs whose
answer was lost, polls every job the provider has until it gives a final answer, however late,
marks jobs still open after TREASURY_CONVERSION_TIMEOUT timed out (still open, still asked),
and asks again about jobs completed within TREASURY_REFUND_WATCH (a refund after
completion)."""

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from ledger.exceptions import LedgerError
from ledger.selectors import USDC_BUFFER, system_balance
from treasury import due, metrics
from treasury.exceptions import DueRefused, DueUnavailable, ProviderNotConfigured
from treasury.models import ConversionJob, JobStatus
from treasury.settlement import job_ask_settle, job_save
from treasury.submission import job_lost_answer_resolve, jobs_submit, provider_failed

log = logging.getLogger(__name__)
AWAITING_FUNDS = "awaiting_funds"  # Due's status of a transfer it has not been paid for yet
# Completed jobs asked about again (_completed_watch): each at most once per hour, at most 50 a
# run (a run a minute: 3,000 an hour, beyond any day's conversions).
REFUND_CHECK_EVERY = timedelta(hours=1)
REFUND_CHECK_BATCH = 50


@dataclass
class MonitorReport:
    submitted: int = 0
    retried: int = 0
    polled: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    disputed: int = 0
    awaiting_funds: int = 0  # jobs whose funding instructions were recorded in this run
    watched: int = 0  # completed jobs asked about again (a refund after completion)


def monitor_run(*, base_urls: Mapping[str, str] | None = None) -> MonitorReport:
    """Submit what is due (retries); look for the transfers of jobs whose answer was lost;
    poll every job it has, for as long as it takes; mark jobs still open after
    TREASURY_CONVERSION_TIMEOUT timed out (still open, still asked). A job never sent within
    the timeout fails once the provider lists none of it. Polls and look-ups run under the kill
    switch too: they only record what the provider did. Providers are at `base_urls`
    (`due.provider_base_urls()` unless given)."""
    urls = due.provider_base_urls() if base_urls is None else base_urls
    sent = jobs_submit(base_urls=urls)
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
        with transaction.atomic(durable=True):
            job = (
                ConversionJob.objects.select_for_update(skip_locked=True)
                .select_related("provider")
                .filter(pk=job_id, status=JobStatus.TIMED_OUT, provider_reference__isnull=True)
                .first()
            )
            if job is not None and job_lost_answer_resolve(job, urls) == "failed":
                report.failed += 1
    for job in ConversionJob.objects.select_related("provider").filter(
        status__in=[JobStatus.SUBMITTED, JobStatus.TIMED_OUT], provider_reference__isnull=False
    ):
        before = job.status
        try:
            after, conversion = job_ask_settle(job=job, base_urls=urls)
        except (DueUnavailable, DueRefused, ProviderNotConfigured) as exc:
            provider_failed(job.provider, str(exc))
            continue
        except LedgerError as exc:  # e.g. the source buffer was spent meanwhile: next poll
            report.polled += 1
            log.error("ALERT treasury: job %s completed but not posted: %s", job.pk, exc)
            continue
        report.polled += 1
        if conversion["due_status"] == AWAITING_FUNDS and job.funding is None:
            report.awaiting_funds += _funding_record(job, conversion, urls)
        if before != after:
            report.completed += after == JobStatus.COMPLETED
            report.failed += after == JobStatus.FAILED
            report.disputed += after == JobStatus.DISPUTED
    deadline = timezone.now() - settings.TREASURY_CONVERSION_TIMEOUT
    for job_id in ConversionJob.objects.filter(
        status__in=[JobStatus.PENDING, JobStatus.SUBMITTED], created_at__lt=deadline
    ).values_list("pk", flat=True):
        with transaction.atomic(durable=True):
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
                job_save(job)
                transaction.on_commit(metrics.jobs_failed.inc)
                log.error("ALERT treasury: conversion job %s timed out", job.pk)
                report.timed_out += 1
            elif job.status == JobStatus.PENDING:
                # Looked for even when no attempt is recorded: a worker killed after Due took
                # the creation leaves none (found from outside: failed unasked, the job's slot
                # freed, and the next job's transfer made a second one).
                outcome = job_lost_answer_resolve(job, urls)
                report.failed += outcome == "failed"
                report.timed_out += outcome == "timed_out"
    report.watched = _completed_watch(urls)
    metrics.system_buffer_usdc.set(float(system_balance(code=USDC_BUFFER)))
    return report


def _completed_watch(base_urls: Mapping[str, str]) -> int:
    """Ask the provider again about jobs completed within TREASURY_REFUND_WATCH, each at most
    once per REFUND_CHECK_EVERY (the least recently asked first, at most REFUND_CHECK_BATCH per
    run): a refund after completion is recorded with its ALERT (job_settle) even when its
    webhook never came. One the provider cannot answer now is asked again an hour later; its
    failures do not count against the provider's health (the open jobs' polls say that). How
    many were answered."""
    now = timezone.now()
    asked = 0
    watched = list(
        ConversionJob.objects.select_related("provider")
        .filter(
            status=JobStatus.COMPLETED,
            provider_reference__isnull=False,
            finished_at__gte=now - settings.TREASURY_REFUND_WATCH,
        )
        .filter(
            Q(provider_checked_at__isnull=True)
            | Q(provider_checked_at__lt=now - REFUND_CHECK_EVERY)
        )
        .order_by(F("provider_checked_at").asc(nulls_first=True), "pk")[:REFUND_CHECK_BATCH]
    )
    # Asked, answered or not: the next ask is in an hour (found from outside: jobs Due could
    # not show stayed the least recently asked and filled every run's batch). One update.
    ConversionJob.objects.filter(pk__in=[job.pk for job in watched]).update(provider_checked_at=now)
    for job in watched:
        try:
            job_ask_settle(job=job, base_urls=base_urls)
            asked += 1
        except (DueUnavailable, DueRefused, ProviderNotConfigured) as exc:
            log.warning("treasury: completed job %s not asked about now: %s", job.pk, exc)
    return asked


def _funding_record(job: ConversionJob, conversion: dict, base_urls: Mapping[str, str]) -> bool:
    """What Due says funds a job's transfer, recorded on the job once, with an ALERT for the
    operator who sends it (the treasury does not fund transfers itself yet): for USDC, where to
    send it (`POST /v1/transfers/{id}/funding_address`); for USD, the transfer's own
    instructions when Due gives any. Whether Due can be asked now or not, the poll goes on."""
    try:
        if job.source_currency == "USDC":
            funding = due.funding_address_request(
                base_url=due.provider_base_url(job.provider.code, base_urls),
                transfer_id=job.provider_reference,
            )
        else:
            funding = conversion["instructions"]
    except (DueUnavailable, DueRefused, ProviderNotConfigured) as exc:
        log.warning("treasury: job %s's funding instructions not read now: %s", job.pk, exc)
        return False
    if not funding:
        return False
    with transaction.atomic(durable=True):
        updated = ConversionJob.objects.filter(
            pk=job.pk,
            funding__isnull=True,
            status__in=[JobStatus.SUBMITTED, JobStatus.TIMED_OUT],
        ).update(funding=funding)
    if updated:
        log.error(
            "ALERT treasury: job %s: Due's transfer %s awaits %s %s; fund it as Due says: %s",
            job.pk,
            job.provider_reference,
            job.source_amount,
            job.source_currency,
            json.dumps(funding),
        )
    return bool(updated)
