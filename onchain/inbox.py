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
from uuid import UUID

import psycopg
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.utils import timezone

from cutover.actors import Actor
from cutover.balance_path import mutation_observed, strict_failure_recorded
from cutover.exceptions import cutover_error_from
from cutover.operator_audit import operator_action_record
from gateway import boundary
from gateway.exceptions import InputRefused
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from ledger.selectors import USDC_BUFFER
from onchain import metrics
from onchain.chains import EVM_CHAINS, address_stored_form
from onchain.exceptions import MalformedNotification, TransferRefused, onchain_rules
from onchain.models import CircleNotification, InboxStatus, Withdrawal
from onchain.notifications import (
    FOREIGN,
    INBOUND,
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
    deposit = _plain_deposit(notification_type, payload)
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


def _plain_deposit(notification_type: str, payload: dict) -> tuple | None:
    """(event, its arguments to onchain_deposit_credit) for the notification most deliveries
    are: a completed inbound transfer in a currency we hold, with a strict amount and an
    address; None for anything else (refused, pending, a withdrawal's, another wallet's), which
    _apply decides."""
    try:
        event = transfer_event(notification_type, payload)
        if event is None or event.direction != INBOUND or event.status != "complete":
            return None
        arguments = _deposit_arguments(event, _deposit_amount(event))
    except Exception:  # refused or malformed: _apply decides it again and records why
        return None
    return None if arguments is None else (event, arguments)


def _deposit_accept(row: CircleNotification, event: TransferEvent, arguments: list) -> Delivery:
    """A plain deposit's notification stored and applied in one statement
    (onchain_deposit_notification_accept, autocommit: its own transaction), with the same
    outcome, record and failure handling as the general path (notification_accept)."""
    params = [
        row.notification_id,
        row.notification_type,
        row.transfer_id,
        row.key_id,
        row.body,
        *arguments,
        USDC_BUFFER,
    ]
    try:
        with strict_failure_recorded(), onchain_rules():
            inserted, status, *credit = _deposit_execute(
                DEPOSIT_ACCEPT_SQL, params, event.transfer_id
            )
    except Exception:
        _failure_record(row)
        raise
    if not inserted:
        if status not in FINAL:  # stored before and not decided: its stored body decides
            status = notification_process(notification_id=row.notification_id)
        metrics.webhook_received.labels(outcome="duplicate").inc()
        return Delivery(row.notification_id, status, True)
    credit = DepositCredit(*credit)
    status, why = _deposit_outcome(event, credit)
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


@dataclass(frozen=True)
class DepositCredit:
    """What onchain_deposit_credit decided (onchain/sql/onchain.sql: the outcomes)."""

    outcome: str
    why: str
    user_id: UUID | None
    phase: str | None  # the balance path's, when it credited
    mutation_created: bool
    ledger_status: str
    discrepancy: bool


DEPOSIT_STATUS = {
    "credited": InboxStatus.PROCESSED,
    "credited_before": InboxStatus.PROCESSED,
    "unknown_address": InboxStatus.PARKED,
    "held_other_currency": InboxStatus.PARKED,
    "currency_mismatch": InboxStatus.REFUSED,
    "contradicted": InboxStatus.REFUSED,
}
DEPOSIT_CREDIT_SQL = """
    SELECT outcome, why, deposit_user, phase, mutation_created, ledger_status, discrepancy
      FROM onchain_deposit_credit(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
DEPOSIT_ACCEPT_SQL = """
    SELECT inserted, inbox_status, outcome, why, deposit_user, phase, mutation_created,
           ledger_status, discrepancy
      FROM onchain_deposit_notification_accept(
           %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def deposit_credit(event: TransferEvent, *, correlation_id: str) -> tuple[str, str]:
    """Credit a completed inbound transfer to its deposit address's user, in the caller's
    transaction, once per transfer id whichever way it arrives (webhook, redelivery, poll; one
    decision at a time per transfer: concurrent deliveries wait for each other instead of
    colliding): onchain_deposit_credit decides. (status, why): parked when no user has the
    address; TransferRefused when the currency or the amount is not one we credit; refused with
    a TransferDiscrepancy when the transfer was already credited otherwise (another amount or
    user)."""
    if not connection.in_atomic_block:
        raise RuntimeError("deposit_credit must run inside transaction.atomic()")
    arguments = _deposit_arguments(event, _deposit_amount(event))
    if arguments is None:
        return _deposit_outcome(
            event, DepositCredit("unknown_address", "", None, None, False, "", False)
        )
    row = _deposit_execute(
        DEPOSIT_CREDIT_SQL, [*arguments, correlation_id, USDC_BUFFER], event.transfer_id
    )
    credit = DepositCredit(*row)
    if credit.outcome == "currency_mismatch":
        raise TransferRefused(credit.why)
    return _deposit_outcome(event, credit)


def _deposit_amount(event: TransferEvent) -> Decimal:
    """The amount to credit, or TransferRefused: a currency we hold, a strict decimal string."""
    if event.currency is None:
        raise TransferRefused(
            f"transfer {event.transfer_id}'s currency ({event.circle_currency or 'none'}) is "
            "not one we credit"
        )
    try:
        if not isinstance(event.amount, str):  # Circle writes amounts as decimal strings
            raise InvalidAmount(f"amount {event.amount!r} is not a decimal string")
        return amount_parse(event.amount, event.currency)
    except InvalidAmount as exc:
        raise TransferRefused(f"transfer {event.transfer_id}'s amount: {exc}") from None


def _deposit_arguments(event: TransferEvent, amount: Decimal) -> list | None:
    """onchain_deposit_credit's arguments before its source and counterparty: the address in
    its stored form (deposit_address_find's comparison), or None for a destination that names
    no address."""
    if not isinstance(event.address, str) or not event.address:
        return None
    chain = event.chain if isinstance(event.chain, str) else None
    address = address_stored_form(chain=chain, address=event.address) if chain else event.address
    return [
        event.transfer_id,
        chain,
        address,
        sorted(EVM_CHAINS),
        event.currency,
        amount,
        str(event.amount)[:64],  # as Circle wrote it, for a contradiction's record
        f"{event.amount!r} to {event.address!r}",
    ]


def _deposit_execute(sql: str, params: list, transfer_id: str) -> tuple:
    """One round trip (a prepared statement); the cutover's refusals as their domain errors, a
    strict failure naming the user the function found (its HINT)."""
    connection.ensure_connection()
    try:
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(sql, params, prepare=True)
            return cursor.fetchone()
    except DatabaseError as exc:
        hint = getattr(getattr(exc.__cause__, "diag", None), "message_hint", None)
        error = cutover_error_from(
            exc,
            user_id=UUID(hint) if hint else None,
            reference=f"circle:transfer:{transfer_id}",
        )
        if error is None:
            raise
        raise error from exc


def _deposit_outcome(event: TransferEvent, credit: DepositCredit) -> tuple[str, str]:
    """The inbox status and why for what onchain_deposit_credit decided; what an operator must
    hear logged, what it did counted once it commits."""
    if credit.outcome == "unknown_address":
        log.warning(
            "circle transfer %s to unknown address %r parked", event.transfer_id, event.address
        )
    elif credit.outcome == "held_other_currency":
        # The money is in our wallet but this user cannot hold it (one currency per user):
        # kept for an operator, never a retry loop. (PostgreSQL refuses such an address, OC002;
        # this covers a user whose first money came in another currency after registering.)
        log.error(
            "ALERT circle transfer %s to %s: %s; parked for an operator",
            event.transfer_id,
            event.address,
            credit.why,
        )
    elif credit.outcome == "contradicted":
        # Recorded once for an operator (who may credit or debit the difference).
        log.error("ALERT %s", credit.why)
        transaction.on_commit(metrics.transfer_discrepancies.inc)
    elif credit.outcome == "credited":
        mutation_observed(
            phase=credit.phase,
            created=credit.mutation_created,
            ledger_status=credit.ledger_status,
            discrepancy=credit.discrepancy,
        )
        transaction.on_commit(metrics.deposits_processed.inc)
    status = DEPOSIT_STATUS[credit.outcome]
    return status, credit.why if status == InboxStatus.REFUSED else ""


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
