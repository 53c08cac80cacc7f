"""The alarms' metrics published to a moto server over HTTP: the data points read back carry
what the database holds; each minute's counts go once (a second run, a redelivery, a second
publisher); CloudWatch unreachable is logged and its minutes go with the next run; the beat's
entry and a real worker run the task."""

import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from aws.models import CloudWatchPublication
from aws.selectors import MINUTE, minute_start
from aws.services import metrics_publish
from aws.tasks import metrics_publish_task
from config.celery import app
from cutover.balance_path import balance_credit, balance_debit
from cutover.models import Discrepancy, PhaseState
from cutover.reconciliation import reconciliation_run
from ledger.selectors import system_balance
from tests.celery import WORKER_WITH_BEAT, celery_running, wait_for
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.cutover.test_reconciliation import other_connection
from tests.treasury.factories import fund
from treasury.models import ConversionJob, ConversionProvider

BROKER = "redis://127.0.0.1:6379/13"


def datapoints(aws, metric: str, statistic: str) -> dict[datetime, dict]:
    """What CloudWatch holds for `metric`, per minute: {minute: {statistic, SampleCount}}."""
    now = timezone.now()
    answer = aws.cloudwatch.get_metric_statistics(
        Namespace="StackService",
        MetricName=metric,
        StartTime=now - timedelta(hours=10),
        EndTime=now + timedelta(minutes=5),
        Period=60,
        Statistics=[statistic, "SampleCount"],
    )
    return {
        point["Timestamp"]: {statistic: point[statistic], "SampleCount": point["SampleCount"]}
        for point in answer["Datapoints"]
    }


def sums(aws, metric: str) -> dict[datetime, float]:
    return {minute: point["Sum"] for minute, point in datapoints(aws, metric, "Sum").items()}


def published_through(start: datetime) -> None:
    """The minutes before `start` were published by an earlier run."""
    CloudWatchPublication.objects.update_or_create(pk=1, defaults={"counted_until": start})


def job(status: str, finished_at: datetime, buffer_currency: str = "USD") -> ConversionJob:
    return ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency=buffer_currency,
        source_currency="USDC" if buffer_currency == "USD" else "USD",
        source_amount=Decimal("100"),
        target_currency=buffer_currency,
        provider=ConversionProvider.objects.get(code="due"),
        status=status,
        created_by="test",
        finished_at=finished_at,
    )


def discrepancies_at(placed: dict[uuid.UUID, datetime]) -> None:
    """Each user's discrepancy first seen within the given minute."""
    for user, minute in placed.items():
        Discrepancy.objects.filter(user_id=user).update(
            first_seen_at=minute + timedelta(seconds=30)
        )


@pytest.mark.django_db(transaction=True)  # the ledger posts in transactions of its own
def test_data_points_carry_what_the_database_holds(aws):
    start = minute_start(timezone.now()) - 10 * MINUTE
    published_through(start)
    phase_set("shadow")
    PhaseState.objects.update(entered_at=start - timedelta(hours=1))
    fund("usdc_buffer", "1234.5")
    # Ledger writes of the balance path: three posted, one refused by the ledger (a drifted
    # user's debit), which also opens a discrepancy.
    steady = legacy_user("100")
    ledger_balance_set(steady, "100")
    for n in range(3):
        balance_credit(user_id=steady, amount="10", reference=f"ok-{n}", reason="test")
    drifted = legacy_user("100")
    ledger_balance_set(drifted, "30")
    refused = balance_debit(user_id=drifted, amount="50", reference="refused", reason="test")
    assert refused.ledger_status == "failed"
    # Three more found by the reconciliation; one of them in a minute published before.
    differing = []
    for _ in range(3):
        differing.append(legacy_user("70"))
        ledger_balance_set(differing[-1], "7")
    reconciliation_run(triggered_by="test")
    discrepancies_at(
        {
            drifted: start + MINUTE,
            differing[0]: start + MINUTE,
            differing[1]: start + 4 * MINUTE,
            differing[2]: start - 3 * MINUTE,
        }
    )
    job("failed", start + 2 * MINUTE)
    job("failed", start + 4 * MINUTE)
    job("timed_out", start + 4 * MINUTE + timedelta(seconds=59), buffer_currency="USDC")
    job("completed", start + 4 * MINUTE)  # not a failure
    job("failed", start - 2 * MINUTE)  # published before

    out = StringIO()
    call_command("aws", "publish", "--json", stdout=out)
    report = json.loads(out.getvalue())

    until = CloudWatchPublication.objects.get().counted_until
    assert report["counted_from"] == start.isoformat()
    assert report["counted_until"] == until.isoformat()
    assert until >= start + 5 * MINUTE  # every placed minute has settled
    minutes = [start + n * MINUTE for n in range((until - start) // MINUTE)]
    expected_discrepancies = {start + MINUTE: 2, start + 4 * MINUTE: 1}
    expected_failures = {start + 2 * MINUTE: 1, start + 4 * MINUTE: 2}
    assert sums(aws, "discrepancy_count") == {
        minute: expected_discrepancies.get(minute, 0) for minute in minutes
    }
    assert sums(aws, "conversion_jobs_failed") == {
        minute: expected_failures.get(minute, 0) for minute in minutes
    }
    assert Discrepancy.objects.count() == 4

    # The gate's figure: 3 of 4 ledger writes in the phase succeeded.
    (rate,) = datapoints(aws, "write_success_rate", "Average").values()
    assert rate == {"Average": 0.75, "SampleCount": 1}
    (buffer,) = datapoints(aws, "system_buffer_usdc", "Average").values()
    assert buffer["Average"] == float(system_balance(code="usdc_buffer")) == 1234.5

    reported = {}
    for point in report["data_points"]:
        reported.setdefault(point["metric"], {})[datetime.fromisoformat(point["timestamp"])] = (
            point["value"]
        )
    assert reported["discrepancy_count"] == sums(aws, "discrepancy_count")
    assert reported["conversion_jobs_failed"] == sums(aws, "conversion_jobs_failed")
    assert list(reported["write_success_rate"].values()) == [0.75]


@pytest.mark.django_db
def test_a_redelivered_run_sends_no_minute_twice(aws):
    start = minute_start(timezone.now()) - 5 * MINUTE
    published_through(start)
    Discrepancy.objects.create(
        user_id=uuid.uuid4(),
        currency="USDC",
        legacy_balance=Decimal(70),
        ledger_balance=Decimal(7),
        difference=Decimal(63),
        source="reconciliation",
        phase="shadow",
        first_seen_at=start + 2 * MINUTE,
    )

    metrics_publish_task()
    metrics_publish_task()  # Celery's redelivery, or a second beat in the same minute
    out = StringIO()
    call_command("aws", "publish", stdout=out)  # and an operator's, by hand
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("counted ") and lines[0].endswith(" UTC")
    assert "system_buffer_usdc" in {line.split()[0] for line in lines[1:]}

    points = datapoints(aws, "discrepancy_count", "Sum")
    assert {minute: point["SampleCount"] for minute, point in points.items()} == dict.fromkeys(
        points, 1
    )
    assert sums(aws, "discrepancy_count")[start + 2 * MINUTE] == 1
    assert sum(sums(aws, "discrepancy_count").values()) == 1
    # The gauges are sampled again: one more sample of the same Average.
    buffer = datapoints(aws, "system_buffer_usdc", "Average").values()
    assert sum(point["SampleCount"] for point in buffer) == 3
    # In legacy no ledger write happens: the rate is missing, not 0.
    assert datapoints(aws, "write_success_rate", "Average") == {}


@pytest.mark.django_db
def test_cloudwatch_unreachable_is_logged_and_its_minutes_go_next_time(aws, settings, caplog):
    start = minute_start(timezone.now()) - 5 * MINUTE
    published_through(start)
    job("failed", start + MINUTE)
    settings.AWS_ENDPOINT_URL = "http://127.0.0.1:1"

    result = metrics_publish_task()

    assert result["skipped"].startswith("CloudWatch at http://127.0.0.1:1: put ")
    assert "CloudWatch metrics not published, the next run sends them" in caplog.text
    assert CloudWatchPublication.objects.get().counted_until == start
    with pytest.raises(CommandError, match=r"^CloudWatch at http://127\.0\.0\.1:1: put "):
        call_command("aws", "publish")

    settings.AWS_ENDPOINT_URL = aws.endpoint
    metrics_publish_task()
    assert sums(aws, "conversion_jobs_failed")[start + MINUTE] == 1
    assert min(sums(aws, "conversion_jobs_failed")) == start


@pytest.mark.django_db
def test_minutes_older_than_the_backlog_are_dropped(aws):
    start = minute_start(timezone.now()) - 10 * 60 * MINUTE
    published_through(start)
    job("failed", start + MINUTE)  # ten hours ago: past every alarm
    job("failed", minute_start(timezone.now()) - 5 * MINUTE)

    publication = metrics_publish()

    assert publication.counted_from == publication.counted_until - 480 * MINUTE
    assert publication.dropped_minutes == (publication.counted_from - start) // MINUTE
    failures = sums(aws, "conversion_jobs_failed")
    assert len(failures) == 480 and min(failures) == publication.counted_from
    assert sum(failures.values()) == 1


@pytest.mark.django_db(transaction=True)
def test_a_second_publisher_sends_nothing_while_one_runs(aws):
    published_through(minute_start(timezone.now()) - 3 * MINUTE)
    with other_connection() as other, other.transaction():
        other.execute("SELECT 1 FROM aws_cloudwatch_publication FOR UPDATE")
        assert metrics_publish().busy
        assert metrics_publish_task() == {"skipped": "another publication is running"}
        assert aws.cloudwatch.list_metrics()["Metrics"] == []
    assert not metrics_publish().busy
    names = {metric["MetricName"] for metric in aws.cloudwatch.list_metrics()["Metrics"]}
    assert names == {"discrepancy_count", "conversion_jobs_failed", "system_buffer_usdc"}


@pytest.mark.django_db(transaction=True)
def test_beat_schedules_it_every_minute_and_a_worker_publishes(aws, aws_environment):
    entry = settings.CELERY_BEAT_SCHEDULE["aws-metrics-publish"]
    assert entry["task"] == "aws.metrics_publish"
    assert entry["schedule"].minute == set(range(60))  # crontab(minute="*")
    redis.Redis.from_url(BROKER).flushdb()
    environment = {**aws_environment, "CELERY_BROKER_URL": BROKER}
    with celery_running(WORKER_WITH_BEAT, environment=environment):
        # beat writes its schedule into the database, where operators see and pause it
        assert wait_for(lambda: PeriodicTask.objects.filter(name="aws-metrics-publish").exists())
        task = PeriodicTask.objects.get(name="aws-metrics-publish")
        assert (task.task, task.crontab.minute, task.crontab.hour) == (
            "aws.metrics_publish",
            "*",
            "*",
        )
        with app.connection_for_write(BROKER) as connection:
            app.send_task("aws.metrics_publish", connection=connection)
        assert wait_for(
            lambda: CloudWatchPublication.objects.filter(published_at__isnull=False).exists()
        )
    names = {metric["MetricName"] for metric in aws.cloudwatch.list_metrics()["Metrics"]}
    assert "system_buffer_usdc" in names
