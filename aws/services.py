"""AWS as seed 001's checklist provisions it, and the metrics its alarms read.

- `aws_provision`: the secrets the settings read from AWS Secrets Manager (created only when
  absent, and only from the value the settings hold, i.e. the variable of the same name: an
  existing secret is never touched, and none is invented), the three log groups and the four
  alarms. Idempotent: a second run finds everything as the first left it.
- `metrics_publish`: the alarms' metrics to CloudWatch (what each value is: aws/selectors.py),
  every minute's count once, whatever runs it and however often.

Endpoint and region come from the settings (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), credentials
from boto3's usual chain."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoRegionError
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from aws.checklist import ALARMS, LOG_GROUPS, NAMESPACE
from aws.exceptions import AwsRefused, AwsUnavailable
from aws.models import CloudWatchPublication
from aws.selectors import MINUTE, DataPoint, cloudwatch_data_points, minute_start

SERVICE_NAMES = {
    "cloudwatch": "CloudWatch",
    "logs": "CloudWatch Logs",
    "secretsmanager": "AWS Secrets Manager",
}
# A call that hangs would hold the publisher's row and the next minute's run: short timeouts,
# one retry (the next minute is the next attempt).
CLIENT_CONFIG = Config(
    connect_timeout=5, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 2}
)
# A minute is counted once the transactions that write into it have committed: a row is
# stamped when its transaction begins (or its job is decided), so each minute waits one more.
SETTLE = MINUTE
# One PutMetricData request takes at most 1,000 data points: 480 minutes of both counts and
# the two gauges. Older minutes not yet sent (CloudWatch unreachable for 8 hours) are past every
# alarm's evaluation and are dropped, logged.
BACKLOG = timedelta(minutes=480)
# What an alarm compares; anything else on it (its actions, who is told) is the operator's.
ALARM_FIELDS = (
    "Namespace",
    "MetricName",
    "Statistic",
    "Period",
    "EvaluationPeriods",
    "Threshold",
    "ComparisonOperator",
)
KEPT_ALARM_FIELDS = ("AlarmActions", "OKActions", "InsufficientDataActions", "ActionsEnabled")


def aws_client(service: str):
    """A boto3 client of `service` at the settings' endpoint and region."""
    name = SERVICE_NAMES[service]
    try:
        return boto3.client(
            service,
            endpoint_url=settings.AWS_ENDPOINT_URL,
            region_name=settings.AWS_DEFAULT_REGION,
            config=CLIENT_CONFIG,
        )
    except NoRegionError:
        raise AwsUnavailable(f"{name}: no region (set AWS_DEFAULT_REGION)") from None
    except BotoCoreError as exc:
        raise AwsUnavailable(f"{name}: {exc}") from None


@contextmanager
def _calling(client, what: str) -> Iterator[None]:
    """botocore's errors as ours, naming the service, the endpoint and what was asked."""
    where = f"{SERVICE_NAMES[client.meta.service_model.service_name]} at "
    where += client.meta.endpoint_url
    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise AwsRefused(f"{where}: {what}: {exc}", code) from None
    except BotoCoreError as exc:
        raise AwsUnavailable(f"{where}: {what}: {exc}") from None


# --- provisioning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    kind: str  # secret | log_group | alarm
    name: str
    outcome: str  # created | exists | absent (a secret) | updated | unchanged (an alarm)
    variable: str = ""  # a secret's setting, whose value creates it when absent


def secrets_provision(
    *, secretsmanager, secret_ids: Mapping[str, str], values: Mapping[str, str]
) -> list[Provisioned]:
    """Each secret (`{setting: secret id}`) that AWS Secrets Manager lacks, created with the
    setting's value when it has one; absent otherwise. An existing secret is left as it is."""
    provisioned = []
    for variable, secret_id in secret_ids.items():
        if _secret_exists(secretsmanager, secret_id):
            outcome = "exists"
        elif not values.get(variable):
            outcome = "absent"
        else:
            outcome = _secret_create(secretsmanager, secret_id, values[variable])
        provisioned.append(Provisioned("secret", secret_id, outcome, variable))
    return provisioned


def _secret_exists(secretsmanager, secret_id: str) -> bool:
    try:
        with _calling(secretsmanager, f"describe {secret_id}"):
            secretsmanager.describe_secret(SecretId=secret_id)
    except AwsRefused as exc:
        if exc.code == "ResourceNotFoundException":
            return False
        raise
    return True


def _secret_create(secretsmanager, secret_id: str, value: str) -> str:
    try:
        with _calling(secretsmanager, f"create {secret_id}"):
            secretsmanager.create_secret(Name=secret_id, SecretString=value)
    except AwsRefused as exc:
        if exc.code == "ResourceExistsException":
            return "exists"  # created meanwhile by someone else: theirs stands
        raise
    return "created"


def log_groups_provision(*, logs) -> list[Provisioned]:
    """The checklist's log groups, created when absent."""
    provisioned = []
    for name in LOG_GROUPS:
        outcome = "created"
        try:
            with _calling(logs, f"create log group {name}"):
                logs.create_log_group(logGroupName=name)
        except AwsRefused as exc:
            if exc.code != "ResourceAlreadyExistsException":
                raise
            outcome = "exists"
        provisioned.append(Provisioned("log_group", name, outcome))
    return provisioned


def alarms_provision(*, cloudwatch) -> list[Provisioned]:
    """The checklist's alarms with its parameters: created when absent, put back when one
    differs (keeping the actions an operator attached), untouched when it agrees."""
    names = [alarm["AlarmName"] for alarm in ALARMS]
    with _calling(cloudwatch, "describe alarms"):
        found = cloudwatch.describe_alarms(AlarmNames=names, AlarmTypes=["MetricAlarm"])
    existing = {alarm["AlarmName"]: alarm for alarm in found["MetricAlarms"]}
    provisioned = []
    for alarm in ALARMS:
        current = existing.get(alarm["AlarmName"])
        if current is None:
            outcome, kept = "created", {}
        elif _agrees(current, alarm):
            provisioned.append(Provisioned("alarm", alarm["AlarmName"], "unchanged"))
            continue
        else:
            outcome = "updated"
            kept = {key: current[key] for key in KEPT_ALARM_FIELDS if key in current}
        with _calling(cloudwatch, f"put alarm {alarm['AlarmName']}"):
            cloudwatch.put_metric_alarm(**alarm, **kept)
        provisioned.append(Provisioned("alarm", alarm["AlarmName"], outcome))
    return provisioned


def _agrees(current: dict, alarm: dict) -> bool:
    return not current.get("Dimensions") and all(
        current.get(key) == alarm[key] for key in ALARM_FIELDS
    )


def aws_provision() -> list[Provisioned]:
    """Secrets, log groups and alarms, in the checklist's order."""
    return [
        *secrets_provision(
            secretsmanager=aws_client("secretsmanager"),
            secret_ids=settings.AWS_SECRET_IDS,
            values={name: getattr(settings, name) for name in settings.AWS_SECRET_IDS},
        ),
        *log_groups_provision(logs=aws_client("logs")),
        *alarms_provision(cloudwatch=aws_client("cloudwatch")),
    ]


# --- publishing ---------------------------------------------------------------------------------


@dataclass
class Publication:
    busy: bool = False  # another publisher held the record: this one sent nothing
    counted_from: datetime | None = None
    counted_until: datetime | None = None
    dropped_minutes: int = 0  # older than BACKLOG, never sent
    data_points: list[DataPoint] = field(default_factory=list)


@transaction.atomic(durable=True)
def metrics_publish() -> Publication:
    """Send CloudWatch the counts of every settled minute not sent yet, and the gauges now.

    The publication record is locked for the whole of it (SKIP LOCKED: a concurrent publisher
    sends nothing) and advanced in the same transaction once CloudWatch has taken the data, so
    a run that fails sends its minutes with the next run, and a run redelivered or repeated in
    the same minute finds no minute left (its gauges are one more sample of the same `Average`).
    """
    cloudwatch = aws_client("cloudwatch")
    CloudWatchPublication.objects.get_or_create(pk=1)
    record = CloudWatchPublication.objects.select_for_update(skip_locked=True).filter(pk=1)
    record = record.first()
    if record is None:
        return Publication(busy=True)
    now = timezone.now()
    until = minute_start(now - SETTLE)
    since = record.counted_until or until - MINUTE
    publication = Publication(counted_from=max(since, until - BACKLOG), counted_until=until)
    if since < publication.counted_from:
        publication.dropped_minutes = (publication.counted_from - since) // MINUTE
    publication.data_points = cloudwatch_data_points(
        since=publication.counted_from, until=until, at=now
    )
    with _calling(cloudwatch, f"put {len(publication.data_points)} data points"):
        cloudwatch.put_metric_data(
            Namespace=NAMESPACE,
            MetricData=[
                {
                    "MetricName": point.metric,
                    "Timestamp": point.timestamp,
                    "Value": point.value,
                    "Unit": point.unit,
                }
                for point in publication.data_points
            ],
        )
    record.counted_until = max(until, since)
    record.published_at = now
    record.save()
    return publication
