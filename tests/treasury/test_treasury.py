"""The treasury against the Due sandbox over real HTTP: cycles create one job per buffer out of
its band, jobs are submitted with their idempotency key and posted once when completed, the
monitor retries, polls and times out, providers fail over; thresholds and the endpoint refuse
bad input and change nothing."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command
from django.db import DatabaseError, IntegrityError, connection, transaction

from cutover.locks import SETTLEMENT_CYCLE_LOCK
from ledger.models import Transaction
from ledger.selectors import ledger_integrity_checks
from tests.cutover.factories import OPERATOR, database_url, phase_set
from tests.treasury.factories import KEY, OPS, RECIPIENT_ENVIRONMENT, SECRET, buffers, fund
from treasury.bands import threshold_set
from treasury.cycle import settlement_cycle_run
from treasury.exceptions import JobRefused, ThresholdInvalid
from treasury.models import BufferThreshold, ConversionJob, ConversionProvider, SettlementCycle
from treasury.monitor import monitor_run
from treasury.operators import job_cancel, job_retry
from treasury.sandbox import DueSandbox
from treasury.selectors import buffer_status_list, source_available
from treasury.submission import jobs_submit
from treasury.tasks import monitor_task, settlement_cycle_task

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent


def test_a_buffer_below_min_is_brought_to_target_once(due, usdc_low):
    result = settlement_cycle_run(triggered_by="test")
    [job] = ConversionJob.objects.all()
    assert result.jobs_created == [job.pk]
    assert (job.buffer_currency, job.source_currency, job.target_currency) == (
        "USDC",
        "USD",
        "USDC",
    )
    assert job.source_amount == Decimal("19000")  # 20,000 target - 1,000
    assert settlement_cycle_run(triggered_by="test").jobs_created == []  # one open job at most
    assert jobs_submit().submitted == 1
    job.refresh_from_db()
    assert job.status == "submitted" and len(due.conversions) == 1
    assert next(iter(due.conversions)) == job.provider_reference
    due.finish(job.provider_reference, "completed")
    assert monitor_run().completed == 1
    assert monitor_run().completed == 0  # the provider answers again: nothing more
    job.refresh_from_db()
    assert job.status == "completed" and job.target_amount == Decimal("19000")
    assert buffers() == {"USDC": Decimal("20000"), "USD": Decimal("41000")}
    assert Transaction.objects.filter(namespace="treasury").count() == 1
    assert [r.state for r in buffer_status_list()] == ["ok", "ok"]
    assert all(check.ok for check in ledger_integrity_checks())


def treasury(*args: str) -> str:
    out = StringIO()
    call_command("treasury", *args, stdout=out)
    return out.getvalue()


def test_the_commands_print_json_and_a_cycle_is_recorded_as_the_operator_s(due, usdc_low):
    cycle = json.loads(treasury("cycle", "--json"))
    [job] = ConversionJob.objects.all()
    assert cycle["jobs_created"] == [job.pk] and cycle["skipped"] == ""
    assert {b["currency"]: b["state"] for b in cycle["buffers"]} == {
        "USDC": "below_min",
        "USD": "ok",
    }
    assert cycle["submitted"]["submitted"] == 1
    assert SettlementCycle.objects.get(pk=cycle["cycle_id"]).triggered_by == OPERATOR
    shown = treasury("cycle")  # for a person: the decisions and what was submitted, no reprs
    assert "already open" in shown and "submitted 0, failed 0" in shown
    assert not set("{}[]'") & set(shown)
    assert set(SettlementCycle.objects.values_list("triggered_by", flat=True)) == {OPERATOR}

    due.finish(job.provider_reference, "completed")
    assert json.loads(treasury("monitor", "--json"))["completed"] == 1
    assert treasury("monitor").startswith("submitted 0, retried 0, polled 0, completed 0")
    status = {row["currency"]: row for row in json.loads(treasury("status", "--json"))}
    assert Decimal(status["USDC"]["balance"]) == Decimal("20000")
    assert status["USDC"]["state"] == "ok"


def test_above_max_converts_the_excess_back(due):
    fund("usdc_buffer", "150000.5")
    fund("fiat_buffer", "60000")
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    assert (job.source_currency, job.target_currency, job.source_amount) == (
        "USDC",
        "USD",
        Decimal("130000.50"),
    )
    jobs_submit()
    job.refresh_from_db()
    due.finish(job.provider_reference, "completed")
    monitor_run()
    assert buffers() == {"USDC": Decimal("20000"), "USD": Decimal("190000.50")}


def test_server_errors_are_retried_and_the_provider_fails_over(due, usdc_low, settings):
    settings.TREASURY_SUBMIT_MAX_ATTEMPTS = 2
    settings.TREASURY_PROVIDER_FAILURE_LIMIT = 2
    settings.DUE_HTTP_ATTEMPTS = 2
    due.fail_next = [500, 503]  # each creation is sent once (no idempotency at Due)
    with DueSandbox(api_key=KEY, api_secret=SECRET, settle="completed") as backup:
        settings.TREASURY_PROVIDER_BASE_URLS = {"backup": backup.base_url}
        ConversionProvider.objects.create(code="backup", name="Backup", priority=20)
        settlement_cycle_run(triggered_by="test")
        assert jobs_submit().retried == 1
        assert jobs_submit().failed == 1
        failed = ConversionJob.objects.get()
        # Every answer was a 5xx: looked for, Due lists no transfer of it.
        assert failed.status == "failed" and failed.attempts == 2 and due.create_calls == 2
        assert "never received" in failed.last_error
        assert not ConversionProvider.objects.get(code="due").healthy
        settlement_cycle_run(triggered_by="test")  # the next job goes to the healthy backup
        job = ConversionJob.objects.exclude(pk=failed.pk).get()
        assert job.provider.code == "backup"
        jobs_submit()
        monitor_run()
    job.refresh_from_db()
    assert job.status == "completed" and buffers()["USDC"] == Decimal("20000")
    assert Transaction.objects.filter(namespace="treasury").count() == 1


def test_a_timed_out_creation_is_found_at_due_not_sent_again(due, usdc_low):
    due.delay = 1.5  # longer than DUE_HTTP_TIMEOUT: the answer never comes, the transfer does
    settlement_cycle_run(triggered_by="test")
    assert jobs_submit().retried == 1
    due.delay = 0
    deadline = time.monotonic() + 10  # (the backoff's wait: Due finishes what it was sent)
    while not due.conversions:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert jobs_submit().submitted == 1
    assert len(due.conversions) == 1 and due.create_calls == 1  # looked for, not sent again
    job = ConversionJob.objects.get()
    assert job.provider_reference == next(iter(due.conversions))


@pytest.mark.parametrize("answered_id", ["c" * 65, "conv_\x00nul", "conv 1", ""])
def test_a_conversion_id_we_cannot_record_is_an_answer_to_ask_again(due, usdc_low, answered_id):
    """Found from outside: an id longer than a job's provider reference (64) in the creation's
    answer made the job's save fail inside the submission run, with the conversion created at
    the provider. Such an answer is read as no answer: the job is asked again by its key."""
    due.on_created = lambda answer: answer.update(id=answered_id)
    settlement_cycle_run(triggered_by="test")
    report = jobs_submit()
    assert report.retried == 1 and report.submitted == 0
    job = ConversionJob.objects.get()
    assert job.status == "pending" and job.provider_reference is None
    assert "id " in job.last_error  # named: its length, its characters, or a NUL
    due.on_created = None
    assert jobs_submit().submitted == 1  # the same key: the conversion created the first time
    job.refresh_from_db()
    assert len(due.conversions) == 1 and job.provider_reference == next(iter(due.conversions))


def test_duplicate_callbacks_and_polls_post_once(due, usdc_low, live_server, settings):
    due.callback = f"{live_server.url}/webhooks/due/conversions"
    due.callback_copies = 3
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    due.finish(job.provider_reference, "completed")  # three signed callbacks
    monitor_run()  # and a poll
    job.refresh_from_db()
    assert job.status == "completed"
    assert Transaction.objects.filter(namespace="treasury").count() == 1
    assert buffers()["USDC"] == Decimal("20000")


def test_a_forged_callback_is_refused_and_changes_nothing(due, usdc_low, client):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    body = json.dumps(
        {
            "type": "transfer.status_changed",
            "data": {
                **due.conversions[job.provider_reference],
                "status": "payment_processed",
                "destination": {"currency": "USDC", "amount": "999999"},
            },
        }
    )
    response = client.post(
        "/webhooks/due/conversions",
        data=body,
        content_type="application/json",
        headers={"X-Webhook-Signature": "0" * 128},
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "X-Webhook-Signature"
    job.refresh_from_db()
    assert job.status == "submitted" and not Transaction.objects.filter(namespace="treasury")


def test_timeout_posts_nothing_and_a_late_completion_is_posted_once(due, usdc_low, settings):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    settings.TREASURY_CONVERSION_TIMEOUT = timedelta(0)
    assert monitor_run().timed_out == 1
    job.refresh_from_db()
    assert job.status == "timed_out" and buffers()["USDC"] == Decimal("1000")
    assert not Transaction.objects.filter(namespace="treasury").exists()
    # Its fate is unknown: it keeps its buffer's slot and its source amount, and is asked again
    # on every run, long after the timeout.
    assert settlement_cycle_run(triggered_by="test").jobs_created == []
    assert source_available("USD") == Decimal("60000") - Decimal("10000") - job.source_amount
    with pytest.raises(JobRefused):
        job_retry(job_id=job.pk, actor=OPS, reason="the provider may still complete it")
    for _ in range(3):
        assert monitor_run().polled == 1
    # The provider completes the timed-out conversion after all: the ledger follows, once.
    due.finish(job.provider_reference, "completed")
    monitor_run()
    monitor_run()
    job.refresh_from_db()
    assert job.status == "completed"
    assert Transaction.objects.filter(namespace="treasury").count() == 1
    assert buffers()["USDC"] == Decimal("20000")


def test_a_failed_conversion_posts_nothing_and_can_be_retried_as_a_new_job(due, usdc_low):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    due.finish(job.provider_reference, "failed")
    assert monitor_run().failed == 1
    job.refresh_from_db()
    assert job.status == "failed" and not Transaction.objects.filter(namespace="treasury")
    again = job_retry(job_id=job.pk, actor=OPS, reason="the provider failed it")
    assert again.idempotency_key != job.idempotency_key and again.status == "pending"
    with pytest.raises(JobRefused):
        job_retry(job_id=job.pk, actor=OPS, reason="again")  # the buffer has an open job
    job_cancel(job_id=again.pk, actor=OPS, reason="treasury desk converts by hand today")
    assert ConversionJob.objects.get(pk=again.pk).status == "cancelled"
    with pytest.raises(JobRefused):
        job_cancel(job_id=again.pk, actor=OPS, reason="twice")


def cycle_killed_once_due_took_the_transfer(due: DueSandbox) -> None:
    """`manage.py treasury cycle` SIGKILLed the moment Due has recorded the transfer it sent,
    before the answer reaches it (nothing of the submission is committed)."""
    child = subprocess.Popen(
        [sys.executable, "manage.py", "treasury", "cycle"],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url(),
            "DUE_API_BASE_URL": due.base_url,
            "DUE_API_KEY": KEY,
            "DUE_API_SECRET": SECRET,
            **RECIPIENT_ENVIRONMENT,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    due.on_created = lambda conversion: os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    due.on_created = None


def test_worker_killed_after_submission_before_recording(due, usdc_low):
    """SIGKILL of `manage.py treasury cycle` after the provider accepted the conversion and
    before we recorded it (its attempt with it); the restart looks first and finds it: one
    transfer, one posting."""
    cycle_killed_once_due_took_the_transfer(due)
    job = ConversionJob.objects.get()
    assert job.status == "pending" and job.provider_reference is None and len(due.conversions) == 1
    assert monitor_run().submitted == 1  # the restarted worker's pass
    job.refresh_from_db()
    assert job.provider_reference == next(iter(due.conversions)) and len(due.conversions) == 1
    due.finish(job.provider_reference, "completed")
    monitor_run()
    assert Transaction.objects.filter(namespace="treasury").count() == 1
    assert buffers()["USDC"] == Decimal("20000")


def test_a_job_killed_after_due_accepted_is_failed_only_on_due_s_word(due, usdc_low, settings):
    """Found from outside: the kill leaves the job pending with no attempt recorded; past the
    timeout (the kill switch on meanwhile, so nothing is submitted) the monitor failed it as
    never sent, without asking Due, which held its transfer: the buffer's slot was freed and
    the next job made a second transfer. Now it is looked for first: found, kept, one transfer."""
    cycle_killed_once_due_took_the_transfer(due)
    job = ConversionJob.objects.get()
    assert (job.status, job.attempts, job.provider_reference) == ("pending", 0, None)
    phase_set("legacy", kill_switch=True)
    settings.TREASURY_CONVERSION_TIMEOUT = timedelta(0)
    monitor_run()
    job.refresh_from_db()
    assert job.status == "submitted" and job.provider_reference == next(iter(due.conversions))
    phase_set("legacy", kill_switch=False)
    assert settlement_cycle_run(triggered_by="test").jobs_created == []  # the slot is held
    due.finish(job.provider_reference, "completed")
    monitor_run()
    assert (
        len(due.conversions) == 1 and Transaction.objects.filter(namespace="treasury").count() == 1
    )


def test_kill_switch_stops_submission(due, usdc_low):
    settlement_cycle_run(triggered_by="test")  # created before the switch
    phase_set("legacy", kill_switch=True)
    assert jobs_submit().submitted == 0 and monitor_run().submitted == 0
    assert due.create_calls == 0 and ConversionJob.objects.get().status == "pending"


def test_the_database_refuses_illegal_job_transitions(due, usdc_low):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    due.finish(job.provider_reference, "completed")
    monitor_run()
    for change in (
        "UPDATE treasury_conversion_jobs SET status = 'pending'",
        "UPDATE treasury_conversion_jobs SET status = 'failed'",
        "UPDATE treasury_conversion_jobs SET source_amount = 1",
    ):
        with (
            pytest.raises(DatabaseError, match="conversion job"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(change)
    with pytest.raises(IntegrityError), transaction.atomic():  # a second open job for USDC
        for _ in range(2):
            ConversionJob.objects.create(
                idempotency_key=uuid.uuid4(),
                buffer_currency="USDC",
                source_currency="USD",
                source_amount=1,
                target_currency="USDC",
                provider=job.provider,
                created_by="t",
            )


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"minimum": Decimal(10), "target": Decimal(5), "maximum": Decimal(20)}, "minimum"),
        ({"minimum": Decimal(1), "target": Decimal(30), "maximum": Decimal(20)}, "maximum"),
        ({"minimum": Decimal(-1), "target": Decimal(5), "maximum": Decimal(20)}, "minimum"),
        ({"minimum": Decimal(1), "target": Decimal("5.0000001"), "maximum": Decimal(20)}, "target"),
    ],
)
def test_threshold_validation_names_the_field_and_changes_nothing(values, field):
    before = list(BufferThreshold.objects.values())
    with pytest.raises(ThresholdInvalid) as refused:
        threshold_set(currency="USDC", **values, actor=OPS, reason="test")
    assert refused.value.field == field
    assert list(BufferThreshold.objects.values()) == before


def test_trigger_cycle_needs_the_admin_token(client, settings, due, usdc_low):
    settings.ADMIN_TOKEN = "admin-secret"
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 403),
        ({"Authorization": "Basic admin-secret"}, 401),
    ):
        response = client.post("/internal/treasury/trigger-cycle", headers=headers)
        assert response.status_code == status
        assert response.json()["error"]["field"] == "Authorization"
    assert not SettlementCycle.objects.exists() and not ConversionJob.objects.exists()
    response = client.post(
        "/internal/treasury/trigger-cycle", headers={"Authorization": "Bearer admin-secret"}
    )
    assert response.status_code == 200
    assert response.json()["submitted"]["submitted"] == 1
    assert ConversionJob.objects.get().status == "submitted"


def test_trigger_cycle_while_another_runs_is_our_error_and_changes_nothing(
    client, settings, due, usdc_low
):
    """Another scheduler holds the cycle's lock: the trigger is refused with our error body
    (409, `cycle_running`), and neither a cycle nor a job is written."""
    settings.ADMIN_TOKEN = "admin-secret"
    with psycopg.connect(database_url(), autocommit=False) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", [SETTLEMENT_CYCLE_LOCK])
        response = client.post(
            "/internal/treasury/trigger-cycle", headers={"Authorization": "Bearer admin-secret"}
        )
    assert response.status_code == 409
    assert response.json() == {
        "error": {"code": "cycle_running", "message": "another settlement cycle is running"}
    }
    assert not SettlementCycle.objects.exists() and not ConversionJob.objects.exists()


def test_scheduled_work_does_nothing_while_the_scheduler_is_disabled(due, usdc_low, settings):
    settings.ENABLE_TREASURY_SCHEDULER = False
    assert settlement_cycle_task() == {"skipped": "ENABLE_TREASURY_SCHEDULER is off"}
    assert monitor_task() == {"skipped": "ENABLE_TREASURY_SCHEDULER is off"}
    assert not SettlementCycle.objects.exists() and not ConversionJob.objects.exists()
    settings.ENABLE_TREASURY_SCHEDULER = True
    assert settlement_cycle_task()["submitted"] == 1


def test_metrics_carry_the_treasury_series(client, settings, due, usdc_low):
    settings.METRICS_TOKEN = "metrics-secret"
    settlement_cycle_run(triggered_by="test")
    body = client.get("/metrics", headers={"Authorization": "Bearer metrics-secret"})
    body = body.content.decode()
    for name in (
        "treasury_buffer_check_total",
        "treasury_conversion_jobs_created_total",
        "treasury_settlement_cycle_duration_ms_bucket",
        "conversion_jobs_failed_total",
        "system_buffer_usdc",
    ):
        assert name in body
