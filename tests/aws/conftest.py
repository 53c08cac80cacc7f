"""The product pointed at the moto server (tests/conftest.py): endpoint and region through the
settings, credentials in the environment where boto3 reads them; and clients of our own to see
what it made there."""

import re
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

CHECKLIST = Path(__file__).resolve().parents[2] / "deploy/checklist/ledger-deployment-checklist.md"


@dataclass
class Aws:
    endpoint: str
    cloudwatch: object
    logs: object
    secretsmanager: object


@pytest.fixture
def aws(aws_environment, settings, monkeypatch):
    settings.AWS_ENDPOINT_URL = aws_environment["AWS_ENDPOINT_URL"]
    settings.AWS_DEFAULT_REGION = aws_environment["AWS_DEFAULT_REGION"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, aws_environment[name])
    clients = {
        service: boto3.client(
            service,
            endpoint_url=aws_environment["AWS_ENDPOINT_URL"],
            region_name=aws_environment["AWS_DEFAULT_REGION"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for service in ("cloudwatch", "logs", "secretsmanager")
    }
    return Aws(endpoint=aws_environment["AWS_ENDPOINT_URL"], **clients)


def checklist_commands(command: str) -> list[dict[str, str]]:
    """Each `aws <command>` of the checklist (deploy/checklist/, the seed's copy) as its flags:
    `{"alarm-name": "...", "period": "300", ...}`."""
    found = re.findall(
        rf"aws {command}((?:[ \t]*\\?\n?[ \t]*--[\w-]+ [^\s\\]+)+)", CHECKLIST.read_text()
    )
    return [dict(re.findall(r"--([\w-]+) ([^\s\\]+)", flags)) for flags in found]
