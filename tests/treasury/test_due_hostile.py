"""Due answering as a flaky or hostile provider might (found from outside, each a defect
until fixed): an answer about another transfer than the one asked for, a list whose cursor is
of another type or whose pages shift, a transfer older than the job, text PostgreSQL refuses
(NUL, NaN) in a transfer, a funding answer or an error message, and nesting Python cannot read.
Over HTTP, against a stand-in Due (tests/stand_in.py) or the sandbox; the outcome is read in the
database."""

import json
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import Client

from ledger.models import Transaction
from tests.stand_in import StandIn
from tests.treasury.factories import (
    DUE_WEBHOOK_URL,
    RECIPIENTS,
    job_make,
    job_transfer,
    webhook_delivered,
)
from treasury.models import ConversionJob, ConversionProvider
from treasury.monitor import monitor_run
from treasury.sandbox import iso
from treasury.submission import jobs_submit

pytestmark = pytest.mark.django_db(transaction=True)
TRANSFER = re.compile(r"^/v1/transfers/([^/?]+)$")
FUNDING = re.compile(r"^/v1/transfers/([^/?]+)/funding_address$")


def postings() -> int:
    return Transaction.objects.filter(namespace="treasury").count()


@pytest.mark.parametrize("path", ["webhook", "poll"])
def test_an_answer_about_another_transfer_is_not_applied(client, due, usdc_low, path):
    """GET /v1/transfers/tf_ours answers transfer tf_other (a proxy's cache, a routing bug at
    Due, another account's transfer): its amounts happen to match, it is processed. Job tf_ours
    must not be completed and nothing posted on the strength of another transfer's state."""
    job = job_make(reference="tf_ours")
    with due.lock:  # what Due answers to GET /v1/transfers/tf_ours
        due.conversions["tf_ours"] = json.loads(
            json.dumps(job_transfer(job, transfer_id="tf_other", status="payment_processed"))
        )
    if path == "webhook":
        event = {"type": "transfer.status_changed", "data": {"id": "tf_ours"}}
        response = webhook_delivered(client, due, event)
        assert response.status_code != 500
    else:
        monitor_run()
    job.refresh_from_db()
    assert job.status != "completed", "completed on the answer about another transfer"
    assert postings() == 0


def _fake(pages: dict[str, dict], created: list):
    """Due: GET /v1/transfers answers pages[<next or "">]; quote and creation succeed (each
    creation recorded in `created`); GET /v1/transfers/{id} answers the transfer."""

    def answer(method, path):
        url = urlsplit(path)
        if method == "GET" and url.path == "/v1/transfers":
            cursor = parse_qs(url.query).get("next", [""])[0]
            return 200, json.dumps(pages[cursor]).encode()
        if method == "POST" and url.path == "/v1/transfers/quote":
            return 200, b'{"token": "qt_test"}'
        if method == "POST" and url.path == "/v1/transfers":
            made = {"id": f"tf_new_{len(created)}", "status": "awaiting_funds"}
            created.append(made)
            return 200, json.dumps(made).encode()
        if method == "GET" and TRANSFER.match(url.path):
            return 200, json.dumps(
                {"id": TRANSFER.match(url.path)[1], "status": "awaiting_funds"}
            ).encode()
        return 404, b"{}"

    return StandIn(answer)


def _pending_job_sent_once() -> ConversionJob:
    """A job whose first creation was sent and its answer lost (attempts 1)."""
    return job_make(reference=None, source="USD", amount="19000", status="pending", attempts=1)


def test_a_cursor_of_another_type_is_no_end_of_the_list(due, usdc_low, settings):
    """Page one: a hundred strangers and `next` as a number (not the string the product
    expects). It was taken for the end of the list, nothing found, and a second transfer
    created while the job's first one was on page two."""
    job = _pending_job_sent_once()
    now = iso(datetime.now(UTC))
    strangers = [
        job_transfer(job, transfer_id=f"tf_s{i}", created=now, recipient=RECIPIENTS["USDC"])
        for i in range(100)
    ]
    for stranger in strangers:
        stranger["source"]["amount"] = stranger["destination"]["amount"] = "1.00"
    ours = job_transfer(job, transfer_id="tf_ours", created=now, recipient=RECIPIENTS["USDC"])
    pages = {"": {"items": strangers, "next": 100}, "100": {"items": [ours], "next": ""}}
    created: list = []
    with _fake(pages, created) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        jobs_submit()
    job.refresh_from_db()
    assert created == [], f"a second transfer was created: {created}"
    assert job.provider_reference in (None, "tf_ours")


def test_the_same_transfer_listed_on_two_pages_is_one_candidate(due, usdc_low, settings):
    """Newest-first pages shift while a new transfer is created between two page reads: the
    last of page one comes again first on page two. One transfer, listed twice, is one
    candidate, not "2 transfers ... for an operator"."""
    job = _pending_job_sent_once()
    now = iso(datetime.now(UTC))
    ours = job_transfer(job, transfer_id="tf_ours", created=now, recipient=RECIPIENTS["USDC"])
    pages = {"": {"items": [ours], "next": "p2"}, "p2": {"items": [ours], "next": ""}}
    created: list = []
    with _fake(pages, created) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        jobs_submit()
    job.refresh_from_db()
    assert (job.status, job.provider_reference) == ("submitted", "tf_ours"), job.last_error


def test_a_transfer_created_before_the_job_is_not_adopted(due, usdc_low, settings):
    """Due lists a transfer created two days before the job (startDate is documented only by
    the third-party spec, and was not checked on our side): same amount, currencies and
    recipient, held by no job. It cannot be this job's creation."""
    job = _pending_job_sent_once()
    old = iso(datetime.now(UTC) - timedelta(days=2))
    stale = job_transfer(job, transfer_id="tf_stale", created=old, recipient=RECIPIENTS["USDC"])
    pages = {"": {"items": [stale], "next": ""}}
    created: list = []
    with _fake(pages, created) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        jobs_submit()
    job.refresh_from_db()
    assert job.provider_reference != "tf_stale"


def _two_jobs():
    """A USD -> USDC job (tf_poison, awaiting funds) and a USDC -> USD one (tf_fine, processed
    at Due): the second must be posted whatever the first's answers are."""
    poison = job_make(reference="tf_poison", source="USD", amount="19000")
    fine = job_make(reference="tf_fine", source="USDC", amount="500")
    return poison, fine


@pytest.mark.parametrize(
    "funding_raw",
    [
        b'{"kind": "details", "memo": "pay\\u0000ref"}',  # NUL: jsonb refuses \u0000
        b'{"kind": "details", "amount": NaN}',  # Python reads NaN; jsonb refuses it
    ],
    ids=["nul", "nan"],
)
def test_funding_instructions_postgres_refuses_do_not_stop_the_monitor(
    due, usdc_low, settings, funding_raw
):
    poison, fine = _two_jobs()
    fine_transfer = job_transfer(fine, transfer_id="tf_fine", status="payment_processed")
    poison_transfer = json.dumps(job_transfer(poison, transfer_id="tf_poison")).encode()
    # the USD job's transfer carries its instructions (transferInstructions)
    poison_transfer = poison_transfer[:-1] + b', "transferInstructions": ' + funding_raw + b"}"

    def answer(method, path):
        found = TRANSFER.match(path)
        if method == "GET" and found and found[1] == "tf_poison":
            return 200, poison_transfer
        if method == "GET" and found and found[1] == "tf_fine":
            return 200, json.dumps(fine_transfer).encode()
        return 404, b'{"error_code": "err_not_found", "message": "no"}'

    with StandIn(answer) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        monitor_run()  # (it raised DataError, and every run after)
    fine.refresh_from_db()
    assert fine.status == "completed" and postings() == 1


def test_usdc_funding_address_with_nul_does_not_stop_the_monitor(due, usdc_low, settings):
    job = job_make(reference="tf_usdc", source="USDC", amount="500")

    def answer(method, path):
        if method == "GET" and TRANSFER.match(path):
            return 200, json.dumps(job_transfer(job, transfer_id="tf_usdc")).encode()
        if method == "POST" and FUNDING.match(path):
            return 200, b'{"kind": "disposable_account", "details": {"address": "0x\\u0000"}}'
        return 404, b"{}"

    with StandIn(answer) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        monitor_run()  # (it raised DataError, and every run after)
    job.refresh_from_db()
    assert job.status == "submitted"


def test_a_due_error_message_holding_nul_does_not_stop_the_monitor(due, usdc_low, settings):
    """Due answers 503 (or 4xx) with an error body whose message holds a NUL: its text goes
    into the provider's (and the job's) last_error, which PostgreSQL refuses."""
    job_make(reference="tf_flaky", source="USD", amount="19000")
    error = b'{"error_code": "err_unavailable", "message": "down\\u0000now", "http_code": 503}'

    with StandIn(lambda method, path: (503, error)) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        settings.DUE_HTTP_ATTEMPTS = 1
        monitor_run()  # (it raised DataError: provider_failed's save)
    provider = ConversionProvider.objects.get(code="due")
    assert provider.consecutive_failures == 1


def test_a_creation_refused_with_nul_in_the_message_fails_the_job(due, usdc_low, settings):
    """Due refuses the creation (400) with a NUL in its message: the job must be failed (the
    provider's word), not left pending with the submission run crashing on every pass."""
    job = job_make(reference=None, source="USD", amount="19000", status="pending", attempts=0)
    refusal = b'{"error_code": "err_x", "message": "no\\u0000pe", "http_code": 400}'

    def answer(method, path):
        if method == "GET" and path.startswith("/v1/transfers?"):
            return 200, b'{"items": [], "next": ""}'
        if method == "POST" and path == "/v1/transfers/quote":
            return 200, b'{"token": "qt_1"}'
        return 400, refusal

    with StandIn(answer) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        jobs_submit()  # (it raised DataError: job_fail's save)
    job.refresh_from_db()
    assert job.status == "failed"


def test_a_deeply_nested_answer_is_no_answer(due, usdc_low, settings):
    """A transfer answer nested 100,000 deep: json.loads raises RecursionError, which
    provider_call does not map (only ValueError & co.): the poll run dies and the webhook 500s."""
    job_make(reference="tf_deep", source="USD", amount="19000")
    deep = b"[" * 100_000 + b"]" * 100_000

    with StandIn(lambda method, path: (200, deep)) as fake:
        settings.DUE_API_BASE_URL = fake.base_url
        body = json.dumps({"type": "transfer.status_changed", "data": {"id": "tf_deep"}}).encode()
        response = Client(raise_request_exception=False).post(
            DUE_WEBHOOK_URL,
            data=body,
            content_type="application/json",
            headers={"X-Webhook-Signature": due.sign(body)},
        )
        assert response.status_code == 503, response.status_code
        monitor_run()
    assert ConversionJob.objects.get().status == "submitted"
