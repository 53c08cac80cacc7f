"""Settling a job with what the provider says of its conversion, from a poll or its signed
callback: a completion posts the conversion to the ledger exactly once (fiat buffer <-> USDC
buffer through the conversion clearing accounts); a completion whose amounts do not match the
job is not posted (the job is `disputed`, with an ALERT, for an operator); a failure fails the
job. This runs under the kill switch too: it records money that already moved."""

import logging
import time
import uuid
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from gateway import boundary
from gateway.boundary import token_matches
from gateway.exceptions import InputRefused
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from ledger.selectors import BUFFER_ACCOUNTS, system_account
from ledger.services import Leg, system_account_gather, transaction_apply
from treasury import due, metrics
from treasury.exceptions import (
    CallbackRejected,
    ConversionMalformed,
    ProviderReferenceTaken,
    treasury_rules,
)
from treasury.models import ConversionJob, JobStatus

log = logging.getLogger(__name__)
# USD and USDC convert 1:1. A completion may pay up to 1 % less than the source amount (the
# provider's fee or spread; the sandbox takes none) and never more: anything outside that is a
# provider error or a different conversion, and is not posted.
CONVERSION_TOLERANCE = Decimal("0.01")
MAX_TIMESTAMP_DIGITS = 12  # Unix seconds (10 digits until the year 2286)
# How far a callback's signed X-Due-Timestamp may be from our clock, either way: a captured
# callback replayed later (its signature still good) is refused. Each delivery, a retry
# included, is signed afresh with the time it is sent (the sandbox does so).
CALLBACK_TOLERANCE_SECONDS = 300
TIMESTAMP_OUTSIDE_WINDOW = (
    "X-Due-Timestamp is {skew:+d} s from our clock; a callback is accepted only within "
    "{tolerance} s either way (a replayed or delayed delivery)"
)
ID_TAKEN = (
    "data.id {conversion_id!r} is already job {owner}'s conversion, yet the callback names "
    "job {job}'s key as its reference: the provider contradicts what we recorded; refused, "
    "for an operator"
)


def job_save(job: ConversionJob) -> None:
    """Save a job (in a savepoint); the database's refusal of the change (TR001) becomes
    JobTransitionRefused."""
    with treasury_rules(), transaction.atomic():
        job.save()


def job_fail(job: ConversionJob, reason: str) -> None:
    job.status = JobStatus.FAILED
    job.last_error = reason
    job.finished_at = timezone.now()
    job_save(job)
    transaction.on_commit(metrics.jobs_failed.inc)
    log.error("ALERT treasury: conversion job %s failed: %s", job.pk, reason)


def completion_mismatch(job: ConversionJob, conversion: dict) -> str:
    """Why a completed conversion's amounts cannot be this job's (empty when they can): the
    source must be exactly the job's, the destination in the target currency's scale and within
    CONVERSION_TOLERANCE below 1:1, never above."""
    # A provider's answer may hold anything where an object is due: read as an empty one.
    source, destination = (
        side if isinstance(side, dict) else {}
        for side in (conversion.get("source"), conversion.get("destination"))
    )
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
    with transaction.atomic(durable=True):
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
            job_fail(job, f"the provider failed conversion {job.provider_reference}")
            return job.status
        mismatch = completion_mismatch(job, conversion)
        if mismatch:
            job.status = JobStatus.DISPUTED
            job.last_error = f"completed by the provider but not posted: {mismatch}"
            job.finished_at = timezone.now()
            job_save(job)
            log.error("ALERT treasury: conversion job %s disputed: %s", job.pk, mismatch)
            return job.status
        target_amount = Decimal(conversion["destination"]["amount"])
        # The source buffer's shards (deposits) gathered into its base, which the posting
        # credits (no row goes below 0), with every other account of the posting locked in the
        # same pass, in the one id order (conversions both ways cannot deadlock).
        clearing = [f"conversion_clearing_{c.lower()}" for c in BUFFER_ACCOUNTS]
        system_account_gather(
            code=BUFFER_ACCOUNTS[job.source_currency],
            also=[*BUFFER_ACCOUNTS.values(), *clearing],
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
                    system_account(code=BUFFER_ACCOUNTS[job.source_currency]), job.source_amount
                ),
                Leg.debit(system_account(code=BUFFER_ACCOUNTS[job.target_currency]), target_amount),
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
        job_save(job)
        return job.status


def callback_receive(*, body: bytes, timestamp: str, signature: str) -> str:
    """A provider's signed callback about a conversion: verified (HMAC with DUE_API_SECRET),
    then settled like a poll's answer; duplicates change nothing. What no retry can make
    acceptable (a malformed timestamp or one more than CALLBACK_TOLERANCE_SECONDS from our
    clock, a body that is no conversion, text PostgreSQL cannot store, a `data.id` longer than
    a job can record) is CallbackRejected naming the field; a `data.id` another job holds is
    ProviderReferenceTaken. Nothing is written for any of them."""
    if not settings.DUE_API_SECRET:
        raise CallbackRejected("DUE_API_SECRET is not configured")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= MAX_TIMESTAMP_DIGITS):
        raise CallbackRejected(
            f"X-Due-Timestamp must be Unix seconds (1..{MAX_TIMESTAMP_DIGITS} digits)",
            "X-Due-Timestamp",
        )
    expected = due.signature(settings.DUE_API_SECRET, timestamp, body)
    if not signature or not token_matches(signature, expected):
        raise CallbackRejected("X-Due-Signature does not match the body", "X-Due-Signature")
    try:
        conversion = due.conversion_parse(boundary.json_object(body))
    except InputRefused as exc:
        raise CallbackRejected(f"the body is not a Due conversion: {exc}", exc.field) from None
    except ConversionMalformed as exc:
        raise CallbackRejected(f"the body is not a Due conversion: {exc}", exc.field) from None
    # Its age, once it is known to be Due's (a forgery is told only of its signature) and
    # before anything is read or written; what the body holds is refused alike at any age.
    skew = int(timestamp) - int(time.time())
    if abs(skew) > CALLBACK_TOLERANCE_SECONDS:
        raise CallbackRejected(
            TIMESTAMP_OUTSIDE_WINDOW.format(skew=skew, tolerance=CALLBACK_TOLERANCE_SECONDS),
            "X-Due-Timestamp",
        )
    job = _job_by_reference_adopt(conversion) or (
        ConversionJob.objects.filter(provider_reference=conversion["id"]).first()
    )
    if job is None:
        raise CallbackRejected(f"no job for conversion {conversion['id']}")
    return job_settle(job_id=job.pk, conversion=conversion)


def _job_by_reference_adopt(conversion: dict) -> ConversionJob | None:
    """A signed callback about a conversion we never got the answer for (its submit's answer
    was lost): its `reference` is the job's idempotency key, so the job learns its provider
    reference here and the completion is booked now rather than at the next lookup.
    A conversion id another job already holds is ProviderReferenceTaken (nothing written): one
    conversion cannot be two jobs', and which one Due means is for an operator to find out."""
    try:
        key = uuid.UUID(str(conversion.get("reference") or ""))
    except ValueError:
        return None
    with transaction.atomic(durable=True):
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
        _provider_reference_free(job, conversion["id"])
        job.provider_reference = conversion["id"]
        if job.status == JobStatus.PENDING:
            job.status = JobStatus.SUBMITTED
        job.submitted_at = job.submitted_at or timezone.now()
        try:
            job_save(job)
        except IntegrityError:  # another job recorded the id meanwhile (its unique constraint)
            _provider_reference_free(job, conversion["id"])
            raise
    log.warning(
        "treasury: job %s learnt its reference %s from a callback", job.pk, job.provider_reference
    )
    return job


def _provider_reference_free(job: ConversionJob, conversion_id: str) -> None:
    """ProviderReferenceTaken when a job other than `job` holds `conversion_id`."""
    owner = (
        ConversionJob.objects.filter(provider_reference=conversion_id)
        .exclude(pk=job.pk)
        .values_list("pk", flat=True)
        .first()
    )
    if owner is not None:
        raise ProviderReferenceTaken(
            ID_TAKEN.format(conversion_id=conversion_id, owner=owner, job=job.pk)
        )
