"""The treasury console in Chromium: a threshold with minimum above target is refused with the
field named and nothing saved, a valid one saved with a reason and audited; a provider's
priority changed with a reason and audited, with no host to edit; a pending job is cancelled
after a confirmation with a reason, audited; a completed conversion Due refunded is found by
Due's status and reversed after a confirmation, one Due did not refund is refused."""

import uuid
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import expect

from cutover.models import OperatorAudit
from tests.browser.console import login
from tests.treasury.factories import fund, job_make, job_told
from treasury.models import BufferThreshold, ConversionJob, ConversionProvider

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def operator(live_server, browser_page):
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    login(browser_page, live_server, "operator")
    return browser_page


def test_threshold_below_target_is_refused_naming_the_field(live_server, operator):
    threshold = BufferThreshold.objects.get(currency="USDC")
    page = operator
    page.goto(f"{live_server.url}/admin/treasury/bufferthreshold/{threshold.pk}/change/")
    page.fill("#id_minimum", "30000")  # above the target of 20,000
    page.fill("#id_reason", "seasonal withdrawals")
    page.click("input[name=_save]")
    expect(page.locator(".errorlist")).to_contain_text("minimum must not exceed target")
    expect(page.locator(".field-minimum .errorlist")).to_have_count(1)
    assert BufferThreshold.objects.get(currency="USDC").minimum == Decimal("5000")
    page.fill("#id_minimum", "6000")
    page.click("input[name=_save]")
    expect(page.locator(".messagelist")).to_contain_text("was changed successfully")
    assert BufferThreshold.objects.get(currency="USDC").minimum == Decimal("6000")
    audit = OperatorAudit.objects.get()
    assert (audit.action, audit.actor, audit.reason) == (
        "threshold.set",
        "admin:operator",
        "seasonal withdrawals",
    )
    assert (audit.before["minimum"], audit.after["minimum"]) == ("5000.000000", "6000.000000")


def test_provider_priority_changed_with_a_reason_and_audited(live_server, operator):
    provider = ConversionProvider.objects.get(code="due")
    page = operator
    page.goto(f"{live_server.url}/admin/treasury/conversionprovider/{provider.pk}/change/")
    expect(page.locator("[name=base_url]")).to_have_count(0)  # the host is in the settings
    page.fill("#id_priority", "3")
    page.click("input[name=_save]")  # no reason: refused, nothing saved
    expect(page.locator(".field-reason .errorlist")).to_have_count(1)
    assert ConversionProvider.objects.get(code="due").priority == 10
    page.fill("#id_priority", "3")
    page.fill("#id_reason", "Due first again after the incident")
    page.click("input[name=_save]")
    expect(page.locator(".messagelist")).to_contain_text("was changed successfully")
    assert ConversionProvider.objects.get(code="due").priority == 3
    audit = OperatorAudit.objects.get()
    assert (audit.action, audit.target, audit.before, audit.after) == (
        "provider.set",
        "provider:due",
        {"enabled": True, "priority": 10},
        {"enabled": True, "priority": 3},
    )


def test_pending_job_cancelled_with_a_reason(live_server, operator):
    job = ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency="USDC",
        source_currency="USD",
        source_amount=Decimal("100"),
        target_currency="USDC",
        provider=ConversionProvider.objects.get(code="due"),
        created_by="test",
    )
    page = operator
    page.goto(f"{live_server.url}/admin/treasury/conversionjob/")
    page.check("input.action-select")
    page.select_option("select[name=action]", "cancel")
    page.click("button[name=index]")
    page.click("#confirm")  # no reason: the browser does not submit the form
    expect(page.locator("#id_reason:invalid")).to_have_count(1)
    page.fill("#id_reason", "the desk converts by hand today")
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text("cancelled")
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert job.last_error == "cancelled by admin:operator: the desk converts by hand today"
    audit = OperatorAudit.objects.get()
    assert (audit.action, audit.target, audit.after["status"]) == (
        "job.cancel",
        f"job:{job.pk}",
        "cancelled",
    )


def test_a_refunded_conversion_is_found_by_due_s_status_and_reversed(live_server, operator, due):
    fund("fiat_buffer", "1000")
    fund("usdc_buffer", "1000")
    processed = ("completed", "payment_processed")
    told = [processed, ("pending", "refund_submitted"), ("failed", "refund_processed")]
    refunded = job_told(due, job_make(reference="tf_refunded", amount="100"), told)
    kept = job_told(due, job_make(reference="tf_kept", amount="100"), [processed])
    page = operator
    page.goto(f"{live_server.url}/admin/treasury/conversionjob/")
    page.get_by_role("link", name="refund_processed").click()  # the filter: Due's status
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    page.check("input.action-select")
    page.select_option("select[name=action]", "reverse")
    page.click("button[name=index]")
    page.fill("#id_reason", "the ACH payout came back to the bank")
    page.click("#confirm")
    expect(page.locator(".messagelist")).to_contain_text("reversed")
    refunded.refresh_from_db()
    assert refunded.status == "reversed" and refunded.reversal_transaction_id is not None
    # A job Due did not refund: refused on the page, row by row; nothing changes.
    page.goto(f"{live_server.url}/admin/treasury/conversionjob/?status__exact=completed")
    page.check("input.action-select")
    page.select_option("select[name=action]", "reverse")
    page.click("button[name=index]")
    page.fill("#id_reason", "wrong row")
    page.click("#confirm")
    expect(page.locator(".messagelist .error")).to_contain_text("not refund_processed")
    kept.refresh_from_db()
    assert kept.status == "completed"
    assert list(OperatorAudit.objects.values_list("action", "target")) == [
        ("job.reverse", f"job:{refunded.pk}")
    ]
