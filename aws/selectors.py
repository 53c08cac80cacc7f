"""What the CloudWatch metrics of seed 001's alarms say, read from the database (so every
worker publishes the same figures, and a restart resets nothing).

- `discrepancy_count`, one data point per minute: the discrepancies between the legacy store
  and the ledger first seen in that minute (a new `cutover_discrepancies` row: a user's stores
  found differing, by a dual write or the reconciliation, while none was open for them; a
  later sighting of an open one is not new). Its alarm's Sum over 300 s > 10 is more than 10
  new discrepancies in 5 minutes, the checklist's "high discrepancy rate".
- `conversion_jobs_failed`, one data point per minute: the conversion jobs that failed or timed
  out in that minute (as the `conversion_jobs_failed` counter of /metrics counts them). Its
  alarm's Sum over 300 s > 5 is more than 5 in 5 minutes.
- `write_success_rate`, at each publication: the figure the gate out of shadow reads, the share
  (0 to 1, as the alarm's 0.99) of the balance path's ledger writes that succeeded since the
  current phase began (`cutover.selectors.ledger_write_stats`). None while there were none (in
  legacy, or a phase just entered): no data point, so the alarm sees missing data, not a
  failure.
- `system_buffer_usdc`, at each publication: the ledger balance of the system USDC buffer."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db.models import Count, QuerySet
from django.db.models.functions import TruncMinute

from aws.checklist import (
    CONVERSION_JOBS_FAILED,
    DISCREPANCY_COUNT,
    SYSTEM_BUFFER_USDC,
    WRITE_SUCCESS_RATE,
)
from cutover.models import Discrepancy
from cutover.selectors import ledger_write_stats, phase_state
from ledger.selectors import USDC_BUFFER, system_balance
from treasury.models import ConversionJob, JobStatus

MINUTE = timedelta(minutes=1)
# What conversion_jobs_failed counts: a job the provider failed or never received, and one
# whose fate it did not tell within TREASURY_CONVERSION_TIMEOUT.
FAILED_JOB_STATUSES = (JobStatus.FAILED, JobStatus.TIMED_OUT)


@dataclass(frozen=True)
class DataPoint:
    metric: str
    timestamp: datetime
    value: float
    unit: str  # CloudWatch's: Count for the counts, None for a rate or an amount


def minute_start(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _per_minute(rows: QuerySet, field: str, since: datetime, until: datetime) -> dict:
    counted = (
        rows.filter(**{f"{field}__gte": since, f"{field}__lt": until})
        .annotate(minute=TruncMinute(field, tzinfo=UTC))
        .values("minute")
        .annotate(count=Count("id"))
    )
    return {row["minute"]: row["count"] for row in counted}


def discrepancies_first_seen_per_minute(*, since: datetime, until: datetime) -> dict:
    """{minute: discrepancies first seen in it} for the minutes from `since` to `until`."""
    return _per_minute(Discrepancy.objects.all(), "first_seen_at", since, until)


def conversion_jobs_failed_per_minute(*, since: datetime, until: datetime) -> dict:
    """{minute: conversion jobs failed or timed out in it} for the minutes from `since` to
    `until` (a job's `finished_at` is when it failed or timed out)."""
    jobs = ConversionJob.objects.filter(status__in=FAILED_JOB_STATUSES)
    return _per_minute(jobs, "finished_at", since, until)


def cloudwatch_data_points(*, since: datetime, until: datetime, at: datetime) -> list[DataPoint]:
    """The counts of every minute from `since` to `until` (whole minutes; 0 included, so an
    alarm sees a quiet minute as 0), and the rate and the buffer now, stamped `at`."""
    minutes = [since + n * MINUTE for n in range((until - since) // MINUTE)]
    points = []
    for metric, counts in (
        (DISCREPANCY_COUNT, discrepancies_first_seen_per_minute(since=since, until=until)),
        (CONVERSION_JOBS_FAILED, conversion_jobs_failed_per_minute(since=since, until=until)),
    ):
        points += [DataPoint(metric, m, float(counts.get(m, 0)), "Count") for m in minutes]
    rate = ledger_write_stats(phase_state().entered_at)["success_rate"]
    if rate is not None:
        points.append(DataPoint(WRITE_SUCCESS_RATE, at, float(rate), "None"))
    buffer = system_balance(code=USDC_BUFFER)
    points.append(DataPoint(SYSTEM_BUFFER_USDC, at, float(buffer), "None"))
    return points
