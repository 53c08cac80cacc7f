"""The refund paths of conversion jobs, broken from the outside (the team's own tests are in
test_due_refunds.py): Due's webhooks replayed, forged and raced, Due's answers odd; an operator
reversing the wrong job, twice, concurrently, after a rollback to legacy under the kill switch,
a job whose money was spent meanwhile or sits in the buffer's shards, a job in either direction
and one completed with a fee; a crash between the reversal's posting and its commit; bad input.
Each outcome is read in the database: the buffers and conversion clearing accounts, the ledger's
transactions (and `ledger verify`'s checks), the jobs and the operator audit. Tests named
`test_defect_...` fail on a defect (README "The treasury engine" says what is expected)."""

import contextlib
import json
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.utils import timezone

from cutover.models import OperatorAudit
from ledger.models import Account, Entry, Transaction
from ledger.selectors import ledger_integrity_checks, system_balance
from ledger.services import Leg, transaction_post
from tests.cutover.factories import phase_set
from tests.treasury.factories import (
    DUE_WEBHOOK_URL,
    OPS,
    buffers,
    fund,
    job_make,
    job_transfer,
    webhook_delivered,
)
from tests.treasury.test_due_refunds import alerts, due_event, postings
from treasury import monitor
from treasury.exceptions import JobRefused
from treasury.models import ConversionJob, ConversionProvider
from treasury.monitor import monitor_run
from treasury.operators import job_reverse
from treasury.selectors import withdrawals_held

pytestmark = pytest.mark.django_db(transaction=True)
CLEARING = ("conversion_clearing_usd", "conversion_clearing_usdc")
CHANGELIST = "/admin/treasury/conversionjob/"


# Helpers ---------------------------------------------------------------------------------------


def money() -> dict[str, Decimal]:
    """The buffers (summed over their shards) and the conversion clearing accounts."""
    return {**buffers(), **{code: system_balance(code=code) for code in CLEARING}}


def ledger_verified() -> None:
    """`ledger verify`: every transaction balanced per currency, chains and cached balances."""
    problems = [f"{c.name}: {p}" for c in ledger_integrity_checks() for p in c.problems]
    assert problems == []


def at_due(due, reference: str, **fields) -> None:
    """Due's transfer `reference` now has `fields`."""
    with due.lock:
        due.conversions[reference].update(fields)


def told(client, due, reference: str):
    """Due's webhook about its transfer `reference`, as Due signs it."""
    return webhook_delivered(client, due, due_event(due, reference))


def completed(client, due, *, reference: str, source="USD", amount="19000", received=None):
    """A job of `amount` from `source` that Due processed (paying `received`, 1:1 unless given),
    completed through Due's webhook."""
    job = job_make(reference=reference, source=source, amount=amount)
    transfer = job_transfer(job, transfer_id=reference, status="payment_processed")
    if received is not None:
        transfer["destination"]["amount"] = received
    with due.lock:
        due.conversions[reference] = transfer
    assert told(client, due, reference).json() == {"status": "completed"}
    job.refresh_from_db()
    assert job.status == "completed"
    return job


def refunded(client, due, job: ConversionJob) -> ConversionJob:
    """Due then refunds `job`'s transfer (refund_submitted, refund_processed), each announced."""
    for status in ("refund_submitted", "refund_processed"):
        at_due(due, job.provider_reference, status=status)
        assert told(client, due, job.provider_reference).status_code == 200
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("completed", "refund_processed")
    return job


def spend(code: str, amount: Decimal) -> None:
    """`amount` leaves the buffer `code` (paid out to equity: spent on something else)."""
    account = Account.objects.get(code=code)
    equity = Account.objects.get(code=f"opening_balance_equity_{account.currency_id.lower()}")
    transaction_post(
        namespace="test",
        reference_id=f"spent:{uuid.uuid4()}",
        kind="opening_balance",
        legs=[Leg.debit(equity, amount), Leg.credit(account, amount)],
    )


def other(currency: str) -> str:
    return "USD" if currency == "USDC" else "USDC"


def reversals() -> int:
    return Transaction.objects.filter(kind="conversion_reversal").count()


def audits() -> int:
    return OperatorAudit.objects.filter(action="job.reverse").count()


# Money: a fee, shards, a buffer spent meanwhile, any phase ------------------------------------


@pytest.mark.parametrize(
    ("source", "amount", "received"),
    [("USDC", "1000", "990"), ("USD", "19000", "18810")],
    ids=["usdc-to-usd", "usd-to-usdc"],
)
def test_a_conversion_completed_with_a_fee_reversed_puts_every_account_back(
    client, due, usdc_low, source, amount, received
):
    """1,000 USDC -> 990 USD (the fee at the 1 % tolerance): the completion moves both buffers
    and leaves the difference in the conversion clearing accounts; the reversal mirrors it, so
    the buffers and both clearing accounts are exactly where they were, entry for entry."""
    fund("usdc_buffer", "20000")
    before = money()
    job = completed(
        client, due, reference="tf_fee", source=source, amount=amount, received=received
    )
    target = other(source)
    paid, got = Decimal(amount), Decimal(received)
    assert job.target_amount == got
    assert money() == {
        source: before[source] - paid,
        target: before[target] + got,
        f"conversion_clearing_{source.lower()}": before[f"conversion_clearing_{source.lower()}"]
        + paid,
        f"conversion_clearing_{target.lower()}": before[f"conversion_clearing_{target.lower()}"]
        - got,
    }
    job = job_reverse(job_id=refunded(client, due, job).pk, actor=OPS, reason="refunded")
    assert job.status == "reversed" and money() == before
    conversion, reversal = (
        sorted((e.account_id, e.side, e.amount) for e in Entry.objects.filter(transaction_id=t))
        for t in (job.ledger_transaction_id, job.reversal_transaction_id)
    )
    flip = {"debit": "credit", "credit": "debit"}
    assert reversal == sorted((a, flip[s], x) for a, s, x in conversion)
    assert postings() == [
        ("conversion", f"conversion:{job.idempotency_key}"),
        ("conversion_reversal", f"conversion-reversal:{job.idempotency_key}"),
    ]
    ledger_verified()


def test_a_reversal_takes_the_usdc_back_from_the_buffer_s_shards(client, due, usdc_low):
    """The USDC a USD -> USDC conversion brought sits in the buffer's shards by the time it is
    reversed (deposits post to the depositor's shard): the reversal gathers it and succeeds;
    the whole buffer, not its base alone, is what it may take."""
    before = money()
    job = refunded(client, due, completed(client, due, reference="tf_shards"))
    base = Account.objects.get(code="usdc_buffer")
    moved = base.balance - Decimal("5")
    half = (moved / 2).quantize(Decimal("0.000001"))
    transaction_post(
        namespace="test",
        reference_id="into-shards",
        kind="opening_balance",
        legs=[
            Leg.debit(Account.objects.get(code="usdc_buffer#7"), half),
            Leg.debit(Account.objects.get(code="usdc_buffer#42"), moved - half),
            Leg.credit(base, moved),
        ],
    )
    assert Account.objects.get(code="usdc_buffer").balance == 5
    job_reverse(job_id=job.pk, actor=OPS, reason="Due returned it")
    assert ConversionJob.objects.get(pk=job.pk).status == "reversed"
    assert money() == before and reversals() == 1
    ledger_verified()


@pytest.mark.parametrize("source", ["USD", "USDC"], ids=["usd-to-usdc", "usdc-to-usd"])
def test_a_reversal_of_a_partly_spent_conversion_needs_exactly_what_it_brought(
    client, due, usdc_low, source
):
    """The target buffer was spent meanwhile down to one cent less than the conversion brought:
    refused, nothing written; once it holds exactly that much, reversed, the buffer at zero."""
    fund("usdc_buffer", "20000")
    amount = "19000" if source == "USD" else "900"
    job = refunded(
        client, due, completed(client, due, reference="tf_spent", source=source, amount=amount)
    )
    target = other(source)
    spend(
        "usdc_buffer" if target == "USDC" else "fiat_buffer",
        buffers()[target] - Decimal(amount) + Decimal("0.01"),
    )
    after = money()
    with pytest.raises(JobRefused, match=f"{target} buffer"):
        job_reverse(job_id=job.pk, actor=OPS, reason="refunded")
    assert money() == after and reversals() == 0 and audits() == 0
    assert ConversionJob.objects.get(pk=job.pk).status == "completed"
    fund("usdc_buffer" if target == "USDC" else "fiat_buffer", "0.01")
    job_reverse(job_id=job.pk, actor=OPS, reason="refunded")
    assert buffers()[target] == 0 and reversals() == 1 and audits() == 1
    ledger_verified()


def test_a_reversal_after_a_rollback_to_legacy_under_the_kill_switch_books_it(
    client, due, usdc_low
):
    """The reversal books money that already moved back: in legacy (after a rollback) and under
    the kill switch too, once, audited."""
    before = money()
    job = refunded(client, due, completed(client, due, reference="tf_legacy"))
    phase_set("legacy", kill_switch=True)
    call_command("treasury", "reverse", str(job.pk), "--reason", "Due returned it", "--json")
    job.refresh_from_db()
    assert job.status == "reversed" and money() == before and reversals() == 1
    assert audits() == 1
    ledger_verified()


def test_a_reversal_never_takes_usdc_that_pending_withdrawals_hold(client, due, usdc_low):
    """15,000 USDC of the buffer is held for on-chain withdrawals not yet settled (it leaves the
    buffer when they do: treasury.selectors.withdrawals_held, which the cycle never plans to
    take). Reversing a 19,000 USD -> USDC conversion would leave the buffer 1,000 against
    15,000 owed to the chain, so the withdrawals' completion could not be booked. Expected:
    refused like a buffer spent meanwhile (ConversionNotReversible), nothing written. Found:
    reversed; conversion_reversal_post checks only that no buffer row goes below zero."""
    job = refunded(client, due, completed(client, due, reference="tf_held"))
    transaction_post(  # what holds for pending withdrawals leave in withdrawals_pending_usdc
        namespace="test",
        reference_id="held-for-withdrawals",
        kind="opening_balance",
        legs=[
            Leg.debit(Account.objects.get(code="opening_balance_equity_usdc"), Decimal("15000")),
            Leg.credit(Account.objects.get(code="withdrawals_pending_usdc"), Decimal("15000")),
        ],
    )
    assert withdrawals_held("USDC") == 15000 and buffers()["USDC"] == 20000
    after = money()
    with contextlib.suppress(JobRefused):
        job_reverse(job_id=job.pk, actor=OPS, reason="refunded")
    assert buffers()["USDC"] >= withdrawals_held("USDC"), (
        f"reversed: the USDC buffer holds {buffers()['USDC']} for "
        f"{withdrawals_held('USDC')} of pending withdrawals"
    )
    assert money() == after and reversals() == 0 and audits() == 0


# An operator: the wrong job, twice, concurrently, bad input -----------------------------------


def test_the_admin_reverses_only_the_refunded_completed_job_among_the_selected(
    client, due, usdc_low
):
    """Selected together, confirmed twice (a double click): a refunded completed job, a
    completed one Due did not refund, a failed one and a disputed one Due says are refunded.
    Only the first is reversed, once; the others keep what they were and nothing is booked on
    them."""
    refunded_job = refunded(client, due, completed(client, due, reference="tf_a"))
    kept = completed(client, due, reference="tf_b", source="USDC", amount="500")
    failed = job_make(reference="tf_c")
    with due.lock:
        due.conversions["tf_c"] = job_transfer(
            failed, transfer_id="tf_c", status="refund_processed"
        )
    assert told(client, due, "tf_c").json() == {"status": "failed"}
    disputed = job_make(reference="tf_d", amount="100")
    with due.lock:
        transfer = job_transfer(disputed, transfer_id="tf_d", status="payment_processed")
        transfer["destination"]["amount"] = "50"
        due.conversions["tf_d"] = transfer
    assert told(client, due, "tf_d").json() == {"status": "disputed"}
    at_due(due, "tf_d", status="refund_processed")
    told(client, due, "tf_d")
    before = {j.pk: (j.status, j.provider_status) for j in ConversionJob.objects.all()}
    money_before = money()
    client.force_login(User.objects.create_superuser("root", password="a-long-password-1"))
    action = {
        "action": "reverse",
        "_selected_action": [refunded_job.pk, kept.pk, failed.pk, disputed.pk],
        "confirmed": "yes",
        "reason": "the payout came back",
    }
    for _ in range(2):
        assert client.post(CHANGELIST, action).status_code in (200, 302)
    after = {j.pk: (j.status, j.provider_status) for j in ConversionJob.objects.all()}
    assert after == {**before, refunded_job.pk: ("reversed", "refund_processed")}
    assert before[failed.pk] == ("failed", "refund_processed")
    assert before[disputed.pk] == ("disputed", "refund_processed")
    assert reversals() == 1 and audits() == 1
    assert buffers() == {
        "USD": money_before["USD"] + 19000,
        "USDC": money_before["USDC"] - 19000,
    }
    ledger_verified()


def test_refund_redeliveries_racing_operators_reverse_once(client, due, usdc_low):
    """Three operators reverse while Due redelivers the refund three times, all at once: one
    reversal, one audit, the buffers back, no 5xx."""
    before = money()
    job = refunded(client, due, completed(client, due, reference="tf_race_ops"))
    body = json.dumps(due_event(due, "tf_race_ops")).encode()
    outcomes, start = [], threading.Barrier(6)

    def reverse():
        start.wait()
        try:
            outcomes.append(job_reverse(job_id=job.pk, actor=OPS, reason="race").status)
        except JobRefused as exc:
            outcomes.append(type(exc).__name__)
        finally:
            connection.close()

    def redeliver():
        start.wait()
        try:
            response = Client().post(
                DUE_WEBHOOK_URL,
                data=body,
                content_type="application/json",
                headers={"X-Webhook-Signature": due.sign(body)},
            )
            outcomes.append(response.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=f) for f in (reverse, redeliver) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("reversed") == 1 and outcomes.count(200) == 3, outcomes
    assert money() == before and reversals() == 1 and audits() == 1
    ledger_verified()


def test_the_command_refuses_huge_and_malformed_job_ids_writing_nothing(client, due, usdc_low):
    job = refunded(client, due, completed(client, due, reference="tf_ids"))
    after = money()
    for raw in ("9223372036854775807", "9223372036854775808", "0", "-1", "1e3", "0x10", "٣"):
        with pytest.raises(CommandError, match=r"(?i)\bjob\b"):
            call_command("treasury", "reverse", raw, "--reason", "r")
    with pytest.raises(CommandError):
        call_command("treasury", "reverse", str(job.pk), "--reason", "returned\x00")
    assert money() == after and reversals() == 0 and audits() == 0
    assert ConversionJob.objects.get(pk=job.pk).status == "completed"


def test_the_admin_action_with_garbage_selected_ids_answers_and_writes_nothing(
    client, due, usdc_low
):
    job = refunded(client, due, completed(client, due, reference="tf_admin_ids"))
    after = money()
    client.force_login(User.objects.create_superuser("root", password="a-long-password-1"))
    for selected in (["9" * 30], [str(2**63)], [str(2**63 - 1), "-1"]):
        response = client.post(
            CHANGELIST,
            {
                "action": "reverse",
                "_selected_action": selected,
                "confirmed": "yes",
                "reason": "r",
            },
        )
        assert response.status_code < 500, (selected, response.status_code)
    assert money() == after and reversals() == 0 and audits() == 0
    assert ConversionJob.objects.get(pk=job.pk).status == "completed"


def test_a_reason_holding_a_nul_is_refused_naming_it(client, due, usdc_low):
    """job_reverse called directly (a script, a shell) with a reason PostgreSQL cannot store:
    refused like a blank one (JobRefused, naming the reason), nothing booked, nothing audited."""
    job = refunded(client, due, completed(client, due, reference="tf_nul"))
    after = money()
    try:
        job_reverse(job_id=job.pk, actor=OPS, reason="returned\x00")
    except Exception as exc:  # (what it raises is the point)
        raised = exc
    else:
        raised = None
    job.refresh_from_db()
    assert job.status == "completed" and money() == after
    assert reversals() == 0 and audits() == 0
    assert isinstance(raised, JobRefused) and "reason" in str(raised), repr(raised)


# Due's webhooks replayed, forged, raced; Due's answers odd ------------------------------------


def test_a_forged_or_replayed_refund_never_makes_a_job_reversible(client, due, usdc_low, caplog):
    """(1) A refund signed with another key: 400, nothing. (2) A delivery signed by Due whose
    copy says refunded while Due says processed: Due's word is applied. (3) Due's genuine refund
    delivery, captured and replayed after Due took the refund back: Due's current word is
    applied. In no case can the job be reversed on the delivery's copy."""
    job = completed(client, due, reference="tf_forged")
    forged = {"type": "transfer.status_changed", "data": {**due_event(due, "tf_forged")["data"]}}
    forged["data"]["status"] = "refund_processed"
    body = json.dumps(forged).encode()
    response = client.post(
        DUE_WEBHOOK_URL,
        data=body,
        content_type="application/json",
        headers={"X-Webhook-Signature": Ed25519PrivateKey.generate().sign(body).hex()},
    )
    assert response.status_code == 400 and response.json()["error"]["field"] == (
        "X-Webhook-Signature"
    )
    assert webhook_delivered(client, due, forged).json() == {"status": "completed"}
    job.refresh_from_db()
    assert job.provider_status == "payment_processed" and alerts(caplog) == []
    at_due(due, "tf_forged", status="refund_processed")
    captured = due_event(due, "tf_forged")
    webhook_delivered(client, due, captured)
    at_due(due, "tf_forged", status="payment_processed")  # Due took the refund back
    webhook_delivered(client, due, captured)
    job.refresh_from_db()
    assert job.provider_status == "payment_processed"
    with pytest.raises(JobRefused, match="refund_processed"):
        job_reverse(job_id=job.pk, actor=OPS, reason="the delivery said so")
    assert reversals() == 0 and len(postings()) == 1


@pytest.mark.parametrize("path", ["webhook", "watch"])
def test_a_refund_answered_about_another_transfer_is_not_recorded(
    client, due, usdc_low, caplog, path
):
    """GET /v1/transfers/tf_mine answers transfer tf_theirs, refunded: no answer about the job's
    transfer (503 to the webhook, the watch asks next run); the job stays processed, no ALERT,
    nothing reversible."""
    job = completed(client, due, reference="tf_mine")
    with due.lock:
        due.conversions["tf_mine"] = {
            **due.conversions["tf_mine"],
            "id": "tf_theirs",
            "status": "refund_processed",
        }
    if path == "webhook":
        event = {"type": "transfer.status_changed", "data": {"id": "tf_mine"}}
        assert webhook_delivered(client, due, event).status_code == 503
    else:
        ConversionJob.objects.filter(pk=job.pk).update(
            provider_checked_at=timezone.now() - timedelta(hours=2)
        )
        assert monitor_run().watched == 0
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("completed", "payment_processed")
    assert alerts(caplog) == [] and len(postings()) == 1
    with pytest.raises(JobRefused):
        job_reverse(job_id=job.pk, actor=OPS, reason="r")


@pytest.mark.parametrize(
    "status",
    [42, None, ["refund_processed"], {"s": "refund_processed"}, "refund_processed\u0000", "r" * 65],
    ids=["number", "null", "list", "object", "nul", "too-long"],
)
def test_an_odd_status_in_due_s_answer_about_a_completed_job_changes_nothing(
    client, due, usdc_low, caplog, status
):
    job = completed(client, due, reference="tf_odd")
    checked = ConversionJob.objects.get(pk=job.pk).provider_checked_at
    at_due(due, "tf_odd", status=status)
    event = {"type": "transfer.status_changed", "data": {"id": "tf_odd"}}
    assert webhook_delivered(client, due, event).status_code == 503
    ConversionJob.objects.filter(pk=job.pk).update(
        provider_checked_at=timezone.now() - timedelta(hours=2)
    )
    assert monitor_run().watched == 0
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("completed", "payment_processed")
    assert job.provider_checked_at > checked  # asked, no answer: again in an hour
    assert alerts(caplog) == [] and len(postings()) == 1


def test_a_reversed_job_due_then_says_processed_again_is_alerted(client, due, usdc_low, caplog):
    """Reversed (Due had refunded it), then Due says the transfer is `payment_processed` again
    (it paid it out once more): the money moved again while the ledger says it came back. Due's
    status is kept, with an ALERT (found from outside: a reversed job was never alerted)."""
    job = refunded(client, due, completed(client, due, reference="tf_again"))
    job_reverse(job_id=job.pk, actor=OPS, reason="refunded")
    after = money()
    caplog.clear()
    at_due(due, "tf_again", status="payment_processed")
    assert told(client, due, "tf_again").json() == {"status": "reversed"}
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("reversed", "payment_processed")
    assert money() == after and reversals() == 1
    said = [line for line in alerts(caplog) if f"job {job.pk}" in line]
    assert said, "no ALERT: a reversed job Due says is processed again goes unnoticed"


def test_an_answer_read_before_a_newer_one_is_never_applied_after_it(client, due, usdc_low):
    """Two deliveries about one transfer: the first reads `refund_submitted` from Due, whose
    answer is slow to arrive; meanwhile Due processes the refund and a second delivery comes.
    Found from outside: the second recorded `refund_processed`, then the first put its stale
    `refund_submitted` over it (and the job could not be reversed until the watch asked again
    an hour later). One asker per job at a time (job_ask_settle): the second reads after the
    first has applied its answer."""
    job = completed(client, due, reference="tf_stale")
    at_due(due, "tf_stale", status="refund_submitted")
    due.delay, due.slow_reads = 0.6, 1  # (within DUE_HTTP_TIMEOUT: an answer, only late)
    reads_before = due.reads
    body = json.dumps({"type": "transfer.status_changed", "data": {"id": "tf_stale"}}).encode()
    answers: list[int] = []

    def deliver():
        try:
            response = Client().post(
                DUE_WEBHOOK_URL,
                data=body,
                content_type="application/json",
                headers={"X-Webhook-Signature": due.sign(body)},
            )
            answers.append(response.status_code)
        finally:
            connection.close()

    early = threading.Thread(target=deliver)
    early.start()
    deadline = time.monotonic() + 10
    while due.reads == reads_before and time.monotonic() < deadline:  # Due has read it
        time.sleep(0.01)
    at_due(due, "tf_stale", status="refund_processed")
    late = threading.Thread(target=deliver)
    late.start()
    early.join()
    late.join()
    assert answers == [200, 200]
    job.refresh_from_db()
    assert job.provider_status == "refund_processed"
    job_reverse(job_id=job.pk, actor=OPS, reason="returned")
    assert ConversionJob.objects.get(pk=job.pk).status == "reversed"


def test_transfers_due_cannot_show_do_not_starve_the_refund_watch(due, usdc_low, caplog):
    """REFUND_CHECK_BATCH completed jobs whose transfers Due answers 404 for (another Due
    account's, purged): a failed ask leaves provider_checked_at as it was
    (monitor._completed_watch `continue`), so they stay the least recently asked and fill every
    run's batch; a job Due has since refunded is never asked, however many runs go by."""
    provider = ConversionProvider.objects.get(code="due")
    long_ago = timezone.now() - timedelta(hours=3)
    ConversionJob.objects.bulk_create(
        [
            ConversionJob(
                idempotency_key=uuid.uuid4(),
                buffer_currency="USDC",
                source_currency="USD",
                source_amount=Decimal("1"),
                target_currency="USDC",
                target_amount=Decimal("1"),
                provider=provider,
                provider_reference=f"tf_gone_{n}",
                status="completed",
                attempts=1,
                created_by="test",
                finished_at=timezone.now() - timedelta(days=1),
                provider_checked_at=long_ago,
            )
            for n in range(monitor.REFUND_CHECK_BATCH)
        ]
    )
    job = job_make(reference="tf_refunded_quietly")
    with due.lock:
        due.conversions["tf_refunded_quietly"] = job_transfer(
            job, transfer_id="tf_refunded_quietly", status="payment_processed"
        )
    monitor_run()
    job.refresh_from_db()
    assert job.status == "completed"
    at_due(due, "tf_refunded_quietly", status="refund_processed")  # its webhook never came
    ConversionJob.objects.filter(pk=job.pk).update(
        provider_checked_at=timezone.now() - timedelta(hours=2)
    )
    for _ in range(3):
        monitor_run()
    job.refresh_from_db()
    assert job.provider_status == "refund_processed", (
        "the refund was never seen: the watch asked only the transfers Due cannot show"
    )
