"""A disputed job's resolution, and the look-up of a lost creation's transfer, broken from the
outside: Due answering oddly (the sandbox's transfer edited under its lock), a careless
operator, races with Due's webhook and with a settlement cycle, bad input. Each test states
what the database holds afterwards: the jobs, the treasury's postings, the buffers and the
operators' audit. Tests named test_defect_... show a defect."""

import json
import threading
import time
import urllib.request
import uuid
from decimal import Decimal

import pytest
from django.db import connection

from cutover.models import OperatorAudit
from tests.cutover.factories import phase_set
from tests.treasury.factories import (
    DUE_WEBHOOK_URL,
    OPS,
    buffers,
    job_make,
    spend,
    webhook_delivered,
)
from tests.treasury.test_disputed_jobs import (  # noqa: F401 (documented_recipient: autouse)
    TRANSFER,
    at_due,
    disputed,
    documented_recipient,
    postings,
)
from tests.treasury.test_due_transfers import at_due as listed_at_due
from treasury.cycle import settlement_cycle_run
from treasury.exceptions import JobRefused
from treasury.models import BufferThreshold, ConversionJob
from treasury.operators import job_resolve
from treasury.selectors import reserved
from treasury.submission import jobs_submit

pytestmark = pytest.mark.django_db(transaction=True)


def unchanged(job: ConversionJob, before: dict) -> None:
    """Nothing of the resolution was written: the job still disputed and reserving its
    source, no posting, no audit, the buffers as they were."""
    job.refresh_from_db()
    assert (job.status, job.target_amount, job.ledger_transaction_id) == ("disputed", None, None)
    assert postings() == 0 and buffers() == before
    assert reserved(job.source_currency) == job.source_amount
    assert not OperatorAudit.objects.filter(action="job.resolve").exists()


def destination_at_due(due, **fields) -> None:
    with due.lock:
        due.conversions[TRANSFER]["destination"].update(fields)


def source_at_due(due, **fields) -> None:
    with due.lock:
        due.conversions[TRANSFER]["source"].update(fields)


# (1) Due answering oddly.


@pytest.mark.parametrize(
    "amount",
    [
        "1.475E+2",  # 147.50 in exponent form
        "-147.50",
        "NaN",
        "sNaN",
        "Infinity",
        "0",
        "0.00",
        "147.505",  # more places than USD has
        "147.50\n",
        "\u0661\u0664\u0667.\u0665\u0660",  # 147.50 in Arabic-Indic digits
        "1" + "0" * 40,  # huge
        147.5,  # a JSON number, not Due's decimal string
        ["147.50"],
        None,
    ],
)
def test_an_odd_destination_amount_is_never_booked(client, due, usdc_low, amount):
    job = disputed(client, due)
    before = buffers()
    destination_at_due(due, amount=amount)
    with pytest.raises(JobRefused):
        job_resolve(job_id=job.pk, actor=OPS, reason="r")
    unchanged(job, before)


@pytest.mark.parametrize("amount", ["1.5E+2", "150.001", "-150.00", "NaN", "149.99", ["150.00"]])
def test_an_odd_source_amount_is_never_booked(client, due, usdc_low, amount):
    """The source must be exactly the job's, written as a plain decimal of its currency."""
    job = disputed(client, due)
    before = buffers()
    source_at_due(due, amount=amount)
    with pytest.raises(JobRefused):
        job_resolve(job_id=job.pk, actor=OPS, reason="r")
    unchanged(job, before)


def test_a_destination_amount_in_another_currency_s_scale_is_booked_at_its_value(
    client, due, usdc_low
):
    """147.500000 (USDC's six places) for a USD destination is 147.50: booked as that."""
    job = disputed(client, due)
    before = buffers()
    destination_at_due(due, amount="147.500000")
    resolved = job_resolve(job_id=job.pk, actor=OPS, reason="by contract")
    resolved.refresh_from_db()
    assert (resolved.status, resolved.target_amount) == ("completed", Decimal("147.50"))
    assert buffers() == {"USDC": before["USDC"] - 150, "USD": before["USD"] + Decimal("147.50")}
    assert postings() == 1 and reserved("USDC") == 0


def test_an_answer_about_another_transfer_is_never_booked(client, due, usdc_low):
    job = disputed(client, due)
    before = buffers()
    at_due(due, id="tf_someone_else")
    with pytest.raises(JobRefused, match="cannot be asked now"):
        job_resolve(job_id=job.pk, actor=OPS, reason="r")
    unchanged(job, before)


def test_a_conversion_due_paid_to_another_recipient_is_never_booked(client, due, usdc_low):
    """Due says the job's 147.50 USD went to a recipient that is not ours (our bank account is
    DUE_RECIPIENT_USD): the fiat buffer never received it, and is not credited (found from
    outside: it was)."""
    job = disputed(client, due)
    before = buffers()
    destination_at_due(due, id="rcp_a_stranger")
    with pytest.raises(JobRefused):
        job_resolve(job_id=job.pk, actor=OPS, reason="r")
    unchanged(job, before)


@pytest.mark.parametrize(
    "external_id",
    [123, "list", "another"],
)
def test_a_listed_transfer_whose_external_id_is_not_the_job_s_key_is_never_taken(
    due, usdc_low, external_id
):
    """A lost creation's look-up: a transfer of the job's amount to our recipient but carrying
    an externalId that is not exactly the job's key (a number, a list holding it, another key)
    is not the job's: the job's own transfer is created."""
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    key = str(job.idempotency_key)
    odd = {"list": [key], "another": str(uuid.uuid4())}.get(external_id, external_id)
    stranger = listed_at_due(due)
    with due.lock:
        due.conversions[stranger]["externalId"] = odd
    assert jobs_submit().submitted == 1
    job.refresh_from_db()
    assert job.status == "submitted" and job.provider_reference != stranger
    assert due.create_calls == 1
    assert due.conversions[job.provider_reference]["externalId"] == key


def test_a_transfer_carrying_the_job_s_key_but_paying_another_recipient_is_for_an_operator(
    due, usdc_low
):
    """Our creation always names our recipient: a listed transfer carrying the job's key that
    pays someone else is not what the job asked for. Found from outside: it was taken as the
    job's (its completion would have credited our USDC buffer with money paid elsewhere). Now
    neither taken nor made again: for an operator."""
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    elsewhere = listed_at_due(due)
    with due.lock:
        due.conversions[elsewhere]["externalId"] = str(job.idempotency_key)
        due.conversions[elsewhere]["destination"]["id"] = "wlt_a_stranger"
    assert jobs_submit().retried == 1
    job.refresh_from_db()
    assert job.provider_reference is None and due.create_calls == 0
    assert elsewhere in job.last_error and "operator" in job.last_error


# (2) A careless operator.


def test_a_job_resolved_as_refunded_is_never_booked_when_due_says_processed_again(
    client, due, usdc_low
):
    job = disputed(client, due)
    at_due(due, status="refund_processed")
    before = buffers()
    assert job_resolve(job_id=job.pk, actor=OPS, reason="refunded").status == "failed"
    at_due(due, status="payment_processed")
    with pytest.raises(JobRefused, match="only a disputed job"):
        job_resolve(job_id=job.pk, actor=OPS, reason="again")
    event = {"type": "transfer.status_changed", "data": {"id": TRANSFER}}
    assert webhook_delivered(client, due, event).json() == {"status": "failed"}
    job.refresh_from_db()
    assert (job.status, job.provider_status, job.ledger_transaction_id) == (
        "failed",
        "payment_processed",  # kept for an operator, with an ALERT
        None,
    )
    assert postings() == 0 and buffers() == before and reserved("USDC") == 0
    assert OperatorAudit.objects.filter(action="job.resolve").count() == 1


def test_a_resolution_the_spent_source_buffer_cannot_give_is_refused_and_writes_nothing(
    client, due, usdc_low
):
    job = disputed(client, due)
    spend("usdc_buffer", buffers()["USDC"] - 100)  # 100 USDC left, the job converted 150
    before = buffers()
    with pytest.raises(JobRefused, match="not booked"):
        job_resolve(job_id=job.pk, actor=OPS, reason="r")
    unchanged(job, before)


@pytest.mark.parametrize("tolerance", ["0", "0.05", "0.1"])
def test_the_tolerance_neither_resolves_a_dispute_nor_limits_a_resolution(
    client, due, usdc_low, settings, tolerance
):
    """Raising TREASURY_CONVERSION_TOLERANCE after the dispute does not book it on Due's next
    webhook (the operator does); the resolution books Due's 147.50 under any tolerance, under
    the kill switch too."""
    job = disputed(client, due)
    settings.TREASURY_CONVERSION_TOLERANCE = Decimal(tolerance)
    phase_set("cutover", kill_switch=True)
    event = {"type": "transfer.status_changed", "data": {"id": TRANSFER}}
    assert webhook_delivered(client, due, event).json() == {"status": "disputed"}
    assert postings() == 0
    before = buffers()
    resolved = job_resolve(job_id=job.pk, actor=OPS, reason="by contract")
    assert (resolved.status, resolved.target_amount) == ("completed", Decimal("147.50"))
    assert buffers() == {"USDC": before["USDC"] - 150, "USD": before["USD"] + Decimal("147.50")}
    assert postings() == 1 and OperatorAudit.objects.filter(action="job.resolve").count() == 1


# (3) Races.


def _resolve_slowly(due, job: ConversionJob, outcomes: list) -> threading.Thread:
    """A resolution whose read of Due is held 0.6 s (it holds the job's ask lock meanwhile);
    returned once Due has been read."""
    due.delay, due.slow_reads, reads = 0.6, 1, due.reads

    def resolve():
        try:
            outcomes.append(job_resolve(job_id=job.pk, actor=OPS, reason="race").status)
        except JobRefused as exc:
            outcomes.append(str(exc))
        finally:
            connection.close()

    thread = threading.Thread(target=resolve)
    thread.start()
    deadline = time.monotonic() + 5
    while due.reads == reads and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread


def test_due_s_webhook_during_a_resolution_is_applied_after_it(client, due, usdc_low, live_server):
    """Due refunds the transfer while the operator's resolution (which read it processed) is
    under way; its webhook waits for the resolution, then records the refund on the completed
    job (for a reversal): one posting, one audit."""
    job = disputed(client, due)
    before = buffers()
    outcomes: list = []
    thread = _resolve_slowly(due, job, outcomes)
    at_due(due, status="refund_processed")
    body = json.dumps({"type": "transfer.status_changed", "data": {"id": TRANSFER}}).encode()
    request = urllib.request.Request(  # noqa: S310 (the live server's http URL)
        f"{live_server.url}{DUE_WEBHOOK_URL}",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-Webhook-Signature": due.sign(body)},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        answer = json.loads(response.read())
    thread.join()
    assert outcomes == ["completed"] and answer == {"status": "completed"}
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("completed", "refund_processed")
    assert buffers() == {"USDC": before["USDC"] - 150, "USD": before["USD"] + Decimal("147.50")}
    assert postings() == 1 and OperatorAudit.objects.filter(action="job.resolve").count() == 1


def test_a_settlement_cycle_during_a_resolution_never_plans_beyond_the_buffers(
    client, due, usdc_low
):
    """A cycle runs while the resolution reads Due: whichever commits first, the job it
    creates takes from the USD buffer no more than it holds above its minimum."""
    job = disputed(client, due)
    outcomes: list = []
    thread = _resolve_slowly(due, job, outcomes)
    result = settlement_cycle_run(triggered_by="race")
    thread.join()
    assert outcomes == ["completed"] and postings() == 1
    created = ConversionJob.objects.filter(pk__in=result.jobs_created)
    assert [(j.source_currency, j.status) for j in created] == [("USD", "pending")]
    minimum = BufferThreshold.objects.get(currency="USD").minimum
    assert buffers()["USD"] - reserved("USD") >= minimum
    assert reserved("USDC") == 0


# (4) Bad input.


@pytest.mark.parametrize("reason", ["", "   ", "\x00", "ok\u202e", "\ud800", "a\x1b[31m"])
def test_a_reason_that_is_no_printable_text_is_refused_before_due_is_asked(
    client, due, usdc_low, reason
):
    job = disputed(client, due)
    before, reads = buffers(), due.reads
    with pytest.raises(JobRefused, match="reason"):
        job_resolve(job_id=job.pk, actor=OPS, reason=reason)
    assert due.reads == reads
    unchanged(job, before)


def test_a_job_that_is_not_disputed_is_refused_and_unchanged(client, due, usdc_low):
    job = disputed(client, due)
    with pytest.raises(ConversionJob.DoesNotExist):
        job_resolve(job_id=job.pk + 1000, actor=OPS, reason="r")
    other = job_make(reference="tf_submitted", amount="10")
    with pytest.raises(JobRefused, match="only a disputed job"):
        job_resolve(job_id=other.pk, actor=OPS, reason="r")
    other.refresh_from_db()
    assert other.status == "submitted" and postings() == 0
