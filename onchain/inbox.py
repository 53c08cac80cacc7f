"""The notification inbox: verifying and storing Circle notifications (deduplicated by
Circle's notification id) and applying them, also on an operator's replay; a completed inbound
transfer to a user's deposit address credits that user through the cutover's balance path,
against the system USDC buffer."""

import hashlib
import json
import logging
import traceback
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from cutover.actors import Actor
from cutover.balance_path import balance_mutation_apply, strict_failure_recorded
from cutover.operator_audit import operator_action_record
from cutover.selectors import user_currency
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from ledger.selectors import USDC_BUFFER
from onchain import metrics
from onchain.exceptions import MalformedNotification, onchain_rules
from onchain.models import CircleNotification, InboxStatus, Withdrawal
from onchain.selectors import deposit_address_find
from onchain.settlement import withdrawal_settle
from onchain.signatures import MAX_ID_LENGTH, signature_verify

log = logging.getLogger(__name__)


SUPPORTED_TYPES = {"transfers.created", "transfers.completed", "transfers.failed", "webhooks.test"}
# Ours, never Circle's: a transfer the poll found in Circle's list and could not apply as it
# stands (malformed), kept in the inbox as `poll:<transfer id>` for an operator.
POLLED = "poll.transfer"


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
    signature_verify(
        body=body, signature=signature, key_id=key_id, base_url=settings.CIRCLE_API_BASE_URL
    )
    try:
        text = body.decode("utf-8")
        payload = json.loads(text)
        notification_id = payload["notificationId"]
        notification_type = payload["notificationType"]
        transfer_id = part(payload, "notification", "id")
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
        with strict_failure_recorded(), onchain_rules(), transaction.atomic(durable=True):
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
        with strict_failure_recorded(), onchain_rules(), transaction.atomic(durable=True):
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
        with strict_failure_recorded(), onchain_rules(), transaction.atomic(durable=True):
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


def part(value, *path: str):
    """value[path[0]][path[1]]..., or None where the notification's shape is not as expected."""
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _apply(row: CircleNotification) -> str:
    transfer = part(json.loads(row.body), "notification")
    if not isinstance(transfer, dict) or row.notification_type == "webhooks.test":
        return InboxStatus.PROCESSED
    transfer_id = part(transfer, "id")
    if transfer_id is not None and not isinstance(transfer_id, str):
        raise MalformedNotification("the transfer's id is not a string")
    if part(transfer, "source", "type") == "wallet":  # from our wallet: a withdrawal
        withdrawal = (
            Withdrawal.objects.select_for_update().filter(circle_transfer_id=transfer_id).first()
            if transfer_id
            else None
        )
        if withdrawal is not None:
            settled = withdrawal_settle(withdrawal, transfer)
            return InboxStatus.PARKED if settled == InboxStatus.PARKED else InboxStatus.PROCESSED
        # Its send is not recorded yet (the worker crashed, or is still committing): kept for
        # the worker, which replays it once it records the transfer id.
        if transfer.get("status") in ("complete", "failed"):
            log.warning("circle transfer %s from our wallet not yet recorded: parked", transfer_id)
            return InboxStatus.PARKED
        return InboxStatus.PROCESSED
    if row.notification_type == POLLED and transfer.get("status") != "complete":
        return InboxStatus.PROCESSED
    if row.notification_type not in ("transfers.completed", POLLED):
        return InboxStatus.PROCESSED  # recorded; only a completed transfer moves money here
    return deposit_credit(transfer, correlation_id=row.notification_id)


def deposit_credit(transfer: dict, *, correlation_id: str) -> str:
    """Credit a completed inbound transfer to its deposit address's user, once per transfer id
    whichever way it arrives (webhook, redelivery, poll)."""
    destination = part(transfer, "destination", "address")
    chain = part(transfer, "destination", "chain")
    address = deposit_address_find(chain=chain, address=destination)
    if address is None:
        log.warning(
            "circle transfer %s to unknown address %r parked", transfer.get("id"), destination
        )
        return InboxStatus.PARKED
    transfer_id, amount = part(transfer, "id"), part(transfer, "amount", "amount")
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
        counterparty=USDC_BUFFER,
        correlation_id=correlation_id,
    )
    if result.created:
        transaction.on_commit(metrics.deposits_processed.inc)
    return InboxStatus.PROCESSED


def polled_park(item, *, error: str) -> bool:
    """Keep a transfer from Circle's list that cannot be applied as it stands in the inbox,
    parked for an operator with why, as Circle listed it; once per transfer id (per item when
    it has none). True when it was not kept yet."""
    transfer_id = item.get("id") if isinstance(item, dict) else None
    if isinstance(transfer_id, str) and 0 < len(transfer_id) <= MAX_ID_LENGTH - len("poll:"):
        notification_id = f"poll:{transfer_id}"
    else:
        digest = hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()
        notification_id = f"poll:sha256:{digest[:52]}"
    with transaction.atomic(durable=True):
        _, created = CircleNotification.objects.get_or_create(
            notification_id=notification_id,
            defaults={
                "notification_type": POLLED,
                "transfer_id": transfer_id[:MAX_ID_LENGTH] if isinstance(transfer_id, str) else "",
                "key_id": "",
                "body": json.dumps({"notificationType": POLLED, "notification": item}),
                "status": InboxStatus.PARKED,
                "error": error,
            },
        )
    return created


def parked_resolve(rows: list[CircleNotification], transfer: dict) -> int:
    """Mark processed, in the caller's transaction, the parked inbox rows (locked by the
    caller) of a transfer just credited as `transfer` says; how many. A row naming another
    amount stays parked: that contradiction is an operator's. The poll's own rows are an
    older reading of Circle's list: resolved whatever they said."""
    amount = _decimal(part(transfer, "amount", "amount"))
    resolved = [
        row.pk
        for row in rows
        if row.notification_type == POLLED
        or _decimal(part(json.loads(row.body), "notification", "amount", "amount")) == amount
    ]
    CircleNotification.objects.filter(pk__in=resolved).update(
        status=InboxStatus.PROCESSED, error="", processed_at=timezone.now()
    )
    return len(resolved)


def _decimal(value) -> Decimal | None:
    try:
        return Decimal(value) if isinstance(value, str) else None
    except InvalidOperation:
        return None
