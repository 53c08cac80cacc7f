"""Due's conversion callback at its edges, over the real endpoint: a correctly signed callback
whose `data.id` cannot be recorded (longer than the provider reference's column, or already
another job's) and one whose signed X-Due-Timestamp is far from our clock (a replay) are
refused with our JSON error naming the field, and write nothing; a fresh one still settles."""

import json
import threading
import time
import uuid
from decimal import Decimal

import psycopg
import pytest
from django.db import connection

from ledger.models import Transaction
from tests.cutover.factories import database_url
from tests.treasury.factories import SECRET
from treasury import due
from treasury.due import PROVIDER_REFERENCE_MAX
from treasury.models import ConversionJob, ConversionProvider
from treasury.settlement import CALLBACK_TOLERANCE_SECONDS

pytestmark = pytest.mark.django_db(transaction=True)
URL = "/webhooks/due/conversions"


@pytest.fixture(autouse=True)
def secret(settings):
    settings.DUE_API_SECRET = SECRET


def job_make(*, status: str, reference: str | None = None, currency: str = "USDC"):
    """A conversion job as the cycle and the submission leave it (19,000 USD -> USDC)."""
    source, target = ("USD", "USDC") if currency == "USDC" else ("USDC", "USD")
    return ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency=currency,
        source_currency=source,
        source_amount=Decimal("19000"),
        target_currency=target,
        provider=ConversionProvider.objects.get(code="due"),
        provider_reference=reference,
        status=status,
        attempts=0 if reference is None else 1,
        created_by="test",
    )


def conversion(job: ConversionJob, *, conversion_id: str, status: str = "completed") -> dict:
    """Due's conversion object for `job`, the shape the sandbox sends (treasury/due.py)."""
    body = {
        "id": conversion_id,
        "status": status,
        "source": {"currency": job.source_currency, "amount": str(job.source_amount)},
        "destination": {"currency": job.target_currency},
        "reference": str(job.idempotency_key),
    }
    if status == "completed":
        body["destination"]["amount"] = str(job.source_amount)
    return {"type": f"conversion.{status}", "data": body}


def post(client, body: dict, *, timestamp: str | None = None):
    """The callback as Due signs it: HMAC-SHA256 of `timestamp.body` with DUE_API_SECRET."""
    raw = json.dumps(body).encode()
    timestamp = str(int(time.time())) if timestamp is None else timestamp
    return client.post(
        URL,
        data=raw,
        content_type="application/json",
        headers={
            "X-Due-Timestamp": timestamp,
            "X-Due-Signature": due.signature(SECRET, timestamp, raw),
        },
    )


def database() -> tuple[list[dict], int]:
    """What a refused callback must leave as it was: every job, and the treasury's postings."""
    jobs = list(ConversionJob.objects.order_by("pk").values())
    return jobs, Transaction.objects.filter(namespace="treasury").count()


def refused(response, status: int, code: str, field: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    return error


# 1. data.id that cannot be recorded.


@pytest.mark.parametrize("status", ["pending", "timed_out"])
def test_an_id_longer_than_the_column_is_refused_naming_data_id(client, usdc_low, status):
    """The job's answer was lost (pending, or timed out once sent): the callback would adopt
    it by `reference` and write `data.id` into provider_reference, varchar(64)."""
    job = job_make(status=status)
    if status == "timed_out":
        ConversionJob.objects.filter(pk=job.pk).update(attempts=1)
    before = database()
    long_id = "c" * (PROVIDER_REFERENCE_MAX + 1)
    response = post(client, conversion(job, conversion_id=long_id))
    error = refused(response, 400, "rejected", "data.id")
    assert str(PROVIDER_REFERENCE_MAX) in error["message"]
    assert database() == before
    # Due's retry of the same callback gets the same answer: a 4xx, never a 500.
    refused(post(client, conversion(job, conversion_id=long_id)), 400, "rejected", "data.id")
    assert database() == before


def test_an_id_of_exactly_the_column_s_length_is_adopted(client, usdc_low):
    job = job_make(status="pending")
    exact = "c" * PROVIDER_REFERENCE_MAX
    response = post(client, conversion(job, conversion_id=exact, status="processing"))
    assert response.status_code == 200 and response.json() == {"status": "submitted"}
    job.refresh_from_db()
    assert job.provider_reference == exact


def test_an_id_another_job_holds_is_refused_naming_data_id(client, usdc_low, caplog):
    """Due says the conversion carrying this pending job's key is one an earlier job already
    recorded as its own: a contradiction for an operator, not a 500 redelivered forever."""
    earlier = job_make(status="failed", reference="conv_taken")
    job = job_make(status="pending")
    before = database()
    response = post(client, conversion(job, conversion_id="conv_taken"))
    error = refused(response, 409, "refused", "data.id")
    assert "conv_taken" in error["message"] and f"job {earlier.pk}" in error["message"]
    assert database() == before
    assert any("ALERT treasury" in record.getMessage() for record in caplog.records)
    job.refresh_from_db()
    assert job.status == "pending" and job.provider_reference is None


def test_an_id_another_job_records_meanwhile_is_refused_too(client, usdc_low):
    """The race: the earlier job's submission records the id while the callback adopts it for
    another job (the check before the write saw nothing; the unique constraint stops it)."""
    earlier = job_make(status="pending", currency="USD")
    ConversionJob.objects.filter(pk=earlier.pk).update(attempts=1)
    job = job_make(status="pending")
    answers = []

    def callback() -> None:
        try:
            answers.append(post(client, conversion(job, conversion_id="conv_race")))
        finally:
            connection.close()

    watcher = psycopg.connect(database_url(), autocommit=True)  # sees pg_stat_activity afresh
    with watcher, psycopg.connect(database_url()) as other:
        other.execute(
            "UPDATE treasury_conversion_jobs SET provider_reference = 'conv_race', "
            "status = 'submitted' WHERE id = %s",
            [earlier.pk],
        )
        before = database()  # as the callback finds it: the earlier job's write not committed
        thread = threading.Thread(target=callback)
        thread.start()
        deadline = time.monotonic() + 10
        while not watcher.execute(  # the callback's UPDATE waits on the uncommitted id
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'UPDATE \"treasury_conversion_jobs\"%'"
        ).fetchone():
            assert time.monotonic() < deadline and thread.is_alive(), answers
            time.sleep(0.05)
        other.commit()
    thread.join(timeout=30)
    error = refused(answers[0], 409, "refused", "data.id")
    assert f"job {earlier.pk}" in error["message"]
    job.refresh_from_db()
    assert job.status == "pending" and job.provider_reference is None
    assert [row for row in database()[0] if row["id"] == job.pk] == [
        row for row in before[0] if row["id"] == job.pk
    ]


# 2. X-Due-Timestamp outside the window.


@pytest.mark.parametrize(
    "timestamp",
    [
        lambda: "0",
        lambda: "999999999999",
        lambda: str(int(time.time()) - CALLBACK_TOLERANCE_SECONDS - 60),
        lambda: str(int(time.time()) + CALLBACK_TOLERANCE_SECONDS + 60),
    ],
    ids=["epoch", "year-33658", "stale", "ahead"],
)
def test_a_signed_callback_far_from_our_clock_is_refused(client, usdc_low, timestamp):
    """Correctly signed, so a captured callback replayed at any time: refused, nothing posted."""
    timestamp = timestamp()
    job = job_make(status="submitted", reference="conv_replayed")
    before = database()
    response = post(client, conversion(job, conversion_id="conv_replayed"), timestamp=timestamp)
    refused(response, 400, "rejected", "X-Due-Timestamp")
    assert database() == before


@pytest.mark.parametrize("skew", [-(CALLBACK_TOLERANCE_SECONDS - 30), 0, 30])
def test_a_signed_callback_within_the_window_settles(client, usdc_low, skew):
    job = job_make(status="submitted", reference="conv_fresh")
    timestamp = str(int(time.time()) + skew)
    response = post(client, conversion(job, conversion_id="conv_fresh"), timestamp=timestamp)
    assert response.status_code == 200 and response.json() == {"status": "completed"}
    assert Transaction.objects.filter(namespace="treasury").count() == 1


def test_the_sandbox_signs_each_callback_with_the_current_time(due, usdc_low, live_server):
    """What Due's sandbox sends is accepted: its callbacks carry a fresh timestamp."""
    job = job_make(status="submitted", reference="conv_sandbox")
    due.callback = f"{live_server.url}{URL}"
    status = due.call_back(conversion(job, conversion_id="conv_sandbox")["data"])
    assert status == 200
    job.refresh_from_db()
    assert job.status == "completed"
