"""Due's webhook as Due documents it (due.readme.io, docs/webhook-security and
docs/list-of-events; the examples in tests/treasury/fixtures/due, their addresses in its
SOURCES.md), over the real endpoint and the Due sandbox over HTTP: Ed25519 over the raw body,
hex in X-Webhook-Signature, by the endpoint's own key pair; `{"id", "type", "data", ...}` with
the whole transfer in `data`. What a `transfer.status_changed` says is asked of Due again
(`GET /v1/transfers/{id}`) before anything is applied: Due signs no time, so a captured delivery
verifies forever. Anything refused writes nothing."""

import json
import threading
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.db import connection
from django.test import Client

from ledger.models import Transaction
from tests.cutover.factories import phase_set
from tests.treasury.factories import (
    DUE_WEBHOOK_URL,
    RECIPIENTS,
    job_make,
    job_transfer,
    webhook_delivered,
)
from treasury.due import PROVIDER_REFERENCE_MAX
from treasury.models import ConversionJob

pytestmark = pytest.mark.django_db(transaction=True)
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "due"
DOCUMENTED_TRANSFER_ID = "tf_XYZ123456789"


def documented(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def at_due(due, transfer: dict) -> None:
    """Due holds `transfer` (what `GET /v1/transfers/{id}` answers)."""
    with due.lock:
        due.conversions[transfer["id"]] = json.loads(json.dumps(transfer))


def post(client: Client, body: bytes, signature: str):
    return client.post(
        DUE_WEBHOOK_URL,
        data=body,
        content_type="application/json",
        headers={"X-Webhook-Signature": signature},
    )


def database() -> tuple[list[dict], int]:
    jobs = list(ConversionJob.objects.order_by("pk").values())
    return jobs, Transaction.objects.filter(namespace="treasury").count()


def refused(response, status: int, code: str, field: str | None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert (error["code"], error.get("field")) == (code, field)
    return error


# The documented examples ---------------------------------------------------------------------


def test_the_documented_event_is_acted_on_as_due_says_the_transfer_is(client, due, usdc_low):
    """Due's own example (150.00 USDC -> 147.50 USD, fee 2.50, `payment_processed`) about a
    150 USDC job: Due is asked for the transfer, which says the same; its fee is 1.67 %, over
    what a completion may cost (1 %), so nothing is posted and the job is disputed."""
    event = documented("webhook_transfer_status_changed.json")
    job = job_make(reference=DOCUMENTED_TRANSFER_ID, source="USDC", amount="150.00")
    at_due(due, event["data"])
    response = webhook_delivered(client, due, event)
    assert response.status_code == 200 and response.json() == {"status": "disputed"}
    job.refresh_from_db()
    assert "147.50" in job.last_error and database()[1] == 0


@pytest.mark.parametrize(
    "fixture",
    ["webhook_transfer_status_changed.json", "webhook_transfer_status_changed_older_revision.json"],
)
def test_a_documented_event_about_a_processed_transfer_posts_once(client, due, usdc_low, fixture):
    """Both documented envelopes (the older one without id, occurredAt, attemptedAt), about a
    job's transfer that Due processed 1:1: posted once, however often it is delivered."""
    job = job_make(reference=DOCUMENTED_TRANSFER_ID)
    at_due(due, job_transfer(job, transfer_id=DOCUMENTED_TRANSFER_ID, status="payment_processed"))
    event = documented(fixture)
    for _ in range(3):
        response = webhook_delivered(client, due, event)
        assert response.status_code == 200 and response.json() == {"status": "completed"}
    job.refresh_from_db()
    assert job.status == "completed" and job.target_amount == Decimal("19000")
    assert database()[1] == 1


def test_the_documented_kyc_event_is_ignored(client, due, usdc_low):
    job_make(reference=DOCUMENTED_TRANSFER_ID)
    before = database()
    response = webhook_delivered(client, due, documented("webhook_kyc_status_changed.json"))
    assert response.status_code == 200 and response.json() == {"status": "ignored"}
    assert database() == before


# What the delivery says is never what is applied ----------------------------------------------


@pytest.mark.parametrize(
    ("said", "at_due_status", "outcome"),
    [
        ("failed", "payment_processed", "completed"),  # a captured old event, replayed
        ("payment_processed", "awaiting_funds", "submitted"),
        ("payment_processed", "canceled", "failed"),
    ],
)
def test_the_transfer_is_asked_of_due_and_its_answer_applied(
    client, due, usdc_low, said, at_due_status, outcome
):
    job = job_make(reference="tf_asked")
    at_due(due, job_transfer(job, transfer_id="tf_asked", status=at_due_status))
    event = documented("webhook_transfer_status_changed.json")
    event["data"] = job_transfer(job, transfer_id="tf_asked", status=said)
    response = webhook_delivered(client, due, event)
    assert response.status_code == 200 and response.json() == {"status": outcome}
    job.refresh_from_db()
    assert job.status == outcome
    assert database()[1] == (outcome == "completed")


def test_a_status_due_may_add_is_in_flight(client, due, usdc_low, caplog):
    job = job_make(reference="tf_new_status")
    at_due(due, job_transfer(job, transfer_id="tf_new_status", status="compliance_hold"))
    event = {"type": "transfer.status_changed", "data": {"id": "tf_new_status"}}
    response = webhook_delivered(client, due, event)
    assert response.status_code == 200 and response.json() == {"status": "submitted"}
    assert "compliance_hold" in caplog.text and database()[1] == 0


def test_due_unreachable_is_a_503_and_its_redelivery_settles(client, due, usdc_low):
    job = job_make(reference="tf_later")
    at_due(due, job_transfer(job, transfer_id="tf_later", status="payment_processed"))
    event = {"type": "transfer.status_changed", "data": {"id": "tf_later"}}
    before = database()
    due.unavailable = True
    refused(webhook_delivered(client, due, event), 503, "provider_unavailable", None)
    assert database() == before
    due.unavailable = False
    assert webhook_delivered(client, due, event).json() == {"status": "completed"}
    assert database()[1] == 1


def test_a_transfer_no_job_holds_is_ignored(client, due, usdc_low):
    job_make(reference="tf_ours")
    before = database()
    event = {"type": "transfer.status_changed", "data": {"id": "tf_someone_elses"}}
    response = webhook_delivered(client, due, event)
    assert response.status_code == 200 and response.json() == {"status": "ignored"}
    assert database() == before


def test_concurrent_deliveries_of_one_event_post_once(due, usdc_low, live_server):
    job = job_make(reference="tf_storm")
    at_due(due, job_transfer(job, transfer_id="tf_storm", status="payment_processed"))
    due.callback = f"{live_server.url}{DUE_WEBHOOK_URL}"
    body = due.event(due.conversions["tf_storm"])
    statuses = []

    def deliver() -> None:
        try:
            statuses.append(due.call_back(body))
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert statuses == [200] * 4
    job.refresh_from_db()
    assert job.status == "completed" and database()[1] == 1


# Refused: nothing written ----------------------------------------------------------------------


def test_signatures_that_are_not_due_s_are_refused(client, due, usdc_low):
    job = job_make(reference="tf_forged")
    at_due(due, job_transfer(job, transfer_id="tf_forged", status="payment_processed"))
    body = json.dumps({"type": "transfer.status_changed", "data": {"id": "tf_forged"}}).encode()
    good = due.sign(body)
    flipped = good[:-2] + f"{int(good[-2:], 16) ^ 1:02x}"
    before = database()
    for signature in [
        "",
        "not hex",
        Ed25519PrivateKey.generate().sign(body).hex(),  # another key's
        due.sign(body + b" "),  # of another body
        flipped,
        good[:-2],
        good + "00",
    ]:
        refused(post(client, body, signature), 400, "rejected", "X-Webhook-Signature")
    assert database() == before
    assert post(client, body, good.upper()).json() == {"status": "completed"}


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (
            {"type": "transfer.status_changed", "data": {"id": "c" * (PROVIDER_REFERENCE_MAX + 1)}},
            "data.id",
        ),
        ({"type": "transfer.status_changed", "data": {"id": ""}}, "data.id"),
        ({"type": "transfer.status_changed", "data": {"id": "tf 1"}}, "data.id"),
        ({"type": "transfer.status_changed", "data": "tf_1"}, "data.id"),
        ({"type": "transfer.status_changed"}, "data.id"),
        ({"type": 7, "data": {"id": "tf_1"}}, "type"),
        ({"data": {"id": "tf_1"}}, "type"),
    ],
)
def test_a_signed_body_that_is_no_transfer_event_is_refused_naming_the_field(
    client, due, usdc_low, event, field
):
    job_make(reference="tf_1")
    before = database()
    refused(webhook_delivered(client, due, event), 400, "rejected", field)
    assert database() == before


def test_a_signed_body_that_is_not_json_is_refused(client, due, usdc_low):
    body = b"\xff{not json"
    response = post(client, body, due.sign(body))
    assert response.status_code == 400 and response.json()["error"]["field"] == "body"


def test_without_the_endpoint_s_key_every_webhook_is_a_503(client, due, usdc_low, settings):
    settings.DUE_WEBHOOK_PUBLIC_KEY = ""
    job = job_make(reference="tf_unkeyed")
    at_due(due, job_transfer(job, transfer_id="tf_unkeyed", status="payment_processed"))
    before = database()
    event = {"type": "transfer.status_changed", "data": {"id": "tf_unkeyed"}}
    error = refused(webhook_delivered(client, due, event), 503, "provider_unavailable", None)
    assert "DUE_WEBHOOK_PUBLIC_KEY" in error["message"] and database() == before


@pytest.mark.parametrize("phase", ["legacy", "cutover"])
def test_a_completion_is_booked_under_the_kill_switch_in_any_phase(client, due, usdc_low, phase):
    """An operator stops money movement (the kill switch), or rolled back to legacy: money that
    already moved at Due is still booked, once, however often Due says so."""
    phase_set(phase, kill_switch=True)
    job = job_make(reference="tf_switched")
    at_due(due, job_transfer(job, transfer_id="tf_switched", status="payment_processed"))
    event = {"type": "transfer.status_changed", "data": {"id": "tf_switched"}}
    for _ in range(2):
        assert webhook_delivered(client, due, event).json() == {"status": "completed"}
    assert database()[1] == 1


def test_a_fee_within_the_configured_tolerance_is_posted(client, due, usdc_low, settings):
    """Due's documented example charges 2.50 on 150.00 (1.67 %): over the 1 % default, so
    disputed (above); a deployment whose contract with Due allows 2 % says so
    (TREASURY_CONVERSION_TOLERANCE=0.02) and the same completion posts 147.50, once."""
    settings.TREASURY_CONVERSION_TOLERANCE = Decimal("0.02")
    settings.DUE_RECIPIENTS = {**RECIPIENTS, "USD": "rcp_QWERTY98765"}  # whom the example pays
    event = documented("webhook_transfer_status_changed.json")
    job = job_make(reference=DOCUMENTED_TRANSFER_ID, source="USDC", amount="150.00")
    at_due(due, event["data"])
    for _ in range(2):
        response = webhook_delivered(client, due, event)
        assert response.status_code == 200 and response.json() == {"status": "completed"}
    job.refresh_from_db()
    assert job.target_amount == Decimal("147.50") and database()[1] == 1
