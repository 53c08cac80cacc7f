"""The on-chain engine's records: users' deposit addresses, Circle's signing keys as fetched,
and the inbox of Circle notifications.

What PostgreSQL holds: one inbox row per Circle notification id (Circle redelivers with the same
id); one user per deposit address; legal inbox statuses.
"""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now


class DepositAddress(models.Model):
    address = models.CharField(max_length=128, unique=True)
    chain = models.CharField(max_length=16)
    user_id = models.UUIDField(db_index=True)
    currency = models.CharField(max_length=8, default="USDC")
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "onchain_deposit_addresses"
        verbose_name_plural = "deposit addresses"

    def __str__(self) -> str:
        return f"{self.chain}:{self.address}"


class CirclePublicKey(models.Model):
    """A notification-signing public key, fetched once per key id from Circle."""

    key_id = models.CharField(max_length=64, primary_key=True)
    algorithm = models.CharField(max_length=32)
    public_key = models.TextField()  # base64 DER SubjectPublicKeyInfo, as Circle serves it
    fetched_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "onchain_circle_public_keys"

    def __str__(self) -> str:
        return self.key_id


class InboxStatus(models.TextChoices):
    RECEIVED = "received", "Received"
    PROCESSED = "processed", "Processed"
    PARKED = "parked", "Parked for an operator"
    FAILED = "failed", "Failed (retryable)"


class CircleNotification(models.Model):
    """A verified Circle notification, stored raw before it is processed."""

    notification_id = models.CharField(max_length=64, unique=True)
    notification_type = models.CharField(max_length=64)
    key_id = models.CharField(max_length=64)
    body = models.TextField()
    status = models.CharField(
        max_length=12, choices=InboxStatus.choices, default=InboxStatus.RECEIVED
    )
    error = models.TextField(blank=True, default="")
    deliveries = models.PositiveIntegerField(default=1)
    attempts = models.PositiveIntegerField(default=0)
    received_at = models.DateTimeField(db_default=Now())
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "onchain_circle_notifications"
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=InboxStatus.values),
                name="onchain_circle_notifications_chk_status",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.notification_type} {self.notification_id}"
