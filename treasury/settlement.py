"""Settling a job with what the provider says of its conversion, from a poll or its signed
callback: a completion posts the conversion to the ledger exactly once (fiat buffer <-> USDC
buffer through the conversion clearing accounts); a completion whose amounts do not match the
job is not posted (the job is `disputed`, with an ALERT, for an operator); a failure fails the
job. This runs under the kill switch too: it records money that already moved."""

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from cutover.locks import CONVERSION_ASK_LOCK
from gateway import boundary
from gateway.boundary import printable_ascii
from gateway.exceptions import InputRefused
from ledger.exceptions import InsufficientFunds, InvalidAmount
from ledger.models import Side
from ledger.money import amount_parse
from ledger.selectors import BUFFER_ACCOUNTS, system_account, system_balance
from ledger.services import Leg, system_account_gather, transaction_apply
from treasury import due, metrics
from treasury.exceptions import (
    CallbackRejected,
    ConversionNotReversible,
    DueRefused,
    DueUnavailable,
    treasury_rules,
)
from treasury.models import ConversionJob, JobStatus
from treasury.selectors import withdrawals_held

log = logging.getLogger(__name__)
WEBHOOK_TRANSFER = "transfer.status_changed"  # Due's one event about a transfer
_OTHER_SIDE = {Side.DEBIT: Side.CREDIT, Side.CREDIT: Side.DEBIT}


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


def completion_mismatch(
    job: ConversionJob, conversion: dict, tolerance: Decimal | None = None
) -> str:
    """Why a completed conversion's amounts cannot be this job's (empty when they can): the
    source must be exactly the job's, the destination in the target currency's scale and within
    `tolerance` (TREASURY_CONVERSION_TOLERANCE unless given) below 1:1 (the provider's fee or
    spread; the sandbox takes none), never above, and paid to our recipient when the transfer
    names one: anything else is a provider error or a different conversion."""
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
    if tolerance is None:
        tolerance = settings.TREASURY_CONVERSION_TOLERANCE
    floor = job.source_amount * (1 - tolerance)
    if not floor <= target_amount <= job.source_amount:
        return (
            f"destination amount {target_amount} is outside [{floor}, {job.source_amount}] "
            f"(1:1 less at most {tolerance:%}, TREASURY_CONVERSION_TOLERANCE)"
        )
    paid_to = destination.get("id")  # (Due's transfer names the recipient it paid)
    ours = settings.DUE_RECIPIENTS.get(job.target_currency, "")
    if paid_to is not None and paid_to != ours:
        return f"paid to recipient {paid_to!r}, not ours ({ours or 'none configured'})"
    return ""


def _conversion_legs(job: ConversionJob, target_amount: Decimal) -> list[Leg]:
    """A job's conversion: the source buffer gives the source amount to its conversion
    clearing account, the target's clearing account gives the target buffer what arrived."""
    source, target = job.source_currency, job.target_currency
    return [
        Leg.debit(system_account(code=f"conversion_clearing_{source.lower()}"), job.source_amount),
        Leg.credit(system_account(code=BUFFER_ACCOUNTS[source]), job.source_amount),
        Leg.debit(system_account(code=BUFFER_ACCOUNTS[target]), target_amount),
        Leg.credit(system_account(code=f"conversion_clearing_{target.lower()}"), target_amount),
    ]


def job_settle(*, job_id: int, conversion: dict) -> str:
    """Bring a job to what the provider says of its conversion, exactly once, in any phase and
    under the kill switch (a fact about money that already moved): a completion whose amounts
    match the job posts it to the ledger (reference `conversion:<idempotency key>`), one that
    does not marks the job disputed (nothing posted, ALERT); a failure marks it failed;
    anything else records only Due's own status of the transfer (`provider_status`). Of a
    final job only Due's status is recorded, with an ALERT when it contradicts the job
    (_final_job_told)."""
    with transaction.atomic(durable=True):
        job = ConversionJob.objects.select_for_update().select_related("provider").get(pk=job_id)
        status = conversion.get("status")
        due_status = conversion.get("due_status", "")
        if job.status not in (JobStatus.SUBMITTED, JobStatus.TIMED_OUT):
            _final_job_told(job, status, due_status)
            return job.status
        if status in ("pending", "processing"):
            if due_status and due_status != job.provider_status:
                job.provider_status = due_status  # what an operator sees: awaiting funds...
                job_save(job)
            return job.status
        job.provider_status = due_status or job.provider_status
        if status == "failed":
            job_fail(
                job,
                f"the provider's transfer {job.provider_reference} is "
                f"{conversion.get('due_status', status)}",
            )
            return job.status
        mismatch = completion_mismatch(job, conversion)
        if mismatch:
            job.status = JobStatus.DISPUTED
            job.last_error = f"completed by the provider but not posted: {mismatch}"
            job.finished_at = timezone.now()
            job_save(job)
            log.error("ALERT treasury: conversion job %s disputed: %s", job.pk, mismatch)
            return job.status
        if job.status == JobStatus.TIMED_OUT:
            log.warning("treasury: job %s completed after its timeout; posted now", job.pk)
        conversion_book(job, Decimal(conversion["destination"]["amount"]))
        return job.status


def _buffer_gather(currency: str) -> None:
    """The `currency` buffer's shards (deposits) gathered into its base, which a conversion
    posting credits (no row goes below 0), with every other account of the posting locked in
    the same pass, in the one id order (conversions and reversals cannot deadlock)."""
    clearing = [f"conversion_clearing_{c.lower()}" for c in BUFFER_ACCOUNTS]
    system_account_gather(
        code=BUFFER_ACCOUNTS[currency], also=[*BUFFER_ACCOUNTS.values(), *clearing]
    )


def conversion_book(job: ConversionJob, target_amount: Decimal) -> None:
    """Post a locked job's conversion (reference `conversion:<idempotency key>`: once) and
    mark it completed, in the caller's transaction."""
    _buffer_gather(job.source_currency)
    posting = transaction_apply(
        namespace="treasury",
        reference_id=f"conversion:{job.idempotency_key}",
        kind="conversion",
        legs=_conversion_legs(job, target_amount),
        metadata={
            "job": job.pk,
            "provider": job.provider.code,
            "reference": job.provider_reference,
        },
    )
    job.status = JobStatus.COMPLETED
    job.provider_checked_at = timezone.now()  # (asked now: the refund watch's clock starts)
    job.target_amount = target_amount
    job.ledger_transaction_id = posting.transaction_id
    job.finished_at = timezone.now()
    job_save(job)


# What a provider may still say of a final job's transfer without contradicting it.
CONSISTENT = {
    JobStatus.COMPLETED: {"completed"},
    JobStatus.DISPUTED: {"completed"},
    JobStatus.FAILED: {"failed"},
    JobStatus.CANCELLED: set(),  # never sent: the provider has no such transfer
    JobStatus.REVERSED: {"failed"},  # refunded: Due's `refund_processed`
}


def _final_job_told(job: ConversionJob, status: str, due_status: str) -> None:
    """What the provider says of a final job's transfer is kept (`provider_status`) and, when it
    contradicts the job (a completed conversion refunded, a failed one processed after all),
    alerted, once per status: nothing is booked or reversed on it (job_reverse is an
    operator's, once the money is seen back)."""
    if due_status and due_status == job.provider_status:
        return  # a redelivery, or Due's status again: told before
    if due_status:
        job.provider_status = due_status
        job_save(job)
    if job.status in CONSISTENT and status not in CONSISTENT[job.status]:
        transaction.on_commit(metrics.jobs_contradicted.labels(status=job.status).inc)
        hint = {
            JobStatus.COMPLETED: "when its source money is back, reverse the job (admin: "
            "Conversion jobs, Reverse)",
            JobStatus.REVERSED: "the ledger has it reversed: find where the money is",
        }.get(job.status, "nothing was booked on it: find where the money is")
        log.error(
            "ALERT treasury: job %s is %s but the provider now says its transfer %s is %s: %s",
            job.pk,
            job.status,
            job.provider_reference,
            due_status or status,
            hint,
        )


def conversion_reversal_post(job: ConversionJob) -> int:
    """Post the mirror image of a completed job's conversion (reference
    `conversion-reversal:<idempotency key>`), in the caller's transaction: the source money back
    in its buffer, the target money out of its buffer. ConversionNotReversible when the target
    buffer no longer holds it. The ledger transaction's id."""
    _buffer_gather(job.target_currency)
    held = withdrawals_held(job.target_currency)  # (committed to users' withdrawals)
    if held and system_balance(code=BUFFER_ACCOUNTS[job.target_currency]) - held < (
        job.target_amount
    ):
        raise ConversionNotReversible(
            f"the {job.target_currency} buffer holds {held} for withdrawals not yet settled; "
            f"less than the {job.target_amount} {job.target_currency} the conversion brought is "
            "left beside them: fund the buffer first"
        )
    legs = _conversion_legs(job, job.target_amount)
    try:
        posting = transaction_apply(
            namespace="treasury",
            reference_id=f"conversion-reversal:{job.idempotency_key}",
            kind="conversion_reversal",
            legs=[
                Leg(leg.account_id, _OTHER_SIDE[leg.side], leg.amount, leg.currency) for leg in legs
            ],
            metadata={"job": job.pk, "reverses": job.ledger_transaction_id},
        )
    except InsufficientFunds:
        raise ConversionNotReversible(
            f"the {job.target_currency} buffer holds less than the {job.target_amount} "
            f"{job.target_currency} the conversion brought: its money was used since; fund the "
            "buffer first"
        ) from None
    return posting.transaction_id


@contextmanager
def job_asked(job_id: int) -> Iterator[None]:
    """One asker of the provider about a job at a time (session-level: the ask is HTTP, outside
    any transaction)."""
    key = [CONVERSION_ASK_LOCK, str(job_id)]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", key)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)


def job_ask_settle(*, job: ConversionJob, base_urls: Mapping[str, str]) -> tuple[str, dict]:
    """Ask the provider about a job's transfer (`GET /v1/transfers/{id}`) and settle the job
    with the answer (job_settle), one asker at a time per job: concurrent webhooks and polls
    apply the provider's answers in the order they were read (found from outside: an answer
    read first and applied last put a refund back to `refund_submitted`). The job's status and
    the answer; the provider's errors (DueUnavailable, DueRefused, ProviderNotConfigured,
    ConversionMalformed) and the ledger's are raised."""
    with job_asked(job.pk):
        conversion = job_transfer_get(job, base_urls)
        return job_settle(job_id=job.pk, conversion=conversion), conversion


def job_transfer_get(job: ConversionJob, base_urls: Mapping[str, str]) -> dict:
    """What the job's provider says of its transfer now (treasury.due.conversion_get)."""
    return due.conversion_get(
        base_url=due.provider_base_url(job.provider.code, base_urls),
        conversion_id=job.provider_reference,
    )


def callback_receive(*, body: bytes, signature: str) -> str:
    """Due's webhook (its documented form: `{"id", "type", "data", "occurredAt",
    "attemptedAt"}`, Ed25519 over the raw body, hex in X-Webhook-Signature, verified with
    DUE_WEBHOOK_PUBLIC_KEY). A `transfer.status_changed` about a job's transfer settles the job
    with what Due says of the transfer *now* (`GET /v1/transfers/{id}`, as Due advises): Due
    signs no time, so a captured delivery verifies forever and its copy of the transfer is never
    acted on. Any other event, or a transfer no job holds, changes nothing ("ignored"). A bad
    signature or a body that is no event is CallbackRejected naming the field; nothing is
    written. DueUnavailable when the key is not configured or Due cannot be asked now."""
    if not settings.DUE_WEBHOOK_PUBLIC_KEY:
        raise DueUnavailable("DUE_WEBHOOK_PUBLIC_KEY is not configured")
    key = load_pem_public_key(settings.DUE_WEBHOOK_PUBLIC_KEY.encode())
    try:
        key.verify(bytes.fromhex(signature), body)
    except (ValueError, InvalidSignature):
        raise CallbackRejected(
            "X-Webhook-Signature is not Due's signature of the body (hex Ed25519)",
            "X-Webhook-Signature",
        ) from None
    try:
        event = boundary.json_object(body)
    except InputRefused as exc:
        raise CallbackRejected(f"the body is not a Due event: {exc}", exc.field) from None
    kind = event.get("type")
    if not isinstance(kind, str):
        raise CallbackRejected("type is not an event type", "type")
    if kind != WEBHOOK_TRANSFER:
        log.info("treasury: Due's %s event %s ignored", kind, event.get("id"))
        return "ignored"
    data = event.get("data")
    transfer_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(transfer_id, str) or not printable_ascii(
        transfer_id, max_length=due.PROVIDER_REFERENCE_MAX
    ):
        raise CallbackRejected(
            f"data.id is not 1..{due.PROVIDER_REFERENCE_MAX} printable ASCII characters: no "
            "transfer id we can record",
            "data.id",
        )
    job = (
        ConversionJob.objects.select_related("provider")
        .filter(provider_reference=transfer_id)
        .first()
    )
    if job is None:  # not ours, or a job whose answer was lost (its look-up by key finds it)
        log.warning("treasury: Due's event about transfer %s, which no job holds", transfer_id)
        return "ignored"
    try:
        return job_ask_settle(job=job, base_urls=due.provider_base_urls())[0]
    except DueRefused as exc:  # Due refusing to show a transfer it told us of: ask again later
        raise DueUnavailable(str(exc)) from None
