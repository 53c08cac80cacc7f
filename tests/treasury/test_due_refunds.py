"""A conversion Due refunds after it was processed (an ACH return of the payout, say: Due
documents `refund_submitted` and `refund_processed` but not when they can follow
`payment_processed`, tests/treasury/fixtures/due/SOURCES.md 2.5). The ledger booked the
conversion; Due now says the money went back. Nothing is reversed on Due's word alone: the job
keeps Due's status with an ALERT, and an operator who has seen the source money come back
reverses the posting, once, audited. A job failed that Due later processes is alerted the same
way."""

import json
import threading
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.exceptions import OperatorNotPermitted
from cutover.models import OperatorAudit
from ledger.models import Transaction
from tests.cutover.factories import phase_set
from tests.treasury.factories import (
    OPS,
    buffers,
    job_make,
    job_transfer,
    spend,
    webhook_delivered,
)
from treasury.exceptions import JobRefused, JobTransitionRefused, treasury_rules
from treasury.models import ConversionJob
from treasury.monitor import monitor_run
from treasury.operators import job_reverse

pytestmark = pytest.mark.django_db(transaction=True)


def refunded_job(client, due, *, statuses=("refund_submitted", "refund_processed")):
    """A 19,000 USD -> USDC job Due processed (posted through its webhook), then took back
    through `statuses`, each announced by its webhook."""
    job = job_make(reference="tf_returned")
    transfer = job_transfer(job, transfer_id="tf_returned", status="payment_processed")
    with due.lock:
        due.conversions["tf_returned"] = transfer
    assert webhook_delivered(client, due, due_event(due, "tf_returned")).json() == {
        "status": "completed"
    }
    for status in statuses:
        with due.lock:
            due.conversions["tf_returned"]["status"] = status
        response = webhook_delivered(client, due, due_event(due, "tf_returned"))
        assert response.status_code == 200 and response.json() == {"status": "completed"}
    job.refresh_from_db()
    return job


def due_event(due, transfer_id: str) -> dict:
    with due.lock:
        return {"type": "transfer.status_changed", "data": dict(due.conversions[transfer_id])}


def postings() -> list[tuple[str, str]]:
    return list(
        Transaction.objects.filter(namespace="treasury")
        .order_by("pk")
        .values_list("kind", "reference_id")
    )


def alerts(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]


def test_a_refund_of_a_processed_conversion_is_recorded_and_alerted_not_reversed(
    client, due, usdc_low, caplog
):
    before = buffers()
    job = refunded_job(client, due)
    assert (job.status, job.provider_status) == ("completed", "refund_processed")
    assert buffers() == {"USD": before["USD"] - 19000, "USDC": before["USDC"] + 19000}
    assert postings() == [("conversion", f"conversion:{job.idempotency_key}")]
    said = alerts(caplog)
    assert len(said) == 2 and all("refund" in line and f"job {job.pk}" in line for line in said)
    # Due's redeliveries (and the same status again) record and alert nothing more.
    for _ in range(2):
        webhook_delivered(client, due, due_event(due, "tf_returned"))
    assert len(alerts(caplog)) == 2 and postings() == [
        ("conversion", f"conversion:{job.idempotency_key}")
    ]


@pytest.mark.parametrize("phase", ["shadow", "cutover"])
def test_an_operator_reverses_a_refunded_conversion_once(client, due, usdc_low, phase):
    phase_set(phase, kill_switch=True)  # it books money that already moved back
    before = buffers()
    job = refunded_job(client, due)
    reversed_job = job_reverse(job_id=job.pk, actor=OPS, reason="Due returned the ACH payout")
    assert reversed_job.status == "reversed"
    assert buffers() == before
    key = job.idempotency_key
    assert postings() == [
        ("conversion", f"conversion:{key}"),
        ("conversion_reversal", f"conversion-reversal:{key}"),
    ]
    audit = OperatorAudit.objects.get(action="job.reverse")
    assert (audit.actor, audit.target, audit.reason) == (
        "cli:ops",
        f"job:{job.pk}",
        "Due returned the ACH payout",
    )
    assert (audit.before["status"], audit.after["status"]) == ("completed", "reversed")
    with pytest.raises(JobRefused, match="reversed"):
        job_reverse(job_id=job.pk, actor=OPS, reason="again")
    # Due's later deliveries change nothing of a reversed job.
    webhook_delivered(client, due, due_event(due, "tf_returned"))
    assert buffers() == before and len(postings()) == 2
    assert OperatorAudit.objects.filter(action="job.reverse").count() == 1


@pytest.mark.parametrize(
    "statuses", [(), ("refund_submitted",)], ids=["processed", "refund-in-flight"]
)
def test_a_conversion_due_has_not_refunded_is_not_reversed(client, due, usdc_low, statuses):
    job = refunded_job(client, due, statuses=statuses)
    after = buffers()
    with pytest.raises(JobRefused, match="refund_processed"):
        job_reverse(job_id=job.pk, actor=OPS, reason="looks wrong")
    job.refresh_from_db()
    assert job.status == "completed" and buffers() == after and len(postings()) == 1
    assert not OperatorAudit.objects.filter(action="job.reverse").exists()


def test_a_reversal_needs_a_reason_and_the_permission(client, due, usdc_low):
    job = refunded_job(client, due)
    clerk = User.objects.create_user("clerk", password="a-long-password-1")
    with pytest.raises(OperatorNotPermitted):
        job_reverse(job_id=job.pk, actor=Actor.for_user(clerk), reason="no permission")
    with pytest.raises(JobRefused, match="reason"):
        job_reverse(job_id=job.pk, actor=OPS, reason="  ")
    clerk.user_permissions.add(Permission.objects.get(codename="change_conversionjob"))
    job_reverse(job_id=job.pk, actor=Actor.for_user(User.objects.get(pk=clerk.pk)), reason="ok")
    assert ConversionJob.objects.get(pk=job.pk).status == "reversed" and len(postings()) == 2


def test_a_reversal_the_target_buffer_cannot_give_is_refused_and_changes_nothing(
    client, due, usdc_low
):
    """The USDC the conversion brought was spent since (here: withdrawn to equity): the
    reversal would take the buffer below zero. Refused naming the buffer; nothing written."""
    job = refunded_job(client, due)
    spend("usdc_buffer", buffers()["USDC"] - 10)
    after = buffers()
    with pytest.raises(JobRefused, match="USDC buffer"):
        job_reverse(job_id=job.pk, actor=OPS, reason="Due returned it")
    job.refresh_from_db()
    assert job.status == "completed" and buffers() == after and len(postings()) == 1


def test_concurrent_reversals_post_once(client, due, usdc_low):
    job = refunded_job(client, due)
    outcomes, start = [], threading.Barrier(4)

    def reverse():
        start.wait()
        try:
            outcomes.append(job_reverse(job_id=job.pk, actor=OPS, reason="race").status)
        except JobRefused as exc:
            outcomes.append(str(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=reverse) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("reversed") == 1, outcomes
    assert len(postings()) == 2 and OperatorAudit.objects.filter(action="job.reverse").count() == 1


def test_a_failed_job_due_later_processes_is_alerted_and_recorded(client, due, usdc_low, caplog):
    """The other contradiction: the job failed (Due said `canceled`), then Due says the
    transfer was processed. Nothing is posted on it (a failed job's money never left, as far as
    the ledger knows); Due's status is kept and an operator alerted, once."""
    job = job_make(reference="tf_revived")
    with due.lock:
        due.conversions["tf_revived"] = job_transfer(
            job, transfer_id="tf_revived", status="canceled"
        )
    assert webhook_delivered(client, due, due_event(due, "tf_revived")).json() == {
        "status": "failed"
    }
    with due.lock:
        due.conversions["tf_revived"]["status"] = "payment_processed"
    for _ in range(2):
        response = webhook_delivered(client, due, due_event(due, "tf_revived"))
        assert response.status_code == 200 and response.json() == {"status": "failed"}
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("failed", "payment_processed")
    assert postings() == []
    assert len([line for line in alerts(caplog) if "payment_processed" in line]) == 1


def test_a_final_job_changes_only_by_its_rules(client, due, usdc_low):
    """In the database: a completed job may only record Due's status or become reversed; a
    failed one never becomes reversed; what a final job says it booked never changes."""
    job = refunded_job(client, due)
    for change in ({"target_amount": Decimal("1")}, {"ledger_transaction_id": 1}):
        with pytest.raises(JobTransitionRefused), treasury_rules(), transaction.atomic():
            ConversionJob.objects.filter(pk=job.pk).update(**change)
    failed = job_make(reference="tf_failed", status="failed", source="USDC", amount="5")
    with pytest.raises(JobTransitionRefused), treasury_rules(), transaction.atomic():
        ConversionJob.objects.filter(pk=failed.pk).update(status="reversed")
    job_reverse(job_id=job.pk, actor=OPS, reason="returned")
    with pytest.raises(JobTransitionRefused), treasury_rules(), transaction.atomic():
        ConversionJob.objects.filter(pk=job.pk).update(status="completed")
    assert ConversionJob.objects.get(pk=job.pk).status == "reversed"


def test_the_console_shows_due_s_status_and_reverses_after_confirmation(client, due, usdc_low):
    before = buffers()
    job = refunded_job(client, due)
    admin = User.objects.create_superuser("root", password="a-long-password-1")
    client.force_login(admin)
    changelist = "/admin/treasury/conversionjob/"
    listed = client.get(changelist, {"provider_status": "refund_processed"})
    assert listed.status_code == 200 and f">{job.pk}<" in listed.content.decode()
    action = {"action": "reverse", "_selected_action": [job.pk]}
    confirm = client.post(changelist, action)
    assert confirm.status_code == 200 and "reason" in confirm.content.decode()
    assert ConversionJob.objects.get(pk=job.pk).status == "completed"  # not before confirming
    client.post(changelist, {**action, "confirmed": "yes", "reason": "the payout came back"})
    assert ConversionJob.objects.get(pk=job.pk).status == "reversed" and buffers() == before
    assert OperatorAudit.objects.get(action="job.reverse").actor == "admin:root"


def test_the_command_reverses_and_names_what_it_refuses(client, due, usdc_low):
    job = refunded_job(client, due)
    for args, message in (
        (["reverse", "999999", "--reason", "r"], "JOB: no conversion job 999999"),
        (["reverse", str(job.pk), "--reason", " "], "needs a written --reason"),
    ):
        with pytest.raises(CommandError, match=message):
            call_command("treasury", *args)
    assert len(postings()) == 1
    out = StringIO()
    call_command("treasury", "reverse", str(job.pk), "--reason", "returned", "--json", stdout=out)
    answer = json.loads(out.getvalue())
    assert (answer["job"], answer["status"]) == (job.pk, "reversed")
    assert (
        answer["reversal_transaction_id"] == Transaction.objects.get(kind="conversion_reversal").pk
    )
    with pytest.raises(CommandError, match="is reversed; only a completed job is reversed"):
        call_command("treasury", "reverse", str(job.pk), "--reason", "again")


# Without the webhook: the monitor asks again -------------------------------------------------


def completed_by_a_poll(due, reference: str) -> ConversionJob:
    """A 19,000 USD -> USDC job Due processed, completed by the monitor's poll (no webhook),
    Due last asked about it two hours ago."""
    job = job_make(reference=reference)
    with due.lock:
        due.conversions[reference] = job_transfer(
            job, transfer_id=reference, status="payment_processed"
        )
    assert monitor_run().completed == 1
    job.refresh_from_db()
    assert job.status == "completed" and job.provider_checked_at is not None
    with due.lock:
        due.conversions[reference]["status"] = "refund_processed"
    assert monitor_run().watched == 0  # asked when it completed: not again within the hour
    ConversionJob.objects.filter(pk=job.pk).update(
        provider_checked_at=timezone.now() - timedelta(hours=2)
    )
    job.refresh_from_db()
    return job


def test_the_monitor_asks_due_again_about_completed_jobs_and_finds_a_refund(due, usdc_low, caplog):
    """Due's webhook for the refund never came (the endpoint's key unset, a lost delivery): the
    monitor asks Due about each job completed within TREASURY_REFUND_WATCH, at most once an hour
    each, and records the refund with its ALERT, as the webhook would have."""
    job = completed_by_a_poll(due, "tf_quiet")
    report = monitor_run()
    job.refresh_from_db()
    assert (report.watched, job.provider_status) == (1, "refund_processed")
    assert len([line for line in alerts(caplog) if "refund_processed" in line]) == 1
    checked = job.provider_checked_at
    assert monitor_run().watched == 0  # within the hour: not asked again
    job.refresh_from_db()
    assert job.provider_checked_at == checked and len(postings()) == 1
    job_reverse(job_id=job.pk, actor=OPS, reason="the ACH payout came back")
    assert ConversionJob.objects.get(pk=job.pk).status == "reversed"


def test_a_job_completed_before_the_watch_is_not_asked(due, usdc_low, settings):
    settings.TREASURY_REFUND_WATCH = timedelta(days=60)
    job = completed_by_a_poll(due, "tf_old")
    with connection.cursor() as cursor:  # finished 61 days ago (the rules refuse it: moved)
        cursor.execute("ALTER TABLE treasury_conversion_jobs DISABLE TRIGGER USER")
        cursor.execute(
            "UPDATE treasury_conversion_jobs SET finished_at = now() - interval '61 days' "
            "WHERE id = %s",
            [job.pk],
        )
        cursor.execute("ALTER TABLE treasury_conversion_jobs ENABLE TRIGGER USER")
    assert monitor_run().watched == 0
    checked = job.provider_checked_at
    job.refresh_from_db()
    assert (job.provider_status, job.provider_checked_at) == ("payment_processed", checked)


def test_due_unreachable_for_a_watched_job_changes_nothing_and_it_is_asked_an_hour_later(
    due, usdc_low
):
    """Asked, answered or not, a job waits an hour for its next ask: jobs Due cannot show never
    hold the batch's places (found from outside: they stayed the least recently asked)."""
    job = completed_by_a_poll(due, "tf_flaky")
    checked = job.provider_checked_at
    due.unavailable = True  # every call a 503
    assert monitor_run().watched == 0
    job.refresh_from_db()
    assert job.provider_status == "payment_processed" and job.provider_checked_at > checked
    due.unavailable = False
    assert monitor_run().watched == 0  # within the hour
    ConversionJob.objects.filter(pk=job.pk).update(
        provider_checked_at=timezone.now() - timedelta(hours=2)
    )
    job.refresh_from_db()
    checked = job.provider_checked_at
    assert monitor_run().watched == 1
    job.refresh_from_db()
    assert job.provider_status == "refund_processed" and job.provider_checked_at > checked


def test_a_completed_job_with_no_conversion_posted_is_not_reversed(client, due, usdc_low):
    """A job marked completed by hand (a migration, a repair) with no conversion in the
    ledger, or naming another posting: a reversal would mint the conversion's money."""
    job = refunded_job(client, due)
    other = job_make(reference="tf_by_hand", status="submitted")
    with connection.cursor() as cursor:  # (the rules refuse it: written past them)
        cursor.execute("ALTER TABLE treasury_conversion_jobs DISABLE TRIGGER USER")
        cursor.execute(
            "UPDATE treasury_conversion_jobs SET status = 'completed', target_amount = 19000, "
            "provider_status = 'refund_processed', ledger_transaction_id = %s WHERE id = %s",
            [job.ledger_transaction_id, other.pk],  # the first job's posting
        )
        cursor.execute("ALTER TABLE treasury_conversion_jobs ENABLE TRIGGER USER")
    after = buffers()
    with pytest.raises(JobRefused, match="no conversion posted"):
        job_reverse(job_id=other.pk, actor=OPS, reason="by hand")
    assert buffers() == after and len(postings()) == 1
    assert ConversionJob.objects.get(pk=other.pk).status == "completed"


def test_a_reversal_asks_due_now_and_never_acts_on_a_refund_due_took_back(client, due, usdc_low):
    """The job says `refund_processed` (its webhook came), but Due has since processed the
    transfer again: the reversal asks Due, records what it says now, and reverses nothing.
    Due unreachable: refused, nothing written."""
    job = refunded_job(client, due)
    after = buffers()
    due.unavailable = True
    with pytest.raises(JobRefused, match="cannot be asked now"):
        job_reverse(job_id=job.pk, actor=OPS, reason="returned")
    due.unavailable = False
    with due.lock:
        due.conversions["tf_returned"]["status"] = "payment_processed"
    with pytest.raises(JobRefused, match="payment_processed, not refund_processed"):
        job_reverse(job_id=job.pk, actor=OPS, reason="returned")
    job.refresh_from_db()
    assert (job.status, job.provider_status) == ("completed", "payment_processed")
    assert buffers() == after and len(postings()) == 1
    assert not OperatorAudit.objects.filter(action="job.reverse").exists()
