"""Withdrawals, as TigerBeetle's pending transfers: the request holds the user's money in
`withdrawals_pending_usdc` and writes the outbox row in one transaction, a worker sends it to
Circle (its settlement is in onchain.settlement); and the operator's resend and cancel of a
dead withdrawal."""

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.balance_path import balance_mutation_apply, strict_failure_recorded
from cutover.exceptions import ConcurrentDuplicate, KillSwitchEngaged
from cutover.operator_audit import operator_action_record
from cutover.selectors import phase_state
from gateway.faults import fault_point
from gateway.outbox import outbox_backoff, outbox_drain
from ledger.money import amount_parse
from onchain import circle, metrics
from onchain.chains import address_validate
from onchain.exceptions import (
    AddressInvalid,
    CancelRefused,
    CircleRefused,
    CircleUnavailable,
    WithdrawalRefused,
    onchain_rules,
)
from onchain.inbox import notification_process
from onchain.models import CircleNotification, InboxStatus, Withdrawal, WithdrawalStatus
from onchain.settlement import withdrawal_fail, withdrawal_settle

log = logging.getLogger(__name__)


def withdrawal_request(
    *,
    user_id,
    amount: Decimal | str,
    address: str,
    chain: str,
    idempotency_key: uuid.UUID | None = None,
    requested_by: str = "",
    correlation_id: str = "",
) -> Withdrawal:
    """Hold the user's USDC (a debit through the balance path into `withdrawals_pending_usdc`)
    and write the outbox row, in one transaction: both or neither. The same idempotency key
    returns the first withdrawal, or is refused if it asked for something else."""
    amount = amount_parse(amount, "USDC")
    address = address.strip() if isinstance(address, str) else address
    try:  # what a deposit address must be, EIP-55 included: a typo here is money sent away
        address_validate(chain=chain, address=address)
    except AddressInvalid as exc:
        raise WithdrawalRefused(f"{exc.field}: {exc}") from None
    key = idempotency_key or uuid.uuid4()
    existing = Withdrawal.objects.filter(idempotency_key=key).first()
    if existing is None:
        try:
            with strict_failure_recorded(), transaction.atomic(durable=True):
                withdrawal = Withdrawal(
                    idempotency_key=key,
                    user_id=user_id,
                    amount=amount,
                    address=address,
                    chain=chain,
                    requested_by=requested_by,
                    correlation_id=correlation_id,
                )
                hold = balance_mutation_apply(
                    user_id=user_id,
                    direction="debit",
                    amount=amount,
                    reference=withdrawal.hold_reference,
                    reason="circle_withdrawal",
                    counterparty="withdrawals_pending_usdc",
                    correlation_id=correlation_id,
                )
                # The hold reached withdrawals_pending_usdc: by the dual write, or in legacy
                # (custody open) by the legacy mirror.
                withdrawal.hold_in_ledger = hold.ledger_transaction_id is not None
                withdrawal.save(force_insert=True)
            return withdrawal
        except (IntegrityError, ConcurrentDuplicate):  # the same key, concurrently: a replay
            existing = Withdrawal.objects.get(idempotency_key=key)
    if (existing.user_id, existing.amount, existing.address, existing.chain) != (
        user_id,
        amount,
        address,
        chain,
    ):
        raise WithdrawalRefused(f"idempotency key {key} was used for another withdrawal")
    return existing


@dataclass
class SendReport:
    submitted: int = 0
    failed: int = 0  # refused by Circle: reversed
    retried: int = 0
    dead: int = 0


def withdrawals_send(*, limit: int = 100, base_url: str | None = None) -> SendReport:
    """The outbox worker: send due pending withdrawals to Circle (at `base_url`,
    CIRCLE_API_BASE_URL unless given), one row at a time, each claimed with FOR UPDATE SKIP
    LOCKED so that any number of workers share the work (gateway.outbox). Nothing is sent while
    the kill switch is on. A row is tried at most once per pass."""
    report = SendReport()
    if phase_state().kill_switch:
        log.warning("kill switch engaged: withdrawals are not sent")
        return report
    base_url = base_url or settings.CIRCLE_API_BASE_URL
    outbox_drain(
        pending=Withdrawal.objects.filter(status=WithdrawalStatus.PENDING),
        send=lambda withdrawal: _withdrawal_send(withdrawal, base_url),
        report=report,
        limit=limit,
        guard=_send_rules,
        on_error=_withdrawal_send_failed,
    )
    return report


@contextmanager
def _send_rules() -> Iterator[None]:
    with strict_failure_recorded(), onchain_rules():
        yield


def _withdrawal_send_failed(withdrawal: Withdrawal, exc: Exception) -> str:
    log.exception("withdrawal %s not sent", withdrawal.idempotency_key)
    return _withdrawal_retry_later(withdrawal.pk, f"{type(exc).__name__}: {exc}")


def _withdrawal_send(withdrawal: Withdrawal, base_url: str) -> str:
    """Send one claimed withdrawal (its row locked by the caller) and record Circle's answer."""
    try:
        transfer = circle.transfer_create(
            base_url=base_url,
            idempotency_key=str(withdrawal.idempotency_key),
            amount=withdrawal.amount,
            address=withdrawal.address,
            chain=withdrawal.chain,
        )
    except CircleRefused as exc:  # final: the hold goes back to the user
        withdrawal.attempts += 1
        withdrawal_fail(withdrawal, reason=str(exc))
        return "failed"
    except CircleUnavailable as exc:
        withdrawal.attempts += 1
        return _withdrawal_backoff(withdrawal, str(exc))
    fault_point("withdrawal:circle-answered")
    withdrawal.attempts += 1
    withdrawal.circle_transfer_id = str(transfer["id"])
    withdrawal.last_error = ""
    withdrawal.status = WithdrawalStatus.SUBMITTED
    withdrawal.save()
    # Settled in transactions of their own, after the transfer id is safely recorded: what
    # Circle answered, then any notification that came before this send was recorded (parked).
    # If either fails, the webhook's redelivery or the poll settles it later.
    transaction.on_commit(lambda: transfer_settle(withdrawal.pk, transfer), robust=True)
    transaction.on_commit(lambda: _parked_replay(withdrawal.circle_transfer_id), robust=True)
    return "submitted"


def transfer_settle(withdrawal_pk: int, transfer: dict) -> str:
    with strict_failure_recorded(), onchain_rules(), transaction.atomic(durable=True):
        withdrawal = Withdrawal.objects.select_for_update().get(pk=withdrawal_pk)
        return withdrawal_settle(withdrawal, transfer)


def _withdrawal_backoff(withdrawal: Withdrawal, error: str) -> str:
    withdrawal.last_error = error
    if withdrawal.attempts >= settings.ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS:
        withdrawal.status = WithdrawalStatus.DEAD
        log.error(
            "ALERT withdrawal %s dead after %s attempts: %s",
            withdrawal.idempotency_key,
            withdrawal.attempts,
            error,
        )
        transaction.on_commit(metrics.withdrawals_dead.inc)
    else:
        withdrawal.next_attempt_at = timezone.now() + outbox_backoff(
            settings.ONCHAIN_WITHDRAWAL_BACKOFF,
            withdrawal.attempts,
            settings.ONCHAIN_WITHDRAWAL_BACKOFF_MAX,
        )
    withdrawal.save(update_fields=["attempts", "last_error", "status", "next_attempt_at"])
    return "dead" if withdrawal.status == WithdrawalStatus.DEAD else "retried"


def _withdrawal_retry_later(withdrawal_pk: int, error: str) -> str:
    with onchain_rules(), transaction.atomic(durable=True):
        withdrawal = Withdrawal.objects.select_for_update().get(pk=withdrawal_pk)
        if withdrawal.status != WithdrawalStatus.PENDING:
            return "retried"
        withdrawal.attempts += 1
        return _withdrawal_backoff(withdrawal, error)


def _parked_replay(transfer_id: str) -> None:
    for notification_id in CircleNotification.objects.filter(
        transfer_id=transfer_id, status__in=[InboxStatus.PARKED, InboxStatus.FAILED]
    ).values_list("notification_id", flat=True):
        notification_process(notification_id=notification_id)


def _snapshot(withdrawal: Withdrawal) -> dict:
    return {
        "status": withdrawal.status,
        "attempts": withdrawal.attempts,
        "circle_transfer_id": withdrawal.circle_transfer_id,
        "last_error": withdrawal.last_error,
    }


def _kill_switch_wait(action: str) -> None:
    if phase_state().kill_switch:
        raise KillSwitchEngaged(f"kill switch engaged: withdrawals are not {action} until released")


def withdrawal_resend(*, withdrawal_id: int, actor: Actor, reason: str = "") -> Withdrawal:
    """An operator sends a dead withdrawal again (the same idempotency key, attempts reset);
    audited in the same transaction. Waits while the kill switch is on."""
    actor.require("onchain.change_withdrawal")
    with onchain_rules(), transaction.atomic(durable=True):
        withdrawal = Withdrawal.objects.select_for_update().get(pk=withdrawal_id)
        if withdrawal.status != WithdrawalStatus.DEAD:
            raise WithdrawalRefused(f"{withdrawal} is not dead; only dead withdrawals are resent")
        _kill_switch_wait("resent")
        before = _snapshot(withdrawal)
        withdrawal.status = WithdrawalStatus.PENDING
        withdrawal.attempts = 0
        withdrawal.next_attempt_at = timezone.now()
        withdrawal.last_error = f"resent by {actor.name} after: {withdrawal.last_error}"
        withdrawal.save()
        operator_action_record(
            actor=actor,
            action="withdrawal.resend",
            target=f"withdrawal:{withdrawal.pk}",
            before=before,
            after=_snapshot(withdrawal),
            reason=reason,
        )
    log.warning("withdrawal %s resent by %s", withdrawal.idempotency_key, actor.name)
    return withdrawal


# Circle's createDate and ours come from different clocks.
CLOCK_SKEW = timedelta(minutes=5)


def _circle_transfer_find(withdrawal: Withdrawal, base_url: str) -> dict | None:
    """The transfer Circle made for a dead withdrawal whose answers were lost, or None when
    Circle certainly has none. A dead withdrawal never recorded a transfer id and Circle's
    transfer object does not carry the idempotencyKey, so every transfer out of our wallet
    since the withdrawal was created is matched by destination, chain and amount, leaving out
    the transfers other withdrawals recorded. More than one candidate, or one while another
    unsent withdrawal asks for the same: Circle may have it, and which transfer is whose is
    unknown (CancelRefused; a resend names it). Circle unreachable: CircleUnavailable."""
    since = withdrawal.created_at - CLOCK_SKEW
    matching = [
        t
        for t in circle.transfers_outbound(base_url=base_url, since=since)
        if _is_transfer_of(t, withdrawal)
    ]
    recorded = set(
        Withdrawal.objects.filter(circle_transfer_id__in=[t["id"] for t in matching]).values_list(
            "circle_transfer_id", flat=True
        )
    )
    candidates = [t for t in matching if t["id"] not in recorded]
    rivals = (
        Withdrawal.objects.filter(
            circle_transfer_id=None,
            status__in=[WithdrawalStatus.PENDING, WithdrawalStatus.DEAD],
            address__iexact=withdrawal.address,
            chain=withdrawal.chain,
            amount=withdrawal.amount,
        )
        .exclude(pk=withdrawal.pk)
        .exists()
    )
    if len(candidates) > 1 or (candidates and rivals):
        raise CancelRefused(
            f"{withdrawal}: Circle has {len(candidates)} transfer(s) that may be this "
            f"withdrawal's or another's ({', '.join(t['id'] for t in candidates)}); not "
            "cancelled. Resend it: its idempotency key names its own transfer at Circle"
        )
    return candidates[0] if candidates else None


def _is_transfer_of(transfer: dict, withdrawal: Withdrawal) -> bool:
    destination = transfer.get("destination") or {}
    amount = (transfer.get("amount") or {}).get("amount")
    try:
        same_amount = isinstance(amount, str) and Decimal(amount) == withdrawal.amount
    except ArithmeticError:
        same_amount = False
    return (
        same_amount
        and str(destination.get("address", "")).lower() == withdrawal.address.lower()
        and destination.get("chain") == withdrawal.chain
    )


def withdrawal_cancel(
    *, withdrawal_id: int, actor: Actor, reason: str, base_url: str | None = None
) -> Withdrawal:
    """An operator gives up on a dead withdrawal. Circle is asked first: "dead" includes a
    transfer Circle created whose answers we never heard. Only a withdrawal Circle certainly
    does not have is cancelled (its hold reversed, once). One Circle has is not cancelled: it
    takes the transfer and Circle's status (submitted, completed or failed), and CancelRefused
    says so; if Circle cannot be reached, nothing changes (CircleUnavailable, retry later).
    Audited in the transaction that changes the withdrawal. Waits while the kill switch is on.
    Circle is at `base_url` (CIRCLE_API_BASE_URL unless given)."""
    actor.require("onchain.change_withdrawal")
    if not reason.strip():
        raise WithdrawalRefused("a reason is required to cancel a withdrawal")
    withdrawal = Withdrawal.objects.get(pk=withdrawal_id)
    if withdrawal.status != WithdrawalStatus.DEAD:
        raise WithdrawalRefused(f"{withdrawal} is not dead; only dead withdrawals are cancelled")
    _kill_switch_wait("cancelled")
    transfer = _circle_transfer_find(withdrawal, base_url or settings.CIRCLE_API_BASE_URL)
    with strict_failure_recorded(), onchain_rules(), transaction.atomic(durable=True):
        withdrawal = Withdrawal.objects.select_for_update().get(pk=withdrawal_id)
        if withdrawal.status != WithdrawalStatus.DEAD:
            raise WithdrawalRefused(
                f"{withdrawal} is not dead; only dead withdrawals are cancelled"
            )
        _kill_switch_wait("cancelled")
        before = _snapshot(withdrawal)
        if transfer is None:
            withdrawal_fail(withdrawal, reason=f"cancelled by {actor.name}: {reason.strip()}")
            outcome = "cancelled"
        else:
            withdrawal.circle_transfer_id = str(transfer["id"])
            withdrawal.status = WithdrawalStatus.SUBMITTED
            withdrawal.last_error = (
                f"cancel by {actor.name} refused: Circle has transfer {transfer['id']} "
                f"({transfer['status']})"
            )
            withdrawal.save()
            withdrawal_settle(withdrawal, transfer)
            transfer_id = withdrawal.circle_transfer_id
            transaction.on_commit(lambda: _parked_replay(transfer_id), robust=True)
            outcome = "refused: Circle has the transfer"
        operator_action_record(
            actor=actor,
            action="withdrawal.cancel",
            target=f"withdrawal:{withdrawal.pk}",
            before=before,
            after={**_snapshot(withdrawal), "outcome": outcome},
            reason=reason.strip(),
        )
    if transfer is not None:
        raise CancelRefused(
            f"{withdrawal}: not cancelled, Circle has its transfer {transfer['id']} "
            f"({transfer['status']}); the withdrawal now follows it"
        )
    return withdrawal
