"""The on-chain engine's services: verifying and storing Circle notifications and applying them
(a completed inbound transfer to a user's deposit address credits that user through the
cutover's balance path, against the system USDC buffer); withdrawals, as TigerBeetle's pending
transfers: the request holds the user's money in `withdrawals_pending_usdc` and writes the
outbox row in one transaction, a worker sends it to Circle, completion posts the hold out of
the USDC buffer, failure reverses it; and polling Circle for what its webhook did not bring."""

import base64
import binascii
import json
import logging
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from cutover.actors import Actor
from cutover.balance_path import balance_mutation_apply, strict_failure_recorded
from cutover.exceptions import ConcurrentDuplicate, KillSwitchEngaged
from cutover.models import BalanceMutation
from cutover.operator_audit import operator_action_record
from cutover.selectors import custody_opened, phase_state, user_currency
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from ledger.selectors import system_account
from ledger.services import Leg, transaction_apply
from onchain import circle, metrics
from onchain.exceptions import (
    CancelRefused,
    CircleRefused,
    CircleUnavailable,
    MalformedNotification,
    SignatureRejected,
    UnknownSigningKey,
    WithdrawalRefused,
    withdrawal_rules,
)
from onchain.models import (
    CircleNotification,
    CirclePublicKey,
    DepositAddress,
    InboxStatus,
    Withdrawal,
    WithdrawalStatus,
)

log = logging.getLogger(__name__)
SUPPORTED_TYPES = {"transfers.created", "transfers.completed", "transfers.failed", "webhooks.test"}
ALGORITHM = "ECDSA_SHA_256"


# Loaded signing keys by key id. Circle's keys never change under an id, so a process keeps
# what it loaded: one fetch per unknown id (table first, then Circle), then no query at all.
_KEYS: dict[str, ec.EllipticCurvePublicKey] = {}
MAX_ID_LENGTH = 64


def _public_key(key_id: str):
    """The signing key, from this process, the table, or fetched from Circle once."""
    if key_id in _KEYS:
        return _KEYS[key_id]
    if len(key_id) > MAX_ID_LENGTH:
        raise UnknownSigningKey(f"key id is over {MAX_ID_LENGTH} characters")
    known = CirclePublicKey.objects.filter(key_id=key_id).first()
    if known is None:
        algorithm, public_key = circle.public_key_fetch(key_id)
        known, _ = CirclePublicKey.objects.get_or_create(
            key_id=key_id, defaults={"algorithm": algorithm, "public_key": public_key}
        )
    if known.algorithm != ALGORITHM:
        raise SignatureRejected(f"key {key_id} uses {known.algorithm}, not {ALGORITHM}")
    _KEYS[key_id] = load_der_public_key(base64.b64decode(known.public_key))
    return _KEYS[key_id]


def signature_verify(*, body: bytes, signature: str, key_id: str) -> None:
    """Circle's v2 scheme: base64 ECDSA-SHA256 over the raw body, by the key `key_id`."""
    if not signature or not key_id:
        raise SignatureRejected("X-Circle-Signature and X-Circle-Key-Id are required")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRejected("X-Circle-Signature is not base64") from None
    try:
        _public_key(key_id).verify(raw_signature, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureRejected("the signature does not match the body") from None


@dataclass(frozen=True)
class Delivery:
    notification_id: str
    status: str
    duplicate: bool


INBOX_UPSERT = """
    INSERT INTO onchain_circle_notifications
        (notification_id, notification_type, transfer_id, key_id, body, status, error,
         deliveries, attempts, received_at)
    VALUES (%s, %s, %s, %s, %s, 'received', '', 1, 0, now())
    ON CONFLICT (notification_id) DO UPDATE
       SET deliveries = onchain_circle_notifications.deliveries + 1
    RETURNING id, (xmax = 0) AS inserted
"""


def notification_receive(*, body: bytes, signature: str, key_id: str) -> Delivery:
    """Verify, then store raw (deduplicated by Circle's notification id) and process in one
    transaction: the inbox row is locked by its upsert, and marked processed together with its
    effect. A delivery of a notification already processed changes nothing but its delivery
    count; a parked or failed one is evaluated again. A failure is kept on the row."""
    signature_verify(body=body, signature=signature, key_id=key_id)
    try:
        text = body.decode("utf-8")
        payload = json.loads(text)
        notification_id = payload["notificationId"]
        notification_type = payload["notificationType"]
        transfer_id = _part(payload, "notification", "id")
    except (ValueError, KeyError, TypeError):
        raise MalformedNotification("the body is not a Circle notification") from None
    if not isinstance(notification_id, str) or not 0 < len(notification_id) <= MAX_ID_LENGTH:
        raise MalformedNotification(f"notificationId must be 1..{MAX_ID_LENGTH} characters")
    if "\x00" in text or "\\u0000" in text:
        raise MalformedNotification("the body contains a NUL character")
    if notification_type not in SUPPORTED_TYPES:
        raise MalformedNotification(f"unsupported notificationType {notification_type!r}")
    transfer_id = transfer_id[:MAX_ID_LENGTH] if isinstance(transfer_id, str) else ""
    row = CircleNotification(
        notification_id=notification_id,
        notification_type=notification_type,
        transfer_id=transfer_id,
        key_id=key_id,
        body=text,
    )
    try:
        with strict_failure_recorded(), withdrawal_rules(), transaction.atomic(durable=True):
            with connection.cursor() as cursor:
                cursor.execute(
                    INBOX_UPSERT, [notification_id, notification_type, transfer_id, key_id, text]
                )
                row.pk, inserted = cursor.fetchone()
            if not inserted:
                row = CircleNotification.objects.get(pk=row.pk)  # as first stored, locked
            status = row.status if row.status == InboxStatus.PROCESSED else _process(row)
    except Exception:
        _failure_record(row)
        raise
    metrics.webhook_received.labels(outcome=status if inserted else "duplicate").inc()
    return Delivery(notification_id, status, not inserted)


def notification_process(*, notification_id: str) -> str:
    """Apply a stored notification once (also the operator's replay): its row locked while it
    is applied, and marked processed in the same transaction as its effect; a failure is
    recorded on the row (with its traceback) in a transaction of its own and stays
    retryable."""
    row = CircleNotification.objects.get(notification_id=notification_id)
    try:
        with strict_failure_recorded(), withdrawal_rules(), transaction.atomic(durable=True):
            row = CircleNotification.objects.select_for_update().get(pk=row.pk)
            if row.status == InboxStatus.PROCESSED:
                return row.status  # parked and failed ones are evaluated again
            return _process(row)
    except Exception:
        _failure_record(row)
        raise


def notification_replay(*, notification_id: str, actor: Actor, reason: str = "") -> str:
    """An operator applies a stored notification again (idempotent): the outcome and the
    operator's audit row are committed together. A failure is kept on the row, as in
    notification_process."""
    actor.require("onchain.change_circlenotification")
    row = CircleNotification.objects.get(notification_id=notification_id)
    try:
        with strict_failure_recorded(), withdrawal_rules(), transaction.atomic(durable=True):
            row = CircleNotification.objects.select_for_update().get(pk=row.pk)
            before = row.status
            status = row.status if row.status == InboxStatus.PROCESSED else _process(row)
            operator_action_record(
                actor=actor,
                action="notification.replay",
                target=f"notification:{notification_id}",
                before={"status": before},
                after={"status": status},
                reason=reason,
            )
    except Exception:
        _failure_record(row)
        raise
    return status


def _process(row: CircleNotification) -> str:
    """Apply a locked inbox row and record the outcome on it."""
    row.status = _apply(row)
    row.error = ""
    row.attempts += 1
    row.processed_at = timezone.now()
    row.save(update_fields=["status", "error", "attempts", "processed_at"])
    return row.status


def _failure_record(row: CircleNotification) -> None:
    """Keep the failed notification and its traceback, retryable (stored if it was new)."""
    error = traceback.format_exc()
    with transaction.atomic():
        stored, _ = CircleNotification.objects.get_or_create(
            notification_id=row.notification_id,
            defaults={
                "notification_type": row.notification_type,
                "transfer_id": row.transfer_id,
                "key_id": row.key_id,
                "body": row.body,
            },
        )
        CircleNotification.objects.filter(pk=stored.pk).update(
            status=InboxStatus.FAILED, error=error, attempts=F("attempts") + 1
        )


def _part(value, *path: str):
    """value[path[0]][path[1]]..., or None where the notification's shape is not as expected."""
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _apply(row: CircleNotification) -> str:
    transfer = _part(json.loads(row.body), "notification")
    if not isinstance(transfer, dict) or row.notification_type == "webhooks.test":
        return InboxStatus.PROCESSED
    transfer_id = _part(transfer, "id")
    if transfer_id is not None and not isinstance(transfer_id, str):
        raise MalformedNotification("the transfer's id is not a string")
    if _part(transfer, "source", "type") == "wallet":  # from our wallet: a withdrawal
        withdrawal = (
            Withdrawal.objects.select_for_update().filter(circle_transfer_id=transfer_id).first()
            if transfer_id
            else None
        )
        if withdrawal is not None:
            settled = _withdrawal_settle(withdrawal, transfer)
            return InboxStatus.PARKED if settled == InboxStatus.PARKED else InboxStatus.PROCESSED
        # Its send is not recorded yet (the worker crashed, or is still committing): kept for
        # the worker, which replays it once it records the transfer id.
        if transfer.get("status") in ("complete", "failed"):
            log.warning("circle transfer %s from our wallet not yet recorded: parked", transfer_id)
            return InboxStatus.PARKED
        return InboxStatus.PROCESSED
    if row.notification_type != "transfers.completed":
        return InboxStatus.PROCESSED  # recorded; only a completed transfer moves money here
    return _deposit_credit(transfer, correlation_id=row.notification_id)


def _deposit_credit(transfer: dict, *, correlation_id: str) -> str:
    """Credit a completed inbound transfer to its deposit address's user, once per transfer id
    whichever way it arrives (webhook, redelivery, poll)."""
    destination = _part(transfer, "destination", "address")
    address = (
        DepositAddress.objects.filter(address=destination).first()
        if isinstance(destination, str)
        else None
    )
    if address is None:
        log.warning(
            "circle transfer %s to unknown address %r parked", transfer.get("id"), destination
        )
        return InboxStatus.PARKED
    transfer_id, amount = _part(transfer, "id"), _part(transfer, "amount", "amount")
    if not isinstance(transfer_id, str) or not transfer_id or not isinstance(amount, str):
        raise MalformedNotification("the transfer has no id or amount")
    try:
        amount = amount_parse(amount, address.currency)
    except InvalidAmount as exc:
        raise MalformedNotification(f"the transfer's amount: {exc}") from None
    held = user_currency(address.user_id)
    if held is not None and held != address.currency:
        # The money is in our wallet but this user cannot hold it (one currency per user):
        # kept for an operator, never a retry loop. (PostgreSQL refuses such an address, OC002;
        # this covers a user whose first money came in another currency after registering.)
        log.error(
            "ALERT circle transfer %s to %s: user %s holds %s, not %s; parked for an operator",
            transfer_id,
            destination,
            address.user_id,
            held,
            address.currency,
        )
        return InboxStatus.PARKED
    result = balance_mutation_apply(
        user_id=address.user_id,
        direction="credit",
        amount=amount,
        reference=f"circle:transfer:{transfer_id}",
        reason="circle_deposit",
        currency=address.currency,
        counterparty="usdc_buffer",
        correlation_id=correlation_id,
    )
    if result.created:
        transaction.on_commit(metrics.deposits_processed.inc)
    return InboxStatus.PROCESSED


# Withdrawals ------------------------------------------------------------------------------

CHAINS = {"ETH", "SOL", "MATIC", "AVAX", "ARB", "BASE", "OP", "ALGO", "XLM", "TRX", "NOBLE"}
MAX_ADDRESS_LENGTH = 128


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
    if not isinstance(address, str) or not address.strip() or len(address) > MAX_ADDRESS_LENGTH:
        raise WithdrawalRefused(f"address must be 1..{MAX_ADDRESS_LENGTH} characters")
    if chain not in CHAINS:
        raise WithdrawalRefused(f"chain must be one of {', '.join(sorted(CHAINS))}")
    key = idempotency_key or uuid.uuid4()
    existing = Withdrawal.objects.filter(idempotency_key=key).first()
    if existing is None:
        try:
            with strict_failure_recorded(), transaction.atomic(durable=True):
                withdrawal = Withdrawal(
                    idempotency_key=key,
                    user_id=user_id,
                    amount=amount,
                    address=address.strip(),
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
        address.strip(),
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


def withdrawals_send(*, limit: int = 100) -> SendReport:
    """The outbox worker: send due pending withdrawals to Circle, one row at a time, each
    claimed with FOR UPDATE SKIP LOCKED so that any number of workers share the work. Nothing
    is sent while the kill switch is on. A row is tried at most once per pass."""
    report = SendReport()
    tried: list[int] = []
    if phase_state().kill_switch:
        log.warning("kill switch engaged: withdrawals are not sent")
        return report
    for _ in range(limit):
        claimed = None
        try:
            with strict_failure_recorded(), withdrawal_rules(), transaction.atomic(durable=True):
                claimed = (
                    Withdrawal.objects.select_for_update(skip_locked=True)
                    .filter(status=WithdrawalStatus.PENDING, next_attempt_at__lte=timezone.now())
                    .exclude(pk__in=tried)
                    .order_by("next_attempt_at", "id")
                    .first()
                )
                if claimed is None:
                    break
                tried.append(claimed.pk)
                outcome = _withdrawal_send(claimed)
        except Exception as exc:
            if claimed is None:
                raise
            log.exception("withdrawal %s not sent", claimed.idempotency_key)
            outcome = _withdrawal_retry_later(claimed.pk, f"{type(exc).__name__}: {exc}")
        setattr(report, outcome, getattr(report, outcome) + 1)
    return report


def _withdrawal_send(withdrawal: Withdrawal) -> str:
    """Send one claimed withdrawal (its row locked by the caller) and record Circle's answer."""
    try:
        transfer = circle.transfer_create(
            idempotency_key=str(withdrawal.idempotency_key),
            amount=withdrawal.amount,
            address=withdrawal.address,
            chain=withdrawal.chain,
        )
    except CircleRefused as exc:  # final: the hold goes back to the user
        withdrawal.attempts += 1
        _withdrawal_fail(withdrawal, reason=str(exc))
        return "failed"
    except CircleUnavailable as exc:
        withdrawal.attempts += 1
        return _withdrawal_backoff(withdrawal, str(exc))
    withdrawal.attempts += 1
    withdrawal.circle_transfer_id = str(transfer["id"])
    withdrawal.last_error = ""
    withdrawal.status = WithdrawalStatus.SUBMITTED
    withdrawal.save()
    # Settled in transactions of their own, after the transfer id is safely recorded: what
    # Circle answered, then any notification that came before this send was recorded (parked).
    # If either fails, the webhook's redelivery or the poll settles it later.
    transaction.on_commit(lambda: _transfer_settle(withdrawal.pk, transfer), robust=True)
    transaction.on_commit(lambda: _parked_replay(withdrawal.circle_transfer_id), robust=True)
    return "submitted"


def _transfer_settle(withdrawal_pk: int, transfer: dict) -> str:
    with strict_failure_recorded(), withdrawal_rules(), transaction.atomic(durable=True):
        withdrawal = Withdrawal.objects.select_for_update().get(pk=withdrawal_pk)
        return _withdrawal_settle(withdrawal, transfer)


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
        delay = min(
            settings.ONCHAIN_WITHDRAWAL_BACKOFF * 2 ** (withdrawal.attempts - 1),
            settings.ONCHAIN_WITHDRAWAL_BACKOFF_MAX,
        )
        withdrawal.next_attempt_at = timezone.now() + delay
    withdrawal.save(update_fields=["attempts", "last_error", "status", "next_attempt_at"])
    return "dead" if withdrawal.status == WithdrawalStatus.DEAD else "retried"


def _withdrawal_retry_later(withdrawal_pk: int, error: str) -> str:
    with withdrawal_rules(), transaction.atomic(durable=True):
        withdrawal = Withdrawal.objects.select_for_update().get(pk=withdrawal_pk)
        if withdrawal.status != WithdrawalStatus.PENDING:
            return "retried"
        withdrawal.attempts += 1
        return _withdrawal_backoff(withdrawal, error)


def _withdrawal_settle(withdrawal: Withdrawal, transfer: dict) -> str:
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
        _withdrawal_fail(
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
        transaction_apply(
            namespace="circle",
            reference_id=f"withdrawal:{withdrawal.idempotency_key}:complete",
            kind="withdrawal_complete",
            legs=[
                Leg.debit(system_account(code=held_in), withdrawal.amount),
                Leg.credit(system_account(code="usdc_buffer"), withdrawal.amount),
            ],
            metadata={
                "user_id": str(withdrawal.user_id),
                "transfer": withdrawal.circle_transfer_id,
            },
        )
    withdrawal.status = WithdrawalStatus.COMPLETED
    withdrawal.save()
    transaction.on_commit(metrics.withdrawals_executed.inc)


def _withdrawal_fail(withdrawal: Withdrawal, *, reason: str) -> None:
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
    with withdrawal_rules(), transaction.atomic(durable=True):
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


def _circle_transfer_find(withdrawal: Withdrawal) -> dict | None:
    """The transfer Circle made for a dead withdrawal whose answers were lost, or None when
    Circle certainly has none. A dead withdrawal never recorded a transfer id and Circle's
    transfer object does not carry the idempotencyKey, so every transfer out of our wallet
    since the withdrawal was created is matched by destination, chain and amount, leaving out
    the transfers other withdrawals recorded. More than one candidate, or one while another
    unsent withdrawal asks for the same: Circle may have it, and which transfer is whose is
    unknown (CancelRefused; a resend names it). Circle unreachable: CircleUnavailable."""
    since = (withdrawal.created_at - CLOCK_SKEW).isoformat().replace("+00:00", "Z")
    matching = [t for t in circle.transfers_outbound(since=since) if _is_transfer_of(t, withdrawal)]
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
    amount = _part(transfer, "amount", "amount")
    try:
        same_amount = isinstance(amount, str) and Decimal(amount) == withdrawal.amount
    except ArithmeticError:
        same_amount = False
    return (
        same_amount
        and str(destination.get("address", "")).lower() == withdrawal.address.lower()
        and destination.get("chain") == withdrawal.chain
    )


def withdrawal_cancel(*, withdrawal_id: int, actor: Actor, reason: str) -> Withdrawal:
    """An operator gives up on a dead withdrawal. Circle is asked first: "dead" includes a
    transfer Circle created whose answers we never heard. Only a withdrawal Circle certainly
    does not have is cancelled (its hold reversed, once). One Circle has is not cancelled: it
    takes the transfer and Circle's status (submitted, completed or failed), and CancelRefused
    says so; if Circle cannot be reached, nothing changes (CircleUnavailable, retry later).
    Audited in the transaction that changes the withdrawal. Waits while the kill switch is on."""
    actor.require("onchain.change_withdrawal")
    if not reason.strip():
        raise WithdrawalRefused("a reason is required to cancel a withdrawal")
    withdrawal = Withdrawal.objects.get(pk=withdrawal_id)
    if withdrawal.status != WithdrawalStatus.DEAD:
        raise WithdrawalRefused(f"{withdrawal} is not dead; only dead withdrawals are cancelled")
    _kill_switch_wait("cancelled")
    transfer = _circle_transfer_find(withdrawal)
    with strict_failure_recorded(), withdrawal_rules(), transaction.atomic(durable=True):
        withdrawal = Withdrawal.objects.select_for_update().get(pk=withdrawal_id)
        if withdrawal.status != WithdrawalStatus.DEAD:
            raise WithdrawalRefused(
                f"{withdrawal} is not dead; only dead withdrawals are cancelled"
            )
        _kill_switch_wait("cancelled")
        before = _snapshot(withdrawal)
        if transfer is None:
            _withdrawal_fail(withdrawal, reason=f"cancelled by {actor.name}: {reason.strip()}")
            outcome = "cancelled"
        else:
            withdrawal.circle_transfer_id = str(transfer["id"])
            withdrawal.status = WithdrawalStatus.SUBMITTED
            withdrawal.last_error = (
                f"cancel by {actor.name} refused: Circle has transfer {transfer['id']} "
                f"({transfer['status']})"
            )
            withdrawal.save()
            _withdrawal_settle(withdrawal, transfer)
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


# Polling ----------------------------------------------------------------------------------


@dataclass
class PollReport:
    deposits_seen: int = 0
    deposits_credited: int = 0
    deposits_parked: int = 0
    deposits_not_applied: int = 0  # refused this time (e.g. the kill switch): tried next poll
    withdrawals_checked: int = 0
    withdrawals_settled: int = 0
    withdrawals_not_settled: int = 0  # Circle unreachable or the posting refused: next poll


def transfers_poll(*, lookback: timedelta | None = None) -> PollReport:
    """The fallback for webhooks that never came: completed inbound transfers of the last
    `lookback` are credited (the same `circle:transfer:<id>` reference as the webhook, so
    whichever comes second changes nothing), and submitted withdrawals are brought to
    Circle's status. One transfer that cannot be applied now is logged, counted and tried
    again by the next poll; it never stops the others."""
    report = PollReport()
    since = timezone.now() - (lookback or settings.ONCHAIN_DEPOSIT_POLL_LOOKBACK)
    for transfer in circle.transfers_inbound(since=since.isoformat().replace("+00:00", "Z")):
        report.deposits_seen += 1
        if transfer.get("status") != "complete":
            continue
        reference = f"circle:transfer:{transfer['id']}"
        if BalanceMutation.objects.filter(reference=reference).exists():
            continue
        try:
            with strict_failure_recorded(), transaction.atomic(durable=True):
                outcome = _deposit_credit(transfer, correlation_id=f"poll:{transfer['id']}")
        except Exception:
            log.exception("circle transfer %s not credited; the next poll tries again", reference)
            report.deposits_not_applied += 1
            continue
        if outcome == InboxStatus.PARKED:
            report.deposits_parked += 1
        else:
            report.deposits_credited += 1
    for pk, transfer_id in Withdrawal.objects.filter(status=WithdrawalStatus.SUBMITTED).values_list(
        "pk", "circle_transfer_id"
    ):
        report.withdrawals_checked += 1
        try:
            outcome = _transfer_settle(pk, circle.transfer_get(transfer_id))
        except Exception:
            log.exception("withdrawal %s (transfer %s) not settled this poll", pk, transfer_id)
            report.withdrawals_not_settled += 1
            continue
        if outcome in ("completed", "failed"):
            report.withdrawals_settled += 1
    # Notifications parked because they overtook their send's record: settled by now.
    for notification_id in CircleNotification.objects.filter(
        status=InboxStatus.PARKED,
        transfer_id__in=Withdrawal.objects.filter(circle_transfer_id__isnull=False).values(
            "circle_transfer_id"
        ),
    ).values_list("notification_id", flat=True):
        try:
            notification_process(notification_id=notification_id)
        except Exception:
            log.exception("parked notification %s still not applied", notification_id)
    return report


@dataclass(frozen=True)
class BufferStatus:
    currency: str
    balance: Decimal
    alert_threshold: Decimal

    @property
    def below_threshold(self) -> bool:
        return self.balance < self.alert_threshold


def buffer_status() -> BufferStatus:
    """The system USDC buffer from the ledger, against ONCHAIN_BUFFER_ALERT_THRESHOLD; sets
    `onchain_buffer_level` and logs an alert when it is below."""
    balance = system_account(code="usdc_buffer").balance
    status = BufferStatus("USDC", balance, settings.ONCHAIN_BUFFER_ALERT_THRESHOLD)
    metrics.buffer_level.set(float(balance))
    if status.below_threshold:
        log.warning(
            "ALERT onchain USDC buffer %s below the alert threshold %s",
            balance,
            status.alert_threshold,
        )
    return status
