"""`manage.py aws provision` against a moto server over HTTP: what the deployment checklist
creates (its own text is the expectation), twice without a difference, an existing secret
never touched, a changed alarm put back with its actions kept, and its errors."""

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from config.env import aws_secret_id
from tests.aws.conftest import checklist_commands
from tests.test_configuration import manage

ALARMS = checklist_commands("cloudwatch put-metric-alarm")
OPERATOR_SECRET = "stored-by-an-operator-before-us"
ACTIONS = ["arn:aws:sns:us-east-1:123456789012:stack-service-pager"]


def pascal(flag: str) -> str:
    return "".join(word.capitalize() for word in flag.split("-"))


@pytest.fixture
def secrets(settings, monkeypatch):
    """Production reads its secrets from stack-service/...; this process holds only
    CIRCLE_API_KEY and CIRCLE_WEBHOOK_SECRET (from its environment, as the settings read it)."""
    monkeypatch.setenv("AWS_SECRETS_PREFIX", "stack-service/")
    settings.AWS_SECRET_IDS = {name: aws_secret_id(name) for name in settings.SECRET_SETTINGS}
    for name in settings.SECRET_SETTINGS:
        setattr(settings, name, "")
    settings.CIRCLE_API_KEY = "k7Qw9zR2xV5mN8pL-circle-key"
    settings.CIRCLE_WEBHOOK_SECRET = "would-overwrite-the-operator's"
    return settings.AWS_SECRET_IDS


def provision(*args: str) -> tuple[dict, CommandError | None]:
    out = StringIO()
    try:
        call_command("aws", "provision", "--json", *args, stdout=out)
    except CommandError as exc:
        return json.loads(out.getvalue()), exc
    return json.loads(out.getvalue()), None


def outcomes(report: dict, kind: str) -> dict[str, str]:
    return {row["name"]: row["outcome"] for row in report["provisioned"] if row["kind"] == kind}


def test_provision_creates_what_the_checklist_creates_and_again_changes_nothing(aws, secrets):
    aws.secretsmanager.create_secret(
        Name="stack-service/circle-webhook-secret", SecretString=OPERATOR_SECRET
    )
    absent = {secrets[name] for name in ("DUE_API_KEY", "DUE_API_SECRET", "ADMIN_TOKEN")}
    absent.add(secrets["METRICS_TOKEN"])

    first, error = provision()
    assert error is not None and error.returncode == 1
    assert str(error).startswith("absent from AWS Secrets Manager: stack-service/due-api-key")
    assert "stack-service/due-api-key (set DUE_API_KEY)" in str(error)
    assert outcomes(first, "secret") == {
        "stack-service/circle-api-key": "created",
        "stack-service/circle-webhook-secret": "exists",
        **dict.fromkeys(absent, "absent"),
    }
    assert first["absent"] == 4
    assert set(outcomes(first, "log_group").values()) == {"created"}
    assert set(outcomes(first, "alarm").values()) == {"created"}

    second, error = provision()
    assert error is not None and error.returncode == 1
    assert outcomes(second, "secret") == {
        "stack-service/circle-api-key": "exists",
        "stack-service/circle-webhook-secret": "exists",
        **dict.fromkeys(absent, "absent"),
    }
    assert set(outcomes(second, "log_group").values()) == {"exists"}
    assert set(outcomes(second, "alarm").values()) == {"unchanged"}

    # The checklist's secrets are among the ones created, with the value the settings hold;
    # the one an operator stored first keeps its value; none is invented for the others.
    checklist_secrets = {
        command["name"] for command in checklist_commands("secretsmanager create-secret")
    }
    assert checklist_secrets == {
        "stack-service/circle-api-key",
        "stack-service/circle-webhook-secret",
    }
    assert checklist_secrets <= set(secrets.values())
    stored = {s["Name"] for s in aws.secretsmanager.list_secrets()["SecretList"]}
    assert stored == checklist_secrets
    value = aws.secretsmanager.get_secret_value
    assert value(SecretId="stack-service/circle-api-key")["SecretString"] == (
        "k7Qw9zR2xV5mN8pL-circle-key"
    )
    assert value(SecretId="stack-service/circle-webhook-secret")["SecretString"] == (
        OPERATOR_SECRET
    )

    groups = aws.logs.describe_log_groups()["logGroups"]
    assert sorted(g["logGroupName"] for g in groups) == sorted(
        command["log-group-name"] for command in checklist_commands("logs create-log-group")
    )

    # Each alarm as the checklist's put-metric-alarm writes it, and nothing it does not say.
    alarms = {a["AlarmName"]: a for a in aws.cloudwatch.describe_alarms()["MetricAlarms"]}
    assert len(ALARMS) == 4
    assert set(alarms) == {command["alarm-name"] for command in ALARMS}
    for command in ALARMS:
        alarm = alarms[command["alarm-name"]]
        for flag, written in command.items():
            actual = alarm[pascal(flag)]
            assert actual == type(actual)(written), (command["alarm-name"], flag)
        assert alarm["Dimensions"] == []
        assert alarm["AlarmActions"] == alarm["OKActions"] == []


def test_a_changed_alarm_is_put_back_keeping_its_actions(aws, settings):
    settings.AWS_SECRET_IDS = {}
    low_buffer = next(a for a in ALARMS if a["alarm-name"] == "low-system-buffer")
    aws.cloudwatch.put_metric_alarm(
        AlarmName="low-system-buffer",
        ComparisonOperator="LessThanThreshold",
        EvaluationPeriods=1,
        MetricName="system_buffer_usdc",
        Namespace="StackService",
        Period=60,
        Statistic="Average",
        Threshold=1000.0,  # lowered by hand
        AlarmActions=ACTIONS,
    )
    out = StringIO()
    call_command("aws", "provision", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "secrets: none (AWS_SECRETS_PREFIX is not set)"
    assert "alarm  low-system-buffer  updated" in lines
    assert "alarm  ledger-write-failures  created" in lines
    (alarm,) = aws.cloudwatch.describe_alarms(AlarmNames=["low-system-buffer"])["MetricAlarms"]
    assert alarm["Threshold"] == float(low_buffer["threshold"])
    assert alarm["AlarmActions"] == ACTIONS
    assert aws.secretsmanager.list_secrets()["SecretList"] == []


def test_an_unreachable_endpoint_is_a_command_error_naming_it(aws, settings, secrets):
    settings.AWS_ENDPOINT_URL = "http://127.0.0.1:1"
    with pytest.raises(CommandError, match=r"AWS Secrets Manager at http://127\.0\.0\.1:1: "):
        call_command("aws", "provision")
    settings.AWS_SECRET_IDS = {}
    with pytest.raises(CommandError, match=r"CloudWatch Logs at http://127\.0\.0\.1:1: create"):
        call_command("aws", "provision", "--json")
    with pytest.raises(CommandError, match="unrecognized arguments: --force"):
        call_command("aws", "provision", "--force")
    with pytest.raises(CommandError, match="invalid choice: 'create'"):
        call_command("aws", "create")


def test_the_command_line_names_the_endpoint_without_a_traceback(aws_environment):
    result = manage(
        "aws",
        "provision",
        **{**aws_environment, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_SECRETS_PREFIX": ""},
    )
    assert result.returncode == 1
    assert result.stderr.startswith(
        "CommandError: CloudWatch Logs at http://127.0.0.1:1: create log group "
    )
    assert "Traceback" not in result.stderr
