"""Probes, metrics and the read-only ledger console over Django's test client."""

from contextlib import contextmanager

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client

from cutover.actors import Actor
from cutover.models import BalanceMutation
from cutover.operators import api_client_issue
from gateway.models import IdempotencyRecord
from ledger.models import Account, Transaction
from ledger.services import Leg, transaction_post
from tests.ledger.factories import UserAccountFactory, fund
from tests.treasury.factories import webhook_public_key

pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def database_down():
    """The default connection pointed at a port where nothing listens (the test client serves
    requests in this thread, on this connection); afterwards the port restored and the broken
    connection closed, so the test database is reached again."""
    connection.close()
    port, connection.settings_dict["PORT"] = connection.settings_dict["PORT"], 1
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict["PORT"] = port


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok"}}


def test_readyz_does_not_ask_the_broker_the_web_never_uses(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok"}}


def test_readyz_names_the_unreachable_database_and_its_error(client):
    with database_down():
        ready = client.get("/readyz")
        alive = client.get("/healthz")
    assert ready.status_code == 503
    assert ready["Content-Type"] == "application/json"
    assert ready.json()["status"] == "unavailable"
    failure = ready.json()["checks"]["database"]
    assert failure.startswith("error: OperationalError: ")
    assert "port 1 failed" in failure  # psycopg's own words: where it tried, and that it failed
    assert alive.status_code == 200  # a database outage restarts nothing


def test_metrics_expose_the_ledger_series(client, settings):
    settings.METRICS_TOKEN = "metrics-secret"
    alice, bob = UserAccountFactory(), UserAccountFactory()
    fund(alice, "10")
    transaction_post(
        namespace="metrics",
        reference_id="m1",
        kind="metrics_transfer",
        legs=[Leg.debit(alice, "1"), Leg.credit(bob, "1")],
    )
    body = client.get("/metrics", headers={"Authorization": "Bearer metrics-secret"})
    body = body.content.decode()
    assert 'ledger_transaction_created_total{kind="metrics_transfer"} 1.0' in body
    assert "ledger_transaction_duration_ms_bucket" in body
    assert "ledger_account_balance_checked_total" in body
    assert "django_db_execute_total" in body


@pytest.fixture
def operator(client):
    user = User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    client.force_login(user)
    return client


def test_ledger_console_is_read_only(operator):
    account = UserAccountFactory()
    fund(account, "5", reference="console")
    txn = Transaction.objects.get(reference_id="console")
    assert operator.get("/admin/ledger/account/").status_code == 200
    assert operator.get(f"/admin/ledger/transaction/{txn.pk}/change/").status_code == 200
    assert operator.get("/admin/ledger/entry/").status_code == 200
    assert operator.get("/admin/ledger/account/add/").status_code == 403
    response = operator.post(f"/admin/ledger/account/{account.pk}/change/", {"balance": "1000000"})
    assert response.status_code == 403
    assert (
        operator.post(f"/admin/ledger/transaction/{txn.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert Account.objects.get(pk=account.pk).balance == 5


# --- tokens anyone may send: non-ASCII ones are refused, never a 500 (issue 9, item 12) ---------

NON_ASCII_TOKENS = ["t\u00f6ken", "\u20ac" * 12, "admin-secret\u00a0"]


@pytest.mark.parametrize("token", NON_ASCII_TOKENS)
def test_a_non_ascii_admin_token_is_401(client, settings, token):
    settings.ADMIN_TOKEN = "admin-secret"
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    status = client.get("/internal/onchain/buffer-status", **headers)
    assert status.status_code == 401
    assert status.json()["error"]["field"] == "Authorization"
    cycle = client.post("/internal/treasury/trigger-cycle", **headers)
    assert cycle.status_code == 401
    assert cycle.json()["error"]["field"] == "Authorization"


@pytest.mark.parametrize("token", ["t%C3%B6ken", "%E2%82%AC", "s3cret%C3%A9", "%FF"])
def test_a_non_ascii_circle_webhook_token_is_401(client, settings, token):
    settings.CIRCLE_WEBHOOK_SECRET = "s3cret"
    response = client.post(
        f"/webhooks/circle/transfers?token={token}", data=b"{}", content_type="application/json"
    )
    assert response.status_code == 401
    assert response.json()["error"]["field"] == "token"


@pytest.mark.parametrize("signature", ["sig-\u00e9", "\u20ac" * 64])
def test_a_non_ascii_due_callback_signature_is_refused(client, settings, signature):
    settings.DUE_WEBHOOK_PUBLIC_KEY = webhook_public_key()
    response = client.post(
        "/webhooks/due/conversions",
        data=b'{"id": "c-1"}',
        content_type="application/json",
        HTTP_X_WEBHOOK_SIGNATURE=signature,
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "X-Webhook-Signature"


# What Django answers itself is the API's JSON error too; the admin keeps its HTML pages.
API_USER = "/api/v1/users/7d3f6a52-4b8e-4f0a-9a57-3c2b7e9d1a10"


def _json_error(response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    return error


def test_an_unknown_api_path_is_a_json_404(client):
    _json_error(client.get("/api/v1/nothing-here"), 404, "not_found")
    _json_error(client.post("/webhooks/nobody"), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("delete", f"{API_USER}/balance"),
        ("post", f"{API_USER}/balance"),  # GET-only: once Django's CSRF 403 page
        ("put", f"{API_USER}/balance-mutations"),
        ("get", f"{API_USER}/withdrawals"),
        ("post", "/internal/onchain/buffer-status"),
        ("get", "/webhooks/due/conversions"),
        ("get", "/internal/treasury/trigger-cycle"),
    ],
)
def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(method, path):
    browser = Client(enforce_csrf_checks=True)  # as a browser's form post would be checked
    response = getattr(browser, method)(path)
    error = _json_error(response, 405, "method_not_allowed")
    assert response["Allow"] and response["Allow"] in error["message"]


def test_a_body_over_djangos_limit_is_a_json_413_and_changes_nothing(client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024  # Django's own limit, 2.5 MB by default
    _, token = api_client_issue(name="big", scopes=["credit"], actor=Actor("test"))
    body = b'{"amount": "1", "pad": "' + b"x" * (128 * 1024) + b'"}'
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "big-1"}
    for path in (f"{API_USER}/balance-mutations", "/webhooks/circle/transfers"):
        response = client.post(path, data=body, content_type="application/json", headers=headers)
        _json_error(response, 413, "too_large")
    assert not BalanceMutation.objects.exists()
    assert not IdempotencyRecord.objects.exists()


def test_api_errors_are_json_503_naming_the_database_when_it_is_down(settings):
    _, token = api_client_issue(name="outage", scopes=["read"], actor=Actor("test"))
    settings.CIRCLE_WEBHOOK_SECRET = ""
    client = Client(raise_request_exception=False)  # answered as production answers it
    with database_down():
        balance = client.get(f"{API_USER}/balance", headers={"Authorization": f"Bearer {token}"})
        # An unseen key id: the webhook looks the key up in the database before anything else.
        webhook = client.post(
            "/webhooks/circle/transfers",
            data=b"{}",
            content_type="application/json",
            headers={"X-Circle-Signature": "c2lnbmF0dXJl", "X-Circle-Key-Id": "outage-key"},
        )
    for response in (balance, webhook):
        error = _json_error(response, 503, "unavailable")
        assert error["dependency"] == "database"
    assert not IdempotencyRecord.objects.exists()


def test_the_admin_keeps_its_html_pages(client):
    response = client.get("/admin/login/", {"next": "/admin/"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/html")
    assert client.get("/admin/nothing-here/").status_code in (302, 404)
