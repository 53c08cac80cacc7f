"""Issue 9's treasury money paths, against the Due sandbox over real HTTP: a conversion whose
answer was lost is never called failed without the provider saying so (item 4); a cycle never
drains one buffer below its own minimum to fill another (item 5); the kill switch stops new
conversions but not the booking of completions (item 15); providers' hosts come from the
settings and every operator action is audited (item 17); the jobs' state trigger reaches
callers as a domain error (item 13); Due's balances (item 2)."""

import logging
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.db import transaction

from cutover.actors import Actor
from cutover.exceptions import OperatorNotPermitted
from cutover.models import OperatorAudit
from ledger.models import Transaction
from ledger.selectors import ledger_integrity_checks
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import system, withdraw
from tests.treasury.factories import KEY, OPS, SECRET, buffers, fund
from treasury import due as due_client
from treasury.bands import provider_set, threshold_set
from treasury.cycle import KILL_SWITCH_NOTE, settlement_cycle_run
from treasury.exceptions import (
    DueUnavailable,
    JobRefused,
    JobTransitionRefused,
    ProviderInvalid,
    ThresholdInvalid,
    treasury_rules,
)
from treasury.models import BufferThreshold, ConversionJob, ConversionProvider, SettlementCycle
from treasury.monitor import monitor_run
from treasury.operators import job_cancel, job_retry
from treasury.sandbox import DueSandbox
from treasury.selectors import source_available
from treasury.settlement import job_settle
from treasury.submission import jobs_submit

pytestmark = pytest.mark.django_db(transaction=True)


def treasury_postings() -> int:
    return Transaction.objects.filter(namespace="treasury").count()


# Item 4: a conversion whose answer was lost ------------------------------------------------


@pytest.fixture
def answers_lost(due, settings):
    """Two submissions of one HTTP attempt each, and Due accepts but every answer is lost."""
    settings.DUE_HTTP_ATTEMPTS = 1
    settings.TREASURY_SUBMIT_MAX_ATTEMPTS = 2
    due.lose_answers = 100
    return due


def test_a_submit_whose_answer_is_lost_after_due_accepted_is_never_failed(
    due, answers_lost, usdc_low, settings, caplog
):
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    assert jobs_submit().retried == 1  # accepted by Due, answer lost
    due.unavailable = True  # and then Due cannot say what it has: never sent again blindly
    assert jobs_submit().retried == 1
    settings.TREASURY_CONVERSION_TIMEOUT = timedelta(0)
    with caplog.at_level(logging.ERROR, logger="treasury.submission"):
        assert monitor_run().timed_out == 1
    job.refresh_from_db()
    assert job.status == "timed_out" and job.provider_reference is None
    assert "ALERT treasury" in caplog.text and len(due.conversions) == 1
    # Fate unknown: retry refused, the slot and the source amount held, however long it takes.
    with pytest.raises(JobRefused, match="only a job the provider failed"):
        job_retry(job_id=job.pk, actor=OPS, reason="it looks failed")
    for _ in range(3):
        monitor_run()
        assert settlement_cycle_run(triggered_by="test").jobs_created == []
    job.refresh_from_db()
    assert job.status == "timed_out"
    assert source_available("USD") == Decimal("60000") - Decimal("10000") - Decimal("19000")
    # Due answers again: the look-up finds the transfer; Due completes it late.
    due.unavailable = False
    monitor_run()
    job.refresh_from_db()
    assert job.provider_reference == next(iter(due.conversions)) and job.status == "timed_out"
    due.finish(job.provider_reference, "completed")
    monitor_run()
    monitor_run()
    job.refresh_from_db()
    assert job.status == "completed" and treasury_postings() == 1
    assert buffers() == {"USDC": Decimal("20000"), "USD": Decimal("41000")}
    with pytest.raises(JobRefused):
        job_retry(job_id=job.pk, actor=OPS, reason="once more")
    assert len(due.conversions) == 1 and ConversionJob.objects.count() == 1
    assert all(check.ok for check in ledger_integrity_checks())


def test_a_webhook_about_a_job_whose_answer_was_lost_waits_for_its_look_up(
    due, answers_lost, usdc_low, live_server, settings
):
    """Due's event names only its transfer, which no job holds yet (the creation's answer was
    lost): nothing is applied from it; once Due can be asked, the job's look-up by key finds
    the transfer and the completion is posted, once."""
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    due.unavailable = True  # Due cannot be asked: the job's fate is unknown
    settings.TREASURY_CONVERSION_TIMEOUT = timedelta(0)
    monitor_run()
    job = ConversionJob.objects.get()
    assert job.status == "timed_out" and job.provider_reference is None
    due.unavailable = False
    due.callback = f"{live_server.url}/webhooks/due/conversions"
    due.callback_copies = 2
    due.finish(next(iter(due.conversions)), "completed")  # two deliveries, both 200 "ignored"
    job.refresh_from_db()
    assert job.status == "timed_out" and treasury_postings() == 0
    monitor_run()
    job.refresh_from_db()
    assert job.status == "completed" and job.provider_reference == next(iter(due.conversions))
    assert treasury_postings() == 1 and buffers()["USDC"] == Decimal("20000")


def test_a_lost_answer_found_by_key_is_submitted_not_failed(due, answers_lost, usdc_low):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    assert jobs_submit().submitted == 1  # attempts spent: asked by key, Due has it
    job = ConversionJob.objects.get()
    assert job.status == "submitted" and job.provider_reference == next(iter(due.conversions))
    due.finish(job.provider_reference, "completed")
    monitor_run()
    job.refresh_from_db()
    assert job.status == "completed" and treasury_postings() == 1 and len(due.conversions) == 1


def test_a_refused_resend_after_a_lost_answer_is_looked_up_not_failed(due, answers_lost, usdc_low):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()  # accepted, answer lost
    due.lose_answers = 0
    due.fail_next = [422]  # the resend is refused: that says nothing of the first send
    assert jobs_submit().submitted == 1
    job = ConversionJob.objects.get()
    assert job.status == "submitted" and job.provider_reference == next(iter(due.conversions))


def test_a_job_due_never_received_fails_and_only_then_may_be_retried(due, usdc_low, settings):
    settings.DUE_HTTP_ATTEMPTS = 1
    settings.TREASURY_SUBMIT_MAX_ATTEMPTS = 2
    due.fail_next = [503, 503]  # refused before anything was recorded
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    assert jobs_submit().failed == 1
    job = ConversionJob.objects.get()
    assert job.status == "failed" and "never received" in job.last_error and not due.conversions
    again = job_retry(job_id=job.pk, actor=OPS, reason="Due never received it")
    assert again.status == "pending" and again.source_amount == job.source_amount


def test_a_sent_job_is_not_cancelled(due, answers_lost, usdc_low):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()  # sent once, answer lost
    job = ConversionJob.objects.get()
    with pytest.raises(JobRefused, match="may exist at the provider"):
        job_cancel(job_id=job.pk, actor=OPS, reason="looks stuck")
    assert ConversionJob.objects.get().status == "pending"


@pytest.mark.parametrize(
    ("source_amount", "destination_amount", "outcome"),
    [
        (None, "18999.5", "completed"),  # within 1 % below 1:1 (a fee)
        (None, "18000", "disputed"),  # more than 1 % short
        (None, "19000.01", "disputed"),  # more than 1:1
        (None, "19000.0000001", "disputed"),  # beyond USDC's 6 places
        ("19001", None, "disputed"),  # not the job's source amount
    ],
)
def test_completed_amounts_must_match_the_job(
    due,
    usdc_low,
    caplog,
    source_amount,
    destination_amount,
    outcome,
):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    if source_amount:
        due.conversions[job.provider_reference]["source"]["amount"] = source_amount
    due.finish(job.provider_reference, "completed", destination_amount=destination_amount)
    with caplog.at_level(logging.ERROR, logger="treasury.settlement"):
        monitor_run()
        monitor_run()
    job.refresh_from_db()
    assert job.status == outcome
    if outcome == "completed":
        assert job.target_amount == Decimal(destination_amount) and treasury_postings() == 1
        return
    assert treasury_postings() == 0 and buffers()["USDC"] == Decimal("1000")
    assert "ALERT treasury" in caplog.text and "disputed" in caplog.text
    assert "not posted" in job.last_error
    # Left for an operator: not retried, and its source amount stays reserved.
    with pytest.raises(JobRefused):
        job_retry(job_id=job.pk, actor=OPS, reason="again")
    assert source_available("USD") == Decimal("60000") - Decimal("10000") - Decimal("19000")


@pytest.mark.parametrize("source", [["USD", "19000"], "19000 USD"])
def test_a_completion_whose_source_is_no_object_is_disputed(due, usdc_low, source):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    due.finish(job.provider_reference, "completed")
    due.conversions[job.provider_reference]["source"] = source
    monitor_run()
    job.refresh_from_db()
    assert job.status == "disputed" and "source currency None" in job.last_error
    assert treasury_postings() == 0 and buffers()["USDC"] == Decimal("1000")


# Item 5: a cycle never drains one buffer to fill another ------------------------------------


def _complete_all(due) -> None:
    jobs_submit()
    for job in ConversionJob.objects.exclude(provider_reference=None):
        due.finish(job.provider_reference, "completed")
    monitor_run()


def test_usdc_above_max_and_usd_empty_leaves_usdc_in_its_band(due):
    fund("usdc_buffer", "150000")
    result = settlement_cycle_run(triggered_by="test")
    jobs = ConversionJob.objects.order_by("pk")
    assert len(result.jobs_created) == 2
    assert [(j.buffer_currency, j.source_currency, j.source_amount) for j in jobs] == [
        ("USD", "USDC", Decimal("50000")),  # USD to its target
        ("USDC", "USDC", Decimal("80000")),  # the excess less what the USD job takes
    ]
    _complete_all(due)
    assert buffers() == {"USDC": Decimal("20000"), "USD": Decimal("130000")}


def test_a_source_in_its_band_gives_only_what_it_holds_above_its_minimum(due):
    fund("usdc_buffer", "30000")
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    assert (job.source_currency, job.source_amount) == ("USDC", Decimal("25000"))
    assert settlement_cycle_run(triggered_by="test").jobs_created == []
    _complete_all(due)
    assert buffers() == {"USDC": Decimal("5000"), "USD": Decimal("25000")}


def test_a_source_keeps_what_pending_withdrawals_will_take_from_it(due):
    """USDC held for a withdrawal not yet settled leaves the buffer when it settles: a
    conversion may not take it too (the money model's nightly found a job that, once such a
    withdrawal completed, took the USDC buffer below its minimum)."""
    phase_set("shadow")
    user = legacy_user("4000")
    ledger_balance_set(user, "4000")
    fund("usdc_buffer", "30000")
    withdraw(user, amount="4000")
    assert system("withdrawals_pending_usdc") == Decimal("4000")
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    assert (job.source_currency, job.source_amount) == ("USDC", Decimal("21000"))


def test_both_buffers_below_minimum_create_no_job(due, caplog):
    fund("usdc_buffer", "1000")
    fund("fiat_buffer", "2000")
    with caplog.at_level(logging.ERROR, logger="treasury.cycle"):
        result = settlement_cycle_run(triggered_by="test")
    assert result.jobs_created == [] and not ConversionJob.objects.exists()
    assert [b["action"] for b in SettlementCycle.objects.get().buffers] == [
        "USDC buffer has nothing above its minimum",
        "USD buffer has nothing above its minimum",
    ]
    assert "ALERT treasury" in caplog.text


# Item 15: the kill switch -------------------------------------------------------------------


def test_kill_switch_cycle_creates_no_job_and_says_why(due, usdc_low):
    phase_set("legacy", kill_switch=True)
    result = settlement_cycle_run(triggered_by="test")
    assert result.jobs_created == [] and result.note == KILL_SWITCH_NOTE
    cycle = SettlementCycle.objects.get()
    assert cycle.note == KILL_SWITCH_NOTE and not ConversionJob.objects.exists()
    assert [b["action"] for b in cycle.buffers] == ["none", KILL_SWITCH_NOTE]


def test_kill_switch_refuses_retry_and_still_books_completions(due, usdc_low):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    phase_set("legacy", kill_switch=True)
    due.finish(job.provider_reference, "completed")  # money that already moved at Due
    assert monitor_run().completed == 1
    job.refresh_from_db()
    assert job.status == "completed" and treasury_postings() == 1
    failed = ConversionJob.objects.create(
        idempotency_key="00000000-0000-0000-0000-000000000001",
        buffer_currency="USD",
        source_currency="USDC",
        source_amount=Decimal("10"),
        target_currency="USD",
        provider=job.provider,
        created_by="test",
        status="failed",
    )
    with pytest.raises(JobRefused, match="kill switch"):
        job_retry(job_id=failed.pk, actor=OPS, reason="convert anyway")
    assert ConversionJob.objects.count() == 2 and not OperatorAudit.objects.exists()


# Item 17: providers' hosts from the settings; operator actions audited ---------------------


def test_a_provider_host_comes_from_the_settings_only(due, usdc_low, settings):
    ConversionProvider.objects.create(code="rogue", name="Rogue", priority=1)
    settlement_cycle_run(triggered_by="test")  # rogue has no host in the settings: not picked
    assert ConversionJob.objects.get().provider.code == "due"
    assert "base_url" not in {f.name for f in ConversionProvider._meta.get_fields()}
    ConversionJob.objects.update(status="cancelled")
    with DueSandbox(api_key=KEY, api_secret=SECRET, settle="completed") as other:
        settings.TREASURY_PROVIDER_BASE_URLS = {"rogue": other.base_url}
        settlement_cycle_run(triggered_by="test")
        jobs_submit()
        assert len(other.conversions) == 1 and len(due.conversions) == 0


def test_operator_actions_are_audited_with_before_after_and_reason(due, usdc_low):
    threshold_set(
        currency="USDC",
        minimum=Decimal("6000"),
        target=Decimal("20000"),
        maximum=Decimal("100000"),
        actor=OPS,
        reason="seasonal withdrawals",
    )
    provider_set(code="due", priority=5, enabled=True, actor=OPS, reason="primary")
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    job_cancel(job_id=job.pk, actor=OPS, reason="desk converts by hand")
    rows = {row.action: row for row in OperatorAudit.objects.all()}
    assert set(rows) == {"threshold.set", "provider.set", "job.cancel"}
    assert rows["threshold.set"].before["minimum"] == "5000.000000"
    assert rows["threshold.set"].after["minimum"] == "6000.000000"
    assert rows["threshold.set"].target == "threshold:USDC"
    assert rows["provider.set"].before == {"enabled": True, "priority": 10}
    assert rows["provider.set"].after == {"enabled": True, "priority": 5}
    assert rows["job.cancel"].before["status"] == "pending"
    assert rows["job.cancel"].after["status"] == "cancelled"
    assert {row.actor for row in rows.values()} == {"cli:ops"}
    assert rows["job.cancel"].reason == "desk converts by hand"


def test_retry_is_audited_and_refusals_change_nothing(due, usdc_low, settings):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    due.finish(job.provider_reference, "failed")
    monitor_run()
    clerk = User.objects.create_user("clerk", password="a-long-password-1")
    with pytest.raises(OperatorNotPermitted):
        job_retry(job_id=job.pk, actor=Actor.for_user(clerk), reason="no permission")
    with pytest.raises(JobRefused, match="reason"):
        job_retry(job_id=job.pk, actor=OPS, reason=" ")
    with pytest.raises(ThresholdInvalid):
        threshold_set(
            currency="USD",
            minimum=Decimal(1),
            target=Decimal(2),
            maximum=Decimal(3),
            actor=OPS,
            reason="",
        )
    with pytest.raises(ProviderInvalid) as refused:
        provider_set(code="due", priority=-1, actor=OPS, reason="negative")
    assert refused.value.field == "priority"
    assert ConversionJob.objects.count() == 1 and not OperatorAudit.objects.exists()
    assert BufferThreshold.objects.get(currency="USD").minimum == Decimal("10000")
    assert ConversionProvider.objects.get(code="due").priority == 10
    clerk.user_permissions.add(Permission.objects.get(codename="change_conversionjob"))
    clerk = User.objects.get(pk=clerk.pk)
    again = job_retry(job_id=job.pk, actor=Actor.for_user(clerk), reason="Due failed it")
    audit = OperatorAudit.objects.get()
    assert (audit.action, audit.actor, audit.target) == (
        "job.retry",
        "admin:clerk",
        f"job:{job.pk}",
    )
    assert audit.before["status"] == "failed" and audit.after["retried_as"] == again.pk


# Item 13: the state trigger as a domain error --------------------------------------------


def test_an_illegal_transition_is_a_domain_error(due, usdc_low):
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    job = ConversionJob.objects.get()
    due.finish(job.provider_reference, "completed")
    monitor_run()
    with (
        pytest.raises(JobTransitionRefused, match="completed -> pending is not a legal"),
        treasury_rules(),
        transaction.atomic(),
    ):
        ConversionJob.objects.filter(pk=job.pk).update(status="pending")
    # A provider's later "failed" for a completed job changes nothing (and raises nothing).
    assert (
        job_settle(job_id=job.pk, conversion={"id": job.provider_reference, "status": "failed"})
        == "completed"
    )
    # A job sent once may not be cancelled, even by a direct write.
    sent = ConversionJob.objects.create(
        idempotency_key="00000000-0000-0000-0000-000000000002",
        buffer_currency="USDC",
        source_currency="USD",
        source_amount=Decimal("10"),
        target_currency="USDC",
        provider=job.provider,
        created_by="test",
        attempts=1,
    )
    with pytest.raises(JobTransitionRefused), treasury_rules(), transaction.atomic():
        ConversionJob.objects.filter(pk=sent.pk).update(status="cancelled")
    assert ConversionJob.objects.get(pk=sent.pk).status == "pending"


# Item 2: what Due reports holding ----------------------------------------------------------


def test_due_balances_follow_completed_conversions(due, usdc_low):
    due.balances = {"USD": Decimal("60000"), "USDC": Decimal("0")}
    assert due_client.balance_get(due.base_url, "USD") == Decimal("60000")
    assert due_client.balance_get(due.base_url, "USDC") == Decimal(0)
    assert due_client.balance_get(due.base_url, "EUR") == Decimal(0)  # none listed
    settlement_cycle_run(triggered_by="test")
    _complete_all(due)
    assert due_client.balance_get(due.base_url, "USD") == Decimal("41000")
    assert due_client.balance_get(due.base_url, "USDC") == Decimal("19000")
    due.unavailable = True
    with pytest.raises(DueUnavailable):
        due_client.balance_get(due.base_url, "USD")
