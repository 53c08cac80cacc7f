"""The on-chain engine's services: verifying and storing Circle notifications, and applying them
(a completed inbound transfer to a user's deposit address credits that user through the
cutover's balance path, against the system USDC buffer)."""

import base64
import binascii
import json
import logging
import traceback
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from cutover.services import balance_mutation_apply
from ledger.selectors import system_account
from onchain import circle, metrics
from onchain.exceptions import MalformedNotification, SignatureRejected
from onchain.models import CircleNotification, CirclePublicKey, DepositAddress, InboxStatus

log = logging.getLogger(__name__)
SUPPORTED_TYPES = {"transfers.created", "transfers.completed", "transfers.failed", "webhooks.test"}
ALGORITHM = "ECDSA_SHA_256"


def _public_key(key_id: str):
    """The signing key, from the table or fetched from Circle once per unknown key id."""
    known = CirclePublicKey.objects.filter(key_id=key_id).first()
    if known is None:
        algorithm, public_key = circle.public_key_fetch(key_id)
        known, _ = CirclePublicKey.objects.get_or_create(
            key_id=key_id, defaults={"algorithm": algorithm, "public_key": public_key}
        )
    if known.algorithm != ALGORITHM:
        raise SignatureRejected(f"key {key_id} uses {known.algorithm}, not {ALGORITHM}")
    return load_der_public_key(base64.b64decode(known.public_key))


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


def notification_receive(*, body: bytes, signature: str, key_id: str) -> Delivery:
    """Verify, store raw (deduplicated by Circle's notification id), then process. A delivery
    of a notification already processed (or parked) changes nothing; a failed one is retried."""
    signature_verify(body=body, signature=signature, key_id=key_id)
    try:
        payload = json.loads(body)
        notification_id = str(payload["notificationId"])
        notification_type = str(payload["notificationType"])
    except (ValueError, KeyError, TypeError):
        raise MalformedNotification("the body is not a Circle notification") from None
    if notification_type not in SUPPORTED_TYPES:
        raise MalformedNotification(f"unsupported notificationType {notification_type!r}")
    try:
        with transaction.atomic():
            CircleNotification.objects.create(
                notification_id=notification_id,
                notification_type=notification_type,
                key_id=key_id,
                body=body.decode(),
            )
        duplicate = False
    except IntegrityError:  # Circle redelivered it (possibly concurrently)
        CircleNotification.objects.filter(notification_id=notification_id).update(
            deliveries=F("deliveries") + 1
        )
        duplicate = True
    status = notification_process(notification_id=notification_id)
    metrics.webhook_received.labels(outcome="duplicate" if duplicate else status).inc()
    return Delivery(notification_id, status, duplicate)


def notification_process(*, notification_id: str) -> str:
    """Apply a stored notification once (also the operator's replay). Its row is locked while
    it is applied, and marked
    processed in the same transaction as its effect; a failure is recorded on the row (with its
    traceback) in a transaction of its own and leaves it retryable."""
    try:
        with transaction.atomic():
            row = CircleNotification.objects.select_for_update().get(
                notification_id=notification_id
            )
            if row.status == InboxStatus.PROCESSED:
                return row.status  # parked and failed ones are evaluated again
            status = _apply(row)
            row.status = status
            row.error = ""
            row.attempts += 1
            row.processed_at = timezone.now()
            row.save(update_fields=["status", "error", "attempts", "processed_at"])
            return status
    except Exception:
        CircleNotification.objects.filter(notification_id=notification_id).update(
            status=InboxStatus.FAILED, error=traceback.format_exc(), attempts=F("attempts") + 1
        )
        raise


def _apply(row: CircleNotification) -> str:
    payload = json.loads(row.body)
    if row.notification_type != "transfers.completed":
        return InboxStatus.PROCESSED  # recorded; only a completed transfer moves money here
    transfer = payload.get("notification") or payload.get("transfer") or {}
    destination = (transfer.get("destination") or {}).get("address")
    address = DepositAddress.objects.filter(address=destination).first()
    if address is None:
        log.warning(
            "circle transfer %s to unknown address %s parked", transfer.get("id"), destination
        )
        return InboxStatus.PARKED
    try:
        amount = Decimal(str(transfer["amount"]["amount"]))
        transfer_id = str(transfer["id"])
    except (KeyError, TypeError, InvalidOperation):
        raise MalformedNotification("the transfer has no id or amount") from None
    balance_mutation_apply(
        user_id=address.user_id,
        direction="credit",
        amount=amount,
        reference=f"circle:transfer:{transfer_id}",
        reason="circle_deposit",
        currency=address.currency,
        counterparty="usdc_buffer",
        correlation_id=row.notification_id,
    )
    transaction.on_commit(metrics.deposits_processed.inc)
    return InboxStatus.PROCESSED


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
