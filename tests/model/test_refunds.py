"""The money model's refund steps (Due takes back a conversion it processed; an operator
reverses the job), driven by hand: random examples of 30 steps rarely reach a processed
conversion. Every invariant after every step, and custody against the providers at quiescence,
as the model checks them."""

from decimal import Decimal

import pytest

from tests.model.machine import MoneyMachine
from treasury.models import ConversionJob

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("product")]


def processed_conversion() -> MoneyMachine:
    """USD custody of 600 and USDC of 0.01: the cycle converts USD to refill USDC, Due
    processes it, the monitor books it."""
    state = MoneyMachine()
    state.user_with_legacy_balance(amount=Decimal("600"), currency="USD")
    state.user_with_legacy_balance(amount=Decimal("0.01"), currency="USDC")
    state.custody_open(currency="USD")
    state.custody_open(currency="USDC")
    state.settlement_cycle()
    state.submit(fault="none")
    state.due_settles(pick=0, outcome="completed")
    state.monitor()
    state.every_invariant_holds()
    assert ConversionJob.objects.get().status == "completed"
    return state


def test_a_refund_due_processed_is_reversed_once_and_custody_agrees():
    state = processed_conversion()
    state.operator_reverses(pick=0)  # Due has not refunded it: refused, nothing written
    assert ConversionJob.objects.get().status == "completed"
    state.due_refunds(pick=0)  # refund_submitted: still not reversible
    state.operator_reverses(pick=0)
    assert ConversionJob.objects.get().status == "completed"
    state.every_invariant_holds()
    state.due_refunds(pick=0)  # refund_processed
    state.monitor()
    state.every_invariant_holds()
    state.operator_reverses(pick=0)
    job = ConversionJob.objects.get()
    assert (job.status, job.provider_status) == ("reversed", "refund_processed")
    state.every_invariant_holds()
    state.operator_reverses(pick=0)  # nothing completed is left: no second reversal
    state.teardown()  # the ledger's buffers equal what the providers hold


def test_a_refund_left_to_quiescence_is_reversed_by_the_operator_there():
    state = processed_conversion()
    state.due_refunds(pick=0)
    state.due_refunds(pick=0)
    state.teardown()
    assert ConversionJob.objects.get().status == "reversed"


def test_a_refund_still_in_flight_at_quiescence_leaves_the_conversion_booked():
    state = processed_conversion()
    state.due_refunds(pick=0)  # refund_submitted: Due still holds the payout's side
    state.teardown()
    assert ConversionJob.objects.get().status == "completed"
