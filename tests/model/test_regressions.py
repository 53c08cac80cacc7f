"""Failing examples the money model found and shrank, replayed as written (Hypothesis printed
each one; the example database in tests/model/examples keeps them too, but it is keyed by the
machine's source, so these explicit replays are what survives an edit of the machine).

Each one fails on the code as it was when it was found (the issue path it matches is in its
name and docstring) and passes once that path is fixed: it is the model's net for that path."""

from decimal import Decimal

import pytest
from django.db import DatabaseError, transaction

from onchain.models import DepositAddress, Withdrawal
from tests.model import invariants
from tests.model.machine import MoneyMachine
from treasury.models import ConversionJob

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("product")]


def test_path_5_the_cycle_drains_the_usdc_buffer_below_its_minimum():
    """Issue 9 path 5. USDC custody of 0.01 (below USDC's minimum of 50), USD at 0: the cycle
    converts the 0.01 USDC to USD, taking the USDC buffer below its own minimum.
    Violated_conversions_within_source_minimum."""
    state = MoneyMachine()
    state.user_with_legacy_balance(amount=Decimal("0.01"), currency="USDC")
    state.custody_open(currency="USDC")
    state.every_invariant_holds()
    state.settlement_cycle()
    state.every_invariant_holds()
    state.teardown()


def test_path_3_a_deposit_in_legacy_after_custody_never_reaches_the_usdc_buffer():
    """Issue 9 paths 2/3 (the lead's LEGACY RULE). Custody is booked in legacy; a deposit then
    credited in legacy writes the legacy store only: Circle's wallet holds 0.02, the ledger's
    usdc_buffer 0.01, and no later backfill brings the buffer's side (the backfill books the
    user's side against equity). Violated_custody_matches_providers at quiescence."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("0.01"), currency="USDC")
    state.custody_open(currency="USDC")
    state.deposit(amount=Decimal("0.01"), notify=True, user=users_0)
    state.every_invariant_holds()
    state.teardown()


def test_path_15_the_poll_aborts_under_the_kill_switch():
    """Beyond the list (next to path 15). Under the kill switch the deposit poll
    (`onchain.transfers_poll`, the periodic task) raises KillSwitchEngaged on the first
    deposit it has not credited yet, so it never reaches the submitted withdrawals after it:
    the completions the lead's decision says must still post while the switch is on are not
    polled, and the task fails every run until the release."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("0.01"), currency="USDC")
    state.deposit(amount=Decimal("0.01"), notify=False, user=users_0)
    state.kill_switch(engaged=True)
    state.poll()
    state.every_invariant_holds()
    state.teardown()


# Directed: the paths of the list the machine reaches only through long sequences,
# written out as the machine's own steps.


def test_path_1_rollback_from_cutover_with_a_second_currency():
    """Issue 9 path 1. A USDC user reaches cutover; the API credits them USD (a second ledger
    account): the rollback's rebuild of `balances` cannot run. Violated_rollback_possible."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("10"), currency="USDC")
    state.advance(phases=4)
    assert invariants.phase() == "cutover"
    state.api_mutation(
        user=users_0, direction="credit", currency="USD", amount=Decimal("5"), retries=0
    )
    state.every_invariant_holds()
    state.rollback()
    state.every_invariant_holds()
    state.teardown()


def test_path_3_a_hold_placed_in_shadow_reversed_after_a_rollback_strands_pending():
    """Issue 9 path 3. A withdrawal held in shadow (the hold reached withdrawals_pending_usdc),
    a rollback to legacy, then Circle refuses it: the reversal in legacy leaves the pending
    account holding the amount with no withdrawal open. Violated_holds_match_withdrawals."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("100"), currency="USDC")
    state.advance()
    state.withdraw(user=users_0, amount=Decimal("30"), refused=True)
    state.rollback()
    state.send(fault="none")
    state.every_invariant_holds()
    state.teardown()


def test_path_7_cancelling_a_dead_withdrawal_that_circle_accepted_pays_twice():
    """Issue 9 path 7. Every send times out after Circle recorded the transfer: the withdrawal
    is dead; the operator cancels it (the user is refunded) and the transfer completes on
    chain: the user keeps the 30 and the wallet paid them out; the ledger's usdc_buffer
    claims 30 the wallet no longer holds, and the completion's notification stays parked.
    Violated_custody_matches_providers (then Violated_nothing_stuck)."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("100"), currency="USDC")
    state.custody_open(currency="USDC")
    state.advance()
    state.withdraw(user=users_0, amount=Decimal("30"), refused=False)
    state.send(fault="timeout")
    state.send(fault="timeout")
    assert Withdrawal.objects.get().status == "dead"
    state.operator_on_dead(pick=0, cancel=True)
    state.every_invariant_holds()
    state.teardown()


def test_path_4_a_conversion_whose_submit_timed_out_is_converted_twice():
    """Issue 9 path 4. Due accepts a conversion but every submit times out: the job is failed
    with no provider reference; the operator's retry converts again, and when Due completes
    the first one it is never booked. Violated_custody_matches_providers at quiescence."""
    state = MoneyMachine()
    state.user_with_legacy_balance(amount=Decimal("600"), currency="USD")
    state.user_with_legacy_balance(amount=Decimal("0.01"), currency="USDC")
    state.custody_open(currency="USD")
    state.custody_open(currency="USDC")
    state.settlement_cycle()
    state.submit(fault="timeout")
    state.submit(fault="timeout")
    # Due has the conversion: the job is never failed on a lost answer, so no retry can
    # convert twice; the monitor books the completion once, whenever it comes.
    assert ConversionJob.objects.get().status in ("submitted", "timed_out")
    state.retry_job(pick=0)
    assert ConversionJob.objects.count() == 1
    state.every_invariant_holds()
    state.teardown()


def test_beyond_the_list_a_usdc_deposit_address_of_a_usd_user_is_refused():
    """Beyond the list (next to path 1, found by the machine): a USDC deposit address could
    belong to a USD user, whose deposits could then never be credited (a failed notification
    retried forever). PostgreSQL refuses such an address (OC002); a user whose first money
    came in another currency after their address was registered has its deposit parked for an
    operator instead of a retry loop."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("10"), currency="USD")
    with (
        pytest.raises(DatabaseError, match="holds USD, not USDC") as refused,
        transaction.atomic(),
    ):
        DepositAddress.objects.create(address="0xusd-user", chain="ETH", user_id=users_0)
    assert refused.value.__cause__.sqlstate == "OC002"
    assert not DepositAddress.objects.filter(address="0xusd-user").exists()
    state.every_invariant_holds()
    state.teardown()


def test_path_2_a_withdrawal_of_money_booked_before_shadow_never_completes():
    """Issue 9 path 2 (found by the machine). No custody booked: the user's 100 reach the
    ledger by the backfill (against equity), the USDC buffer is 0. The withdrawal completes on
    chain; its completion cannot be posted (the buffer would go negative): the webhook's
    processing fails, and the poll then aborts on it (InsufficientFunds out of
    onchain.transfers_poll, here at quiescence), every run."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("100"), currency="USDC")
    state.advance()
    state.withdraw(user=users_0, amount=Decimal("30"), refused=False)
    state.send(fault="none")
    state.circle_settles(pick=0, outcome="complete")
    state.every_invariant_holds()
    state.teardown()


def test_a_conversion_takes_what_a_pending_withdrawal_holds_from_the_usdc_buffer():
    """Found by the nightly (scripts/soak, 2026-12-02; written out by hand, shorter than the
    example it printed). A withdrawal's USDC is held but still in the buffer; the cycle
    converted it to USD as if it were spare, and once Circle completed the withdrawal the open
    conversion took the USDC buffer below its minimum.
    Violated_conversions_within_source_minimum."""
    state = MoneyMachine()
    users_0 = state.user_with_legacy_balance(amount=Decimal("100.00"), currency="USDC")
    state.advance(phases=1)
    state.every_invariant_holds()
    state.withdraw(amount=Decimal("40.00"), refused=False, user=users_0)
    state.settlement_cycle()
    state.every_invariant_holds()
    state.send(fault="none", passes=1)
    state.circle_settles(outcome="complete", pick=0)
    state.every_invariant_holds()
    state.teardown()
