"""Conversions created as Due documents them (a quote, then a transfer to our recipient), over
HTTP against the Due sandbox. Due documents no idempotency, so a job's transfer is looked for
among Due's transfers before every creation: these tests put at Due what a lost answer, another
job or a stranger would have left there, and check what the job does and what Due is sent."""

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.stand_in import StandIn
from tests.treasury.factories import RECIPIENTS, due_transfer, fund
from treasury.cycle import settlement_cycle_run
from treasury.due import LOOKUP_PAGES
from treasury.models import ConversionJob, ConversionProvider
from treasury.monitor import monitor_run
from treasury.sandbox import OPEN, iso
from treasury.submission import jobs_submit

pytestmark = pytest.mark.django_db(transaction=True)
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "due"
JOB_AMOUNT = "19000.00"  # what usdc_low's cycle converts: USD -> USDC


def at_due(due, *, amount: str = JOB_AMOUNT, source: str = "USD") -> str:
    """A transfer at Due, created now, to our recipient in the other currency (its id)."""
    transfer_id = f"tf_{uuid.uuid4().hex[:20]}"
    target = "USDC" if source == "USD" else "USD"
    with due.lock:
        due.conversions[transfer_id] = due_transfer(
            transfer_id=transfer_id,
            source=source,
            amount=amount,
            created=iso(datetime.now(UTC)),
            recipient=RECIPIENTS[target],
        )
    return transfer_id


def test_a_job_is_quoted_and_sent_to_our_recipient_once(due, usdc_low):
    settlement_cycle_run(triggered_by="test")
    assert jobs_submit().submitted == 1
    job = ConversionJob.objects.get()
    [transfer] = due.conversions.values()
    assert transfer["id"] == job.provider_reference and due.create_calls == 1
    assert transfer["destination"]["id"] == RECIPIENTS["USDC"]
    assert (transfer["source"]["currency"], Decimal(transfer["source"]["amount"])) == (
        "USD",
        job.source_amount,
    )


def test_the_job_s_transfer_is_found_on_a_later_page(due, usdc_low):
    """More than a page (100) of newer transfers at Due: the look-up pages with `next`."""
    settlement_cycle_run(triggered_by="test")
    ours = at_due(due)  # as a lost answer would have left it
    for _ in range(150):
        at_due(due, amount="1.00")
    assert jobs_submit().submitted == 1
    assert ConversionJob.objects.get().provider_reference == ours and due.create_calls == 0


def test_another_job_s_transfer_is_not_taken(due, usdc_low):
    """Even one made long before this job (its transfer sent lately, after long retries)."""
    earlier = at_due(due)
    ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency="USDC",
        source_currency="USD",
        source_amount=Decimal(JOB_AMOUNT),
        target_currency="USDC",
        provider=ConversionProvider.objects.get(code="due"),
        provider_reference=earlier,
        status="failed",
        attempts=1,
        created_by="test",
        created_at=datetime.now(UTC) - timedelta(days=2),
    )
    settlement_cycle_run(triggered_by="test")
    assert jobs_submit().submitted == 1
    job = ConversionJob.objects.exclude(provider_reference=earlier).get()
    assert job.provider_reference not in (None, earlier) and due.create_calls == 1


@pytest.mark.parametrize(
    "stranger",
    [
        {"amount": "19000.01"},
        {"source": "USDC"},
    ],
    ids=["another-amount", "the-other-way"],
)
def test_a_transfer_that_is_not_the_job_s_is_not_taken(due, usdc_low, stranger):
    at_due(due, **stranger)
    settlement_cycle_run(triggered_by="test")
    assert jobs_submit().submitted == 1 and due.create_calls == 1


def test_two_candidates_at_due_are_for_an_operator_and_nothing_is_sent(due, usdc_low):
    first, second = at_due(due), at_due(due)
    settlement_cycle_run(triggered_by="test")
    assert jobs_submit().retried == 1
    job = ConversionJob.objects.get()
    assert job.status == "pending" and job.provider_reference is None
    assert first in job.last_error and second in job.last_error and "operator" in job.last_error
    assert due.create_calls == 0 and job.attempts == 0


def test_a_transfer_carrying_the_job_s_key_is_the_job_s(due, usdc_low):
    """The job's key goes to Due as the transfer's externalId: a lost answer's transfer that
    carries it is the job's, among others of its amount; one carrying another key never is."""
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    others = [at_due(due), at_due(due)]
    ours = at_due(due)
    with due.lock:
        due.conversions[others[1]]["externalId"] = str(uuid.uuid4())  # another system's
        due.conversions[ours]["externalId"] = str(job.idempotency_key)
    assert jobs_submit().submitted == 1
    job.refresh_from_db()
    assert job.provider_reference == ours and due.create_calls == 0


def test_a_transfer_carrying_the_job_s_key_for_another_amount_is_for_an_operator(due, usdc_low):
    """Due made the job's transfer for another amount (its quote's rounding, say): it carries
    the job's key, so nothing is created again, but neither is it taken (its conversion could
    never be the job's): the job waits for an operator, nothing sent."""
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    ours = at_due(due, amount="18999.99")
    with due.lock:
        due.conversions[ours]["externalId"] = str(job.idempotency_key)
    assert jobs_submit().retried == 1
    job.refresh_from_db()
    assert job.provider_reference is None and due.create_calls == 0
    assert ours in job.last_error and "operator" in job.last_error


def test_two_transfers_carrying_the_job_s_key_are_for_an_operator(due, usdc_low):
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    both = [at_due(due), at_due(due)]
    with due.lock:
        for transfer_id in both:
            due.conversions[transfer_id]["externalId"] = str(job.idempotency_key)
    assert jobs_submit().retried == 1
    job.refresh_from_db()
    assert job.provider_reference is None and due.create_calls == 0
    assert all(transfer_id in job.last_error for transfer_id in both)


def test_a_transfer_carrying_another_key_is_never_the_job_s(due, usdc_low):
    stranger = at_due(due)
    with due.lock:
        due.conversions[stranger]["externalId"] = str(uuid.uuid4())
    settlement_cycle_run(triggered_by="test")
    assert jobs_submit().submitted == 1
    job = ConversionJob.objects.get()
    assert job.provider_reference != stranger and due.create_calls == 1
    assert due.conversions[job.provider_reference]["externalId"] == str(job.idempotency_key)


def test_without_our_recipient_nothing_is_sent(due, usdc_low, settings, caplog):
    settings.DUE_RECIPIENTS = {**RECIPIENTS, "USDC": ""}
    settlement_cycle_run(triggered_by="test")
    assert jobs_submit().retried == 1
    job = ConversionJob.objects.get()
    assert job.attempts == 0 and "DUE_RECIPIENT_USDC" in job.last_error
    assert "ALERT treasury" in caplog.text and due.create_calls == 0 and not due.quotes


def test_a_creation_due_refuses_fails_the_job_with_due_s_error_code(due, usdc_low):
    settlement_cycle_run(triggered_by="test")
    with due.lock:
        due.fail_next = [400]  # the transfer's creation refused: nothing was made
    assert jobs_submit().failed == 1
    job = ConversionJob.objects.get()
    assert job.status == "failed" and "err_injected" in job.last_error and not due.conversions


# A Due whose list of transfers never ends: every page full, its `next` the same.
ENDLESS_PAGE = json.dumps({"items": [{"id": "tf_other"}] * 100, "next": "same"}).encode()


def test_a_list_of_transfers_that_never_ends_is_no_answer(due, usdc_low, settings):
    """Found by reading the look-up: a cursor that never moves made it page forever. Bounded:
    the job stays pending, nothing is created, the last error says why."""
    settlement_cycle_run(triggered_by="test")
    with StandIn(lambda method, path: (200, ENDLESS_PAGE)) as endless:
        settings.DUE_API_BASE_URL = endless.base_url
        assert jobs_submit().retried == 1
        assert len(endless.asked) == LOOKUP_PAGES
    job = ConversionJob.objects.get()
    assert job.status == "pending" and job.attempts == 0 and "operator" in job.last_error


# Funding: recorded for the operator who sends it --------------------------------------------


@pytest.fixture
def usdc_high():
    """USDC buffer 150,000 (above its 100,000 maximum), fiat buffer 60,000: converted to USD."""
    fund("usdc_buffer", "150000")
    fund("fiat_buffer", "60000")


def test_a_usdc_transfer_awaiting_funds_records_where_to_send_it_once(due, usdc_high, caplog):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    assert (job.source_currency, job.provider_status) == ("USDC", OPEN) and job.funding is None
    assert monitor_run().awaiting_funds == 1
    job.refresh_from_db()
    assert job.funding["details"]["address"].startswith("0x") and job.status == "submitted"
    alerts = [r for r in caplog.records if "awaits" in r.getMessage()]
    assert len(alerts) == 1 and job.funding["details"]["address"] in alerts[0].getMessage()
    assert monitor_run().awaiting_funds == 0  # once
    due.finish(job.provider_reference, "completed")
    monitor_run()
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("completed", "payment_processed")


def test_funding_instructions_due_cannot_give_now_are_asked_again(due, usdc_high):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    with due.lock:
        due.conversions[job.provider_reference]["status"] = "manual_review"
    assert monitor_run().awaiting_funds == 0
    job.refresh_from_db()
    assert job.provider_status == "manual_review" and job.funding is None
    with due.lock:
        due.conversions[job.provider_reference]["status"] = OPEN
    assert monitor_run().awaiting_funds == 1


# What we send Due, against what Due documents ------------------------------------------------


def documented(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def shape(document: object) -> object:
    """A JSON document's keys, nested, without its values."""
    if isinstance(document, dict):
        return {key: shape(value) for key, value in document.items()}
    return type(document).__name__


def test_our_requests_are_due_s_documented_ones_and_its_answers_are_read(usdc_low, settings):
    """A stand-in Due answering with Due's own documented quote (Privy's Due recipe) and error
    body (due.readme.io docs/api-error-codes): our quote request has the shape of Due's
    documented one (docs/fiat-to-stablecoin-transfers-pay-ins) with the amount in the
    currency's scale, our transfer request carries the quote's token to our recipient as
    Privy's recipe does, and the refusal is told by its error_code (fixtures' addresses in
    tests/treasury/fixtures/due/SOURCES.md)."""
    quote_answer = documented("quote_response_offramp_usdc_base_to_eur_sepa.privy.json")
    refusal = documented("error_response.json")

    def answer(method, path):
        if method == "GET":
            return 200, b'{"items": [], "next": ""}'
        if path == "/v1/transfers/quote":
            return 200, json.dumps(quote_answer).encode()
        return refusal["http_code"], json.dumps(refusal).encode()

    settings.DUE_RECIPIENTS = RECIPIENTS
    settlement_cycle_run(triggered_by="test")
    with StandIn(answer) as stand_in:
        settings.DUE_API_BASE_URL = stand_in.base_url
        assert jobs_submit().failed == 1
    quote_sent, transfer_sent = (
        json.loads(body)
        for path, body in zip(stand_in.asked, stand_in.bodies, strict=True)
        if path in ("/v1/transfers/quote", "/v1/transfers")
    )
    assert shape(quote_sent) == shape(
        documented("quote_request_onramp_usd_ach_to_usdc_ethereum.json")
    )
    assert quote_sent == {
        "source": {"rail": "ach", "currency": "USD", "amount": "19000.00"},
        "destination": {"rail": "ethereum", "currency": "USDC", "amount": "0"},
    }
    # (externalId: "POST /v1/transfers with the quote token and an externalId", Due's
    # quickstart, due.readme.io/docs/getting-started; Privy's recipe sends none)
    documented_fields = set(documented("transfer_request_offramp.privy.json")) | {"externalId"}
    assert set(transfer_sent) <= documented_fields
    job = ConversionJob.objects.get()
    assert transfer_sent == {
        "quote": quote_answer["token"],
        "recipient": RECIPIENTS["USDC"],
        "externalId": str(job.idempotency_key),
    }
    assert job.status == "failed" and "err_recipient_not_found" in job.last_error
