"""The notification inbox: verifying and storing Circle notifications (deduplicated by
Circle's notification id) and applying them, also on an operator's replay: a completed inbound
transfer is a deposit (onchain.deposits), a transfer from our wallet settles its withdrawal."""

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
from cutover.balance_path import strict_failure_recorded
from cutover.operator_audit import operator_action_record
from gateway import boundary
from gateway.exceptions import InputRefused
from gateway.faults import fault_point
from onchain import metrics
from onchain.deposits import (
    deposit_credit,
    deposit_notification_accept,
    deposit_outcome,
    deposit_plain,
)
from onchain.exceptions import MalformedNotification, TransferRefused, onchain_rules
from onchain.models import CircleNotification, InboxStatus, Withdrawal
from onchain.notifications import (
    FOREIGN,
    OUTBOUND,
    POLLED,
    TransferEvent,
    payload_transfer_id,
    stored_event,
    transfer_event,
)
from onchain.settlement import withdrawal_settle
from onchain.signatures import MAX_ID_LENGTH, signature_verify

log = logging.getLogger(__name__)


# A notification in these states is not evaluated again when Circle redelivers it (the same
# content would be refused again); an operator's replay evaluates a refused one afresh.
FINAL = {InboxStatus.PROCESSED, InboxStatus.REFUSED}


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
    """A Circle v2 delivery (Wallets' transactions, Mint's custody.transfer, the checklist's
    aliases): its signature verified over the raw body, then accepted under its
    notificationId (notification_accept)."""
    signature_verify(
        body=body, signature=signature, key_id=key_id, base_url=settings.CIRCLE_API_BASE_URL
    )
    payload = _payload(body)
    return _accept(
        notification_id=payload.get("notificationId"),
        key_id=key_id,
        text=body.decode("utf-8"),  # UTF-8: _payload read it
        payload=payload,
    )


def notification_accept(*, notification_id: object, key_id: str, text: str) -> Delivery:
    """Store an authenticated Circle notification raw (`text`: Circle's JSON, a v2 envelope or
    a v1 message) under `notification_id` (deduplicated: Circle redelivers under the same id),
    and process it in one transaction: its effect and the row's status commit together. A
    delivery of a notification already processed changes nothing but its delivery count; a
    parked or failed one is evaluated again. A failure is kept on the row."""
    return _accept(
        notification_id=notification_id, key_id=key_id, text=text, payload=_payload(text)
    )


def _payload(raw: bytes | str) -> dict:
    """The notification's JSON through the input boundary: a body that is not a JSON object,
    nested too deeply, or holding text PostgreSQL cannot store (NUL, an unpaired surrogate) is
    malformed, naming its key; no retry of Circle's can make it acceptable."""
    try:
        return boundary.json_object(raw)
    except InputRefused as exc:
        raise MalformedNotification(str(exc), exc.field) from None


def _accept(*, notification_id: object, key_id: str, text: str, payload: dict) -> Delivery:
    if not isinstance(notification_id, str) or not 0 < len(notification_id) <= MAX_ID_LENGTH:
        raise MalformedNotification(
            f"notificationId must be 1..{MAX_ID_LENGTH} characters", "notificationId"
        )
    notification_type = payload.get("notificationType")
    if not isinstance(notification_type, str) or not 0 < len(notification_type) <= 64:
        raise MalformedNotification("notificationType must be 1..64 characters", "notificationType")
    transfer_id = payload_transfer_id(payload)[:MAX_ID_LENGTH]
    row = CircleNotification(
        notification_id=notification_id,
        notification_type=notification_type,
        transfer_id=transfer_id,
        key_id=key_id,
        body=text,
    )
    deposit = deposit_plain(notification_type, payload)
    if deposit is not None:
        return _deposit_accept(row, *deposit)
    try:
        with strict_failure_recorded(), onchain_rules(), transaction.atomic(durable=True):
            with connection.cursor() as cursor:
                cursor.execute(
                    INBOX_UPSERT, [notification_id, notification_type, transfer_id, key_id, text]
                )
                row.pk, inserted = cursor.fetchone()
            if not inserted:
                row = CircleNotification.objects.get(pk=row.pk)  # as first stored, locked
            status = row.status if row.status in FINAL else _process(row)
    except Exception:
        _failure_record(row)
        raise
    metrics.webhook_received.labels(outcome=status if inserted else "duplicate").inc()
    return Delivery(notification_id, status, not inserted)


def _deposit_accept(row: CircleNotification, event: TransferEvent, arguments: list) -> Delivery:
    """A plain deposit's notification stored and applied in one statement
    (deposit_notification_accept), with the same outcome, record and failure handling as the
    general path (notification_accept)."""
    try:
        with strict_failure_recorded(), onchain_rules():
            inserted, status, credit = deposit_notification_accept(row, event, arguments)
    except Exception:
        _failure_record(row)
        raise
    fault_point("webhook:deposit-accepted")
    if not inserted:
        if status not in FINAL:  # stored before and not decided: its stored body decides
            status = notification_process(notification_id=row.notification_id)
        metrics.webhook_received.labels(outcome="duplicate").inc()
        return Delivery(row.notification_id, status, True)
    status, why = deposit_outcome(event, credit)
    if credit.outcome == "currency_mismatch":
        _refusal_noted(row.notification_id, why)
    metrics.webhook_received.labels(outcome=status).inc()
    return Delivery(row.notification_id, status, False)


def notification_process(*, notification_id: str) -> str:
    """Apply a stored notification once (also the operator's replay): its row locked while it
    is applied, and marked processed in the same transaction as its effect; a failure is
    recorded on the row (with its traceback) in a transaction of its own and stays
    retryable."""
    row = CircleNotification.objects.get(notification_id=notification_id)
    try:
        with strict_failure_recorded(), onchain_rules(), transaction.atomic(durable=True):
            row = CircleNotification.objects.select_for_update().get(pk=row.pk)
            if row.status in FINAL:
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
    """Apply a locked inbox row and record the outcome on it (with why, when refused)."""
    row.status, row.error = _apply(row)
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


def _apply(row: CircleNotification) -> tuple[str, str]:
    """What a notification does: (the row's status, why when refused). Only a complete
    inbound transfer in a currency we hold moves a user's money; a transfer from our wallet
    settles its withdrawal; anything else is recorded."""
    try:
        event = transfer_event(row.notification_type, json.loads(row.body))
        if event is None:
            return InboxStatus.PROCESSED, ""  # a test, a fiat deposit, a type we do not act on
        if event.direction == OUTBOUND:
            return _withdrawal_apply(event), ""
        if event.direction == FOREIGN:
            raise TransferRefused(
                f"transfer {event.transfer_id} is another wallet's, not ours "
                f"({settings.CIRCLE_WALLET_ID})"
            )
        if event.status != "complete":
            return InboxStatus.PROCESSED, ""  # only a completed transfer moves money
        return deposit_credit(event, correlation_id=row.notification_id)
    except TransferRefused as exc:
        _refusal_noted(row.notification_id, str(exc))
        return InboxStatus.REFUSED, str(exc)


def _refusal_noted(notification_id: str, why: str) -> None:
    log.error("ALERT circle notification %s refused: %s", notification_id, why)
    transaction.on_commit(metrics.notifications_refused.inc)


def _withdrawal_apply(event: TransferEvent) -> str:
    """A transfer from our wallet settles the withdrawal that sent it."""
    withdrawal = (
        Withdrawal.objects.select_for_update().filter(circle_transfer_id=event.transfer_id).first()
    )
    if withdrawal is not None:
        settled = withdrawal_settle(withdrawal, {"status": event.status})
        return InboxStatus.PARKED if settled == InboxStatus.PARKED else InboxStatus.PROCESSED
    # Its send is not recorded yet (the worker crashed, or is still committing): kept for the
    # worker, which replays it once it records the transfer id.
    if event.status in ("complete", "failed"):
        log.warning(
            "circle transfer %s from our wallet not yet recorded: parked", event.transfer_id
        )
        return InboxStatus.PARKED
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


def parked_resolve(rows: list[CircleNotification], event: TransferEvent) -> int:
    """Mark processed, in the caller's transaction, the parked inbox rows (locked by the
    caller) of a transfer just credited as `event` says; how many. A row naming another
    amount stays parked: that contradiction is an operator's. The poll's own rows are an
    older reading of Circle's list: resolved whatever they said."""
    amount = _decimal(event.amount)
    resolved = [
        row.pk
        for row in rows
        if row.notification_type == POLLED
        or _decimal(getattr(stored_event(row.notification_type, row.body), "amount", None))
        == amount
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
