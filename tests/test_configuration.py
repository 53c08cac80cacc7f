"""Settings are validated at start: a bad value stops the process with a message naming it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TREASURY_SCHEDULER_INTERVAL", "5 minutes"),
        ("ONCHAIN_DEPOSIT_POLL_INTERVAL", "0s"),
        ("ONCHAIN_BUFFER_ALERT_THRESHOLD", "lots"),
        ("LEDGER_SHADOW_MODE", "maybe"),
        ("BALANCE_SOURCE", "both"),
        ("DATABASE_URL", "mysql://localhost/x"),
        ("CELERY_BROKER_URL", "localhost:6379"),
    ],
)
def test_malformed_variable_stops_the_process_naming_it(variable, value):
    result = manage("check", **{variable: value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"configuration error: {variable}:")
    assert "Traceback" not in result.stderr


def test_production_requires_its_secrets():
    result = manage(
        "check",
        DJANGO_SETTINGS_MODULE="config.settings.production",
        DJANGO_SECRET_KEY="x" * 50,
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/ledger",
        CIRCLE_API_KEY="",
    )
    assert result.returncode == 2
    assert "configuration error: CIRCLE_API_KEY: required" in result.stderr


def test_valid_configuration_passes_the_checks():
    result = manage(
        "check",
        TREASURY_SCHEDULER_INTERVAL="5m",
        USE_LEDGER_INTEGRATION="true",
        LEDGER_SHADOW_MODE="true",
    )
    assert result.returncode == 0, result.stderr


def test_flag_combination_matching_no_phase_is_refused():
    result = manage("check", LEDGER_SHADOW_MODE="true")  # shadow without the ledger integration
    assert result.returncode == 2
    assert "USE_LEDGER_INTEGRATION=False, LEDGER_SHADOW_MODE=True" in result.stderr
    assert result.stderr.rstrip().endswith("matches no phase")
