"""The treasury's records: conversion providers, buffer thresholds, conversion jobs (the outbox
of the provider calls) and settlement cycles.

What PostgreSQL holds: min <= target <= max per currency; at most one open job per buffer
currency (pending, submitted or timed out: a job whose fate the provider has not told is open);
one job per idempotency key and per provider reference; the jobs' legal state transitions
(treasury/sql/treasury.sql).
"""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now


class ConversionProvider(models.Model):
    """Who converts between fiat and USDC for us; the healthy enabled one of lowest priority
    number gets the next job."""

    code = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=100)
    # Every provider speaks Due's wire format (the one client we have); where its API is comes
    # from the settings by `code` (treasury.due.provider_base_urls), never from this table.
    enabled = models.BooleanField(default=True)
    priority = models.PositiveIntegerField(default=100)
    healthy = models.BooleanField(default=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    last_failure_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "treasury_providers"
        ordering = ["priority", "code"]

    def __str__(self) -> str:
        return self.name


class BufferThreshold(models.Model):
    """The band a system buffer is kept in: below `minimum` the cycle converts up to `target`,
    above `maximum` it converts the excess down to `target`."""

    currency = models.CharField(max_length=8, unique=True)
    minimum = models.DecimalField(max_digits=38, decimal_places=6)
    target = models.DecimalField(max_digits=38, decimal_places=6)
    maximum = models.DecimalField(max_digits=38, decimal_places=6)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "treasury_buffer_thresholds"
        constraints = [
            models.CheckConstraint(
                condition=Q(minimum__gte=0)
                & Q(minimum__lte=models.F("target"))
                & Q(target__lte=models.F("maximum")),
                name="treasury_buffer_thresholds_chk_band",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.currency} {self.minimum} / {self.target} / {self.maximum}"


class JobStatus(models.TextChoices):
    PENDING = "pending", "Pending (to be submitted)"
    SUBMITTED = "submitted", "Submitted to the provider"
    COMPLETED = "completed", "Completed (posted to the ledger)"
    FAILED = "failed", "Failed (the provider said so, or never received it)"
    TIMED_OUT = "timed_out", "Timed out (fate unknown: still asked until the provider answers)"
    CANCELLED = "cancelled", "Cancelled"
    DISPUTED = "disputed", "Disputed (the provider's amounts do not match: for an operator)"
    REVERSED = "reversed", "Reversed (the provider refunded it; an operator reversed the posting)"


# Open: the provider's final answer is still awaited; the job holds its buffer's slot.
OPEN_STATUSES = [JobStatus.PENDING, JobStatus.SUBMITTED, JobStatus.TIMED_OUT]
# What the settlement cycle counts as already taken from a source buffer: open jobs, and
# disputed ones (the provider converted something the ledger does not show yet).
RESERVING_STATUSES = [*OPEN_STATUSES, JobStatus.DISPUTED]


class ConversionJob(models.Model):
    """One conversion between the fiat and the USDC buffer, and the outbox row of its provider
    call: created with its idempotency key in the cycle's transaction, submitted by the worker
    (a resend after any crash sends the same key), posted to the ledger once when completed."""

    idempotency_key = models.UUIDField(unique=True)
    buffer_currency = models.CharField(max_length=8)  # the buffer this job corrects
    source_currency = models.CharField(max_length=8)
    source_amount = models.DecimalField(max_digits=38, decimal_places=6)
    target_currency = models.CharField(max_length=8)
    target_amount = models.DecimalField(max_digits=38, decimal_places=6, null=True, blank=True)
    provider = models.ForeignKey(ConversionProvider, on_delete=models.PROTECT)
    provider_reference = models.CharField(max_length=64, null=True, blank=True, unique=True)
    status = models.CharField(max_length=12, choices=JobStatus.choices, default=JobStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(db_default=Now())
    last_error = models.TextField(blank=True, default="")
    # Due's own status of the job's transfer as last read, and what Due says funds it (kept as
    # Due gave it): what an operator sends while the treasury does not fund transfers itself.
    provider_status = models.CharField(max_length=64, blank=True, default="", db_default="")
    # When the monitor last asked the provider about a completed job (a refund after it
    # completed: treasury.monitor, TREASURY_REFUND_WATCH).
    provider_checked_at = models.DateTimeField(null=True, blank=True)
    funding = models.JSONField(null=True, blank=True)
    ledger_transaction_id = models.BigIntegerField(null=True, blank=True)
    reversal_transaction_id = models.BigIntegerField(null=True, blank=True)
    created_by = models.CharField(max_length=150)
    created_at = models.DateTimeField(db_default=Now())
    submitted_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "treasury_conversion_jobs"
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=JobStatus.values), name="treasury_jobs_chk_status"
            ),
            models.CheckConstraint(
                condition=Q(source_amount__gt=0), name="treasury_jobs_chk_amount"
            ),
            models.CheckConstraint(
                condition=~Q(source_currency=models.F("target_currency")),
                name="treasury_jobs_chk_currencies",
            ),
            models.UniqueConstraint(
                fields=["buffer_currency"],
                condition=Q(status__in=OPEN_STATUSES),
                name="treasury_jobs_one_open_per_buffer",
            ),
        ]

    def __str__(self) -> str:
        return (
            f"job {self.pk} {self.source_amount} {self.source_currency} -> "
            f"{self.target_currency} ({self.status})"
        )


class SettlementCycle(models.Model):
    """One settlement cycle, as it ran (under the advisory lock): its evidence."""

    triggered_by = models.CharField(max_length=150)
    started_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    buffers = models.JSONField(default=list)  # what each buffer was and what was decided
    note = models.CharField(max_length=200, blank=True, default="")  # why it created nothing
    jobs_created = models.PositiveIntegerField(default=0)

    class Meta:
        db_table = "treasury_settlement_cycles"

    def __str__(self) -> str:
        return f"cycle {self.pk} ({self.triggered_by})"
