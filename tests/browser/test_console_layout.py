"""The console at a laptop's width (issue 12): the Status column of withdrawals and conversion
jobs is on screen at 1280 px, beside the navigation and the filters."""

import uuid
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import expect

from onchain.models import Withdrawal
from tests.browser.console import login
from treasury.models import ConversionJob, ConversionProvider

pytestmark = pytest.mark.django_db(transaction=True)
WIDTH = 1280


def assert_in_view(page, selector: str) -> None:
    locator = page.locator(selector)
    expect(locator.first).to_be_visible()
    for index in range(locator.count()):
        box = locator.nth(index).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= WIDTH, (
            selector,
            box,
        )


def test_status_columns_are_on_screen_at_1280_px(live_server, browser_page, tmp_path):
    print(f"screenshots: {tmp_path}")
    User.objects.create_superuser("operator", "op@example.com", "a-long-password-1")
    for status in ("dead", "pending", "submitted"):
        Withdrawal.objects.create(
            idempotency_key=uuid.uuid4(),
            user_id=uuid.uuid4(),
            amount=Decimal("123456.789012"),
            address="0x" + "c0ffee" * 6 + "beef",
            chain="ETH",
            status=status,
            hold_in_ledger=True,
            circle_transfer_id=str(uuid.uuid4()) if status == "submitted" else None,
        )
    ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency="USDC",
        source_currency="USD",
        source_amount=Decimal("1250000"),
        target_currency="USDC",
        target_amount=Decimal("1249000"),
        provider=ConversionProvider.objects.get(code="due"),
        provider_reference="due-conv-" + "9" * 30,
        status="submitted",
        created_by="celery",
    )
    page = browser_page
    page.set_viewport_size({"width": WIDTH, "height": 800})
    login(page, live_server, "operator")

    page.goto(f"{live_server.url}/admin/onchain/withdrawal/")
    assert_in_view(page, "#result_list th.column-status")
    assert_in_view(page, "#result_list td.field-status")
    expect(page.locator("#result_list")).to_contain_text("123,456.789012 USDC")
    page.screenshot(path=str(tmp_path / "withdrawals-1280.png"))

    page.goto(f"{live_server.url}/admin/treasury/conversionjob/")
    assert_in_view(page, "#result_list th.column-status")
    assert_in_view(page, "#result_list td.field-status")
    expect(page.locator("#result_list")).to_contain_text("1,250,000.00 USD → USDC")
    page.screenshot(path=str(tmp_path / "conversion-jobs-1280.png"))
