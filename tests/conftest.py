"""Shared fixtures: the data migrations, the providers' sandboxes over HTTP (the engines'
and custody's tests use them) and AWS as a moto server. Tests run against the real PostgreSQL
named by DATABASE_URL; tests that need database rules to fire at COMMIT use
`django_db(transaction=True)`."""

import urllib.request
from dataclasses import dataclass
from datetime import timedelta

import boto3
import pytest
from django.apps import apps

from onchain.sandbox import USDC_TOKEN_ID, CircleSandbox
from tests.data_migrations import DATA_MIGRATIONS
from tests.treasury.factories import KEY, RECIPIENTS, SECRET
from treasury.sandbox import DueSandbox


@pytest.fixture(autouse=True)
def _data_migrations(request):
    """Currencies, system accounts and the first phase state, idempotently."""
    if request.node.get_closest_marker("django_db"):
        request.getfixturevalue("_django_db_helper")
        for migration in DATA_MIGRATIONS:
            migration(apps, None)


@pytest.fixture
def sandbox(settings, live_server):
    """The Circle sandbox over real HTTP, calling back the live server's webhook; the product
    pointed at it, without backoff waits."""
    with CircleSandbox(subscriber=f"{live_server.url}/webhooks/circle/transfers") as running:
        settings.CIRCLE_API_BASE_URL = running.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        settings.CIRCLE_HTTP_TIMEOUT = 2.0
        settings.ONCHAIN_WITHDRAWAL_BACKOFF = timedelta(0)
        settings.CIRCLE_WALLETS_TOKENS = {USDC_TOKEN_ID: "USDC"}
        yield running


@pytest.fixture
def due(settings, live_server):
    """The Due sandbox over real HTTP (settling only when told); the product pointed at it,
    without backoff waits."""
    settings.DUE_API_KEY, settings.DUE_API_SECRET = KEY, SECRET
    settings.DUE_HTTP_TIMEOUT = 1.0
    settings.TREASURY_SUBMIT_BACKOFF = timedelta(0)
    with DueSandbox(api_key=KEY, api_secret=SECRET, settle=None) as sandbox:
        settings.DUE_API_BASE_URL = sandbox.base_url
        settings.DUE_WEBHOOK_PUBLIC_KEY = sandbox.public_key_pem
        settings.DUE_RECIPIENTS = RECIPIENTS
        yield sandbox


@pytest.fixture(scope="session")
def moto_server():
    """A moto server on a loopback port, started once: AWS spoken to over real HTTP."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_environment(moto_server):
    """The environment a process needs to reach the moto server; what the test stored there
    (secrets, alarms, metrics...) is forgotten after it."""
    yield {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    reset = f"{moto_server}/moto-api/reset"
    urllib.request.urlopen(urllib.request.Request(reset, method="POST"))  # noqa: S310


@dataclass
class Aws:
    endpoint: str
    cloudwatch: object
    logs: object
    secretsmanager: object


@pytest.fixture
def aws(aws_environment, settings, monkeypatch):
    """The product pointed at the moto server: endpoint and region through the settings,
    credentials in the environment where boto3 reads them; and clients of our own to see what
    it made there."""
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
