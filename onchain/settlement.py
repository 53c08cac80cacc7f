"""Bringing a withdrawal to what Circle says of its transfer: completion posts the hold out
of the USDC buffer, failure reverses it through the balance path; a contradiction is parked."""

import logging

from django.db import transaction

from cutover.balance_path import balance_mutation_apply
from cutover.selectors import custody_opened
from ledger.selectors import USDC_BUFFER, system_account
from ledger.services import Leg, system_account_gather, transaction_apply
from onchain import metrics
from onchain.models import InboxStatus, Withdrawal, WithdrawalStatus

log = logging.getLogger(__name__)


def withdrawal_settle(withdrawal: Withdrawal, transfer: dict) -> str:
    """Bring a withdrawal (row locked) to what Circle says of its transfer; idempotent. A
    contradiction (Circle completes what we reversed, or fails what completed) is parked."""
    status = transfer.get("status")
    done = {"complete": WithdrawalStatus.COMPLETED, "failed": WithdrawalStatus.FAILED}.get(status)
    if withdrawal.status in (WithdrawalStatus.COMPLETED, WithdrawalStatus.FAILED):
        if done is None or done == withdrawal.status:
            return InboxStatus.PROCESSED
        log.error(
            "ALERT withdrawal %s is %s but Circle says transfer %s is %s",
            withdrawal.idempotency_key,
            withdrawal.status,
            withdrawal.circle_transfer_id,
            status,
        )
        return InboxStatus.PARKED
    if done == WithdrawalStatus.COMPLETED:
        _withdrawal_complete(withdrawal)
        return "completed"
    if done == WithdrawalStatus.FAILED:
        withdrawal_fail(
            withdrawal, reason=f"Circle failed transfer {withdrawal.circle_transfer_id}"
        )
        return "failed"
    return InboxStatus.PROCESSED  # still pending at Circle


def _withdrawal_complete(withdrawal: Withdrawal) -> None:
    """The money left our wallet, so it leaves the USDC buffer: out of the hold when the hold
    reached `withdrawals_pending_usdc`; otherwise (a hold placed in `legacy`, which only the
    legacy store saw) out of opening-balance equity, where the custody opening booked the
    wallet's USDC that this hold still stood for. Before custody is opened the buffer holds
    none of the wallet's money, and nothing is posted."""
    if withdrawal.hold_in_ledger:
        held_in = "withdrawals_pending_usdc"
    elif custody_opened("USDC"):
        held_in = "opening_balance_equity_usdc"
    else:
        held_in = None
    if held_in is not None:
        # Deposits sit on the buffer's shards; the base alone pays out (no row goes below 0).
        # The posting's other account is locked with them, in the one id order.
        buffer, _ = system_account_gather(code=USDC_BUFFER, also=[held_in])
        transaction_apply(
            namespace="circle",
            reference_id=f"withdrawal:{withdrawal.idempotency_key}:complete",
            kind="withdrawal_complete",
            legs=[
                Leg.debit(system_account(code=held_in), withdrawal.amount),
                Leg.credit(buffer, withdrawal.amount),
            ],
            metadata={
                "user_id": str(withdrawal.user_id),
                "transfer": withdrawal.circle_transfer_id,
            },
        )
    withdrawal.status = WithdrawalStatus.COMPLETED
    withdrawal.save()
    transaction.on_commit(metrics.withdrawals_executed.inc)


def withdrawal_fail(withdrawal: Withdrawal, *, reason: str) -> None:
    """Reverse the hold, exactly once (its own balance-path reference), through the balance
    path. A hold the ledger never saw (placed in `legacy`) is reversed against opening balance
    equity, where the backfill put the money it brought in."""
    balance_mutation_apply(
        user_id=withdrawal.user_id,
        direction="credit",
        amount=withdrawal.amount,
        reference=withdrawal.reversal_reference,
        reason="circle_withdrawal_reversal",
        counterparty="withdrawals_pending_usdc"
        if withdrawal.hold_in_ledger
        else "opening_balance_equity_usdc",
        correlation_id=withdrawal.correlation_id,
    )
    withdrawal.status = WithdrawalStatus.FAILED
    withdrawal.last_error = reason
    withdrawal.save()
    log.warning("withdrawal %s failed and was reversed: %s", withdrawal.idempotency_key, reason)
