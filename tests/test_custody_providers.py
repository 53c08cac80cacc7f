"""Custody from the providers (issue 9, path 2): the buffers' opening balances are booked at
what Circle and Due report over their APIs, and compared with them from then on; a withdrawal
of money that was deposited before shadow completes and posts."""

import json
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from custody.tasks import custody_reconcile_task
from cutover.backfill import backfill_run
from cutover.models import CustodyDiscrepancy, CustodyOpening, OperatorAudit
from ledger.selectors import system_balance
from onchain.models import DepositAddress
from onchain.polling import transfers_poll
from onchain.withdrawals import withdrawals_send
from tests.cutover.factories import legacy_user, phase_set
from tests.onchain.factories import withdraw

pytestmark = pytest.mark.django_db(transaction=True)


def buffer(code: str) -> Decimal:
    """A system buffer's balance, summed over its shards."""
    return system_balance(code=code)


def custody(*args: str) -> dict:
    out = StringIO()
    call_command("custody", *args, "--json", stdout=out)
    return json.loads(out.getvalue())


def test_custody_is_opened_from_what_the_providers_report_and_reconciled(sandbox, due):
    sandbox.wallet_balance = Decimal("1250.5")
    due.balances["USD"] = Decimal("40000")
    opened = custody("open", "--reason", "go-live custody")
    assert {row["currency"]: Decimal(row["reported"]) for row in opened["custody"]} == {
        "USDC": Decimal("1250.5"),
        "USD": Decimal("40000"),
    }
    assert buffer("usdc_buffer") == Decimal("1250.5") and buffer("fiat_buffer") == 40000
    assert set(CustodyOpening.objects.values_list("source", flat=True)) == {"circle", "due"}
    assert OperatorAudit.objects.filter(action="custody.open").count() == 2
    assert custody("reconcile")["differing"] == 0

    # Money reaches the wallet before its webhook is applied: the buffer is behind Circle.
    sandbox.deposit(address="0xnot-yet-registered", amount="10.00")
    with pytest.raises(CommandError, match="1 buffer"):
        call_command("custody", "reconcile", stdout=StringIO())
    open_one = CustodyDiscrepancy.objects.get(status="open")
    assert (open_one.currency, open_one.difference) == ("USDC", Decimal("-10"))
    assert custody_reconcile_task() == {"differing": ["USDC"]}

    # The address is registered and the poll credits the deposit: they agree again.
    user = legacy_user("0")
    DepositAddress.objects.create(address="0xnot-yet-registered", chain="ETH", user_id=user)
    transfers_poll()
    assert custody_reconcile_task() == {"differing": []}
    assert not CustodyDiscrepancy.objects.filter(status="open").exists()


def test_a_second_opening_is_refused_naming_what_is_open(sandbox, due):
    custody("open", "--currency", "USDC", "--reason", "first")
    with pytest.raises(CommandError, match="already open"):
        call_command("custody", "open", "--currency", "USDC", "--reason", "again")
    assert CustodyOpening.objects.count() == 1


def test_a_provider_that_cannot_answer_books_nothing(sandbox, due, settings):
    settings.CIRCLE_API_BASE_URL = "http://127.0.0.1:1"  # nothing listens there
    with pytest.raises(CommandError):
        call_command("custody", "open", "--currency", "USDC", "--reason", "r")
    assert not CustodyOpening.objects.exists() and buffer("usdc_buffer") == 0


def test_money_deposited_before_shadow_is_withdrawn_after_it(sandbox, due):
    """The outside review's path: legacy balances backed by USDC at Circle; custody booked from
    Circle's figure, backfill, shadow; a withdrawal completes on chain and is posted (it used to
    fail with LD002 forever)."""
    user = legacy_user("300")
    sandbox.wallet_balance = Decimal("300")
    custody("open", "--reason", "go-live custody")
    backfill_run()
    phase_set("shadow")
    withdrawal = withdraw(user, amount="120")
    assert withdrawals_send().submitted == 1
    withdrawal.refresh_from_db()
    sandbox.transfer_finish(withdrawal.circle_transfer_id, "complete")
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed"
    assert buffer("usdc_buffer") == Decimal("180") == sandbox.wallet_balance
    assert buffer("withdrawals_pending_usdc") == 0
    assert custody("reconcile")["differing"] == 0
