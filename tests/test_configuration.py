"""Settings are validated at start: a bad value stops the process with a message naming it."""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from config.env import env_duration
from tests.treasury.factories import webhook_public_key

ROOT = Path(__file__).resolve().parent.parent


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


EC_PUBLIC_KEY = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TREASURY_SCHEDULER_INTERVAL", "5 minutes"),
        ("ONCHAIN_DEPOSIT_POLL_INTERVAL", "0s"),
        ("CUTOVER_LEGACY_ARCHIVE_AFTER", "90 days"),
        ("ONCHAIN_BUFFER_ALERT_THRESHOLD", "lots"),
        ("TREASURY_CONVERSION_TOLERANCE", "1%"),
        ("TREASURY_CONVERSION_TOLERANCE", "-0.01"),
        ("TREASURY_CONVERSION_TOLERANCE", "0.5"),  # no fee takes half
        ("TREASURY_CONVERSION_TOLERANCE", "NaN"),
        ("LEDGER_SHADOW_MODE", "maybe"),
        ("BALANCE_SOURCE", "both"),
        ("DATABASE_URL", "mysql://localhost/x"),
        ("CELERY_BROKER_URL", "localhost:6379"),
        ("AWS_ENDPOINT_URL", "localhost:4566"),
        ("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/metrics"),
        ("PROMETHEUS_MULTIPROC_DIR", ""),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("DJANGO_STATIC_ROOT", "staticfiles"),
        ("DJANGO_STATIC_ROOT", ""),
        ("DUE_WEBHOOK_PUBLIC_KEY", "not a key"),
        ("DUE_WEBHOOK_PUBLIC_KEY", EC_PUBLIC_KEY),  # a key, but not Due's kind (Ed25519)
    ],
)
def test_malformed_variable_stops_the_process_naming_it(variable, value):
    result = manage("check", **{variable: value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"configuration error: {variable}:")
    assert "Traceback" not in result.stderr


def test_due_s_webhook_key_is_read_as_due_gives_it_or_on_one_line():
    """The PEM Due's `POST /v1/webhook_endpoints` answers, or the same with `\\n` for its
    line breaks (as one-line environment files hold it)."""
    pem = webhook_public_key()
    for value in (pem, pem.replace("\n", "\\n")):
        result = manage(
            "shell",
            "--no-imports",
            "-c",
            "from django.conf import settings; print(settings.DUE_WEBHOOK_PUBLIC_KEY)",
            DUE_WEBHOOK_PUBLIC_KEY=value,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == pem.strip()


# Strong enough for production's checks; used where a test is about something else.
STRONG_SECRET_KEY = "k7Qw9zR2xV5mN8pL3tY6uB1cD4fG0hJ-aS9dF2gH5jK8lZ3xC6vB"


def test_production_requires_its_secrets():
    result = manage(
        "check",
        DJANGO_SETTINGS_MODULE="config.settings.production",
        DJANGO_SECRET_KEY=STRONG_SECRET_KEY,
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/ledger",
        CIRCLE_API_KEY="",
    )
    assert result.returncode == 2
    assert "configuration error: CIRCLE_API_KEY: required" in result.stderr


def test_durations_are_written_in_ms_s_m_h_or_d(monkeypatch):
    for written, meant in (("250ms", timedelta(milliseconds=250)), ("90d", timedelta(days=90))):
        monkeypatch.setenv("TEST_DURATION", written)
        assert env_duration("TEST_DURATION", "1h") == meant


def test_valid_configuration_passes_the_checks():
    result = manage(
        "check",
        TREASURY_SCHEDULER_INTERVAL="5m",
        CUTOVER_LEGACY_ARCHIVE_AFTER="90d",
        USE_LEDGER_INTEGRATION="true",
        LEDGER_SHADOW_MODE="true",
    )
    assert result.returncode == 0, result.stderr


def test_flag_combination_matching_no_phase_is_refused():
    result = manage("check", LEDGER_SHADOW_MODE="true")  # shadow without the ledger integration
    assert result.returncode == 2
    assert "USE_LEDGER_INTEGRATION=False, LEDGER_SHADOW_MODE=True" in result.stderr
    assert result.stderr.rstrip().endswith("matches no phase")


@pytest.fixture
def secrets_manager(aws_environment):
    """AWS Secrets Manager on the moto server (tests/conftest.py), and its environment."""
    client = boto3.client(
        "secretsmanager",
        endpoint_url=aws_environment["AWS_ENDPOINT_URL"],
        region_name=aws_environment["AWS_DEFAULT_REGION"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return client, aws_environment


PRODUCTION = {
    "DJANGO_SETTINGS_MODULE": "config.settings.production",
    "DJANGO_SECRET_KEY": STRONG_SECRET_KEY,
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/ledger",
    "AWS_SECRETS_PREFIX": "stack-service/",
    "CIRCLE_API_KEY": "",
    "CIRCLE_WEBHOOK_SECRET": "",
    "DUE_API_KEY": "",
    "DUE_API_SECRET": "",
    "ADMIN_TOKEN": "",
    "METRICS_TOKEN": "",
}
PRINT_SECRETS = (
    "from django.conf import settings as s; "
    "print(s.CIRCLE_API_KEY, s.CIRCLE_WEBHOOK_SECRET, s.DUE_API_KEY, s.DUE_API_SECRET, "
    "s.ADMIN_TOKEN, s.METRICS_TOKEN)"
)


def test_production_secrets_come_from_aws_secrets_manager(secrets_manager):
    client, aws = secrets_manager
    stored = (
        "circle-api-key",
        "circle-webhook-secret",
        "due-api-key",
        "due-api-secret",
        "metrics-token",
    )
    for name in stored:
        client.create_secret(Name=f"stack-service/{name}", SecretString=f"aws-stored-{name}")
    result = manage(
        "shell",
        "--no-imports",
        "-c",
        PRINT_SECRETS,
        **{**PRODUCTION, **aws, "ADMIN_TOKEN": "set-in-the-environment"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "aws-stored-circle-api-key",
        "aws-stored-circle-webhook-secret",
        "aws-stored-due-api-key",
        "aws-stored-due-api-secret",
        "set-in-the-environment",  # a variable that is set wins over the secret store
        "aws-stored-metrics-token",
    ]


def test_a_secret_missing_from_aws_stops_production_naming_it(secrets_manager):
    client, aws = secrets_manager
    client.create_secret(Name="stack-service/circle-api-key", SecretString="k")
    result = manage("check", **PRODUCTION, **aws)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "configuration error: CIRCLE_WEBHOOK_SECRET: required in this environment but not set "
        "(nor in AWS Secrets Manager as stack-service/circle-webhook-secret)"
    )


def test_an_unreachable_secret_store_stops_the_process_naming_the_secret():
    result = manage(
        "check",
        **PRODUCTION,
        AWS_ENDPOINT_URL="http://127.0.0.1:1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_MAX_ATTEMPTS="1",
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "configuration error: CIRCLE_API_KEY: AWS Secrets Manager stack-service/circle-api-key:"
    )
    assert "Traceback" not in result.stderr


# --- production refuses placeholder and weak secrets (issue 9, item 16) -------------------------

SECRETS = (
    "DJANGO_SECRET_KEY",
    "CIRCLE_API_KEY",
    "CIRCLE_WEBHOOK_SECRET",
    "DUE_API_KEY",
    "DUE_API_SECRET",
    "ADMIN_TOKEN",
    "METRICS_TOKEN",
)


def env_example() -> dict[str, str]:
    """deploy/env.example as the environment a deployment copying it would run with."""
    values = {}
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def strong_secrets() -> dict[str, str]:
    return {
        name: STRONG_SECRET_KEY if name == "DJANGO_SECRET_KEY" else f"Zq8-{name.lower()}-4Kx7"
        for name in SECRETS
    }


def test_env_example_is_refused_by_production_naming_the_variable():
    example = env_example()
    assert example["DJANGO_SETTINGS_MODULE"] == "config.settings.production"
    result = manage("check", **example)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "configuration error: DJANGO_SECRET_KEY: looks like a placeholder"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", [*SECRETS, "CIRCLE_WALLET_ID"])
def test_each_shipped_placeholder_is_refused(name):
    """Every secret env.example ships is refused on its own, the others being real."""
    example = env_example()
    environment = {**example, **strong_secrets(), "CIRCLE_WALLET_ID": "1000000001"}
    environment[name] = example[name]
    result = manage("check", **environment)
    assert result.returncode == 2
    assert result.stderr.startswith(f"configuration error: {name}: looks like a placeholder")


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("DJANGO_SECRET_KEY", "k7" * 25, "too weak"),
        ("DJANGO_SECRET_KEY", "k7Qw9zR2xV5mN8pL3tY6", "too short"),
        ("ADMIN_TOKEN", "admin", "too short"),
        ("CIRCLE_WEBHOOK_SECRET", "abababababababababab", "too weak"),
        ("DUE_API_SECRET", "ChangeMe-0123456789abcdef", "looks like a placeholder"),
        ("CIRCLE_API_KEY", "your-circle-api-key-here", "looks like a placeholder"),
    ],
)
def test_weak_secrets_are_refused_in_production(name, value, problem):
    environment = {**env_example(), **strong_secrets(), "CIRCLE_WALLET_ID": "1000000001"}
    result = manage("check", **{**environment, name: value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"configuration error: {name}: {problem}")


def test_real_secrets_pass_in_production():
    environment = {**env_example(), **strong_secrets(), "CIRCLE_WALLET_ID": "1000000001"}
    environment["DJANGO_ALLOWED_HOSTS"] = "ledger.internal"
    result = manage("check", **environment)
    assert result.returncode == 0, result.stderr


# --- manage.py check --deploy (issue 13, item 9) ------------------------------------------------


def test_the_deploy_checks_pass_in_production():
    """Django's deployment checks under the production settings and deploy/env.example's
    environment: no warning (the one silenced carries its reason in the settings)."""
    environment = {**env_example(), **strong_secrets(), "CIRCLE_WALLET_ID": "1000000001"}
    result = manage("check", "--deploy", "--fail-level", "WARNING", **environment)
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues (1 silenced)." in result.stdout


def test_the_deploy_checks_fail_without_hsts():
    environment = {**env_example(), **strong_secrets(), "CIRCLE_WALLET_ID": "1000000001"}
    environment["SECURE_HSTS_SECONDS"] = "0"
    result = manage("check", "--deploy", "--fail-level", "WARNING", **environment)
    assert result.returncode == 1
    assert "(security.W004)" in result.stderr
