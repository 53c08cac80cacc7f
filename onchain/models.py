"""The on-chain engine's records: users' deposit addresses, Circle's signing keys as fetched
(with the fetches of signing material counted against their budget, and the SNS certificate
URLs that failed), the inbox of Circle notifications and the outbox of withdrawals.

What PostgreSQL holds: one inbox row per Circle notification id (Circle redelivers with the same
id); one user per deposit address and chain, EVM addresses in lower case; legal inbox statuses;
one withdrawal per Circle transfer id and per idempotency key; the withdrawals' legal state
transitions (onchain/sql/onchain.sql). Also, for every Celery task of the project (a record the
worker keeps, hosted here), one delivery row per task id with legal statuses and attempts.
"""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower, Now

from onchain.chains import EVM_ADDRESS_PATTERN, EVM_CHAINS


class DepositAddress(models.Model):
    """A user's address for deposits on one chain, registered through
    onchain.addresses.deposit_address_add. One user per (chain, address): the same EVM address
    may be registered on several EVM chains (one key is an account on each), each a row. EVM
    addresses are stored in lower case (onchain.chains), so the uniqueness is case-insensitive
    for them; other chains' addresses are case-sensitive and stored exactly."""

    address = models.CharField(max_length=128)
    chain = models.CharField(max_length=16)
    user_id = models.UUIDField(db_index=True)
    currency = models.CharField(max_length=8, default="USDC")
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "onchain_deposit_addresses"
        verbose_name_plural = "deposit addresses"
        constraints = [
            models.UniqueConstraint(
                fields=["chain", "address"], name="onchain_deposit_addresses_uniq_chain_address"
            ),
            # As onchain.chains.address_stored_form: an EVM hex address only in lower case.
            models.CheckConstraint(
                condition=~Q(chain__in=sorted(EVM_CHAINS))
                | ~Q(address__regex=EVM_ADDRESS_PATTERN)
                | Q(address=Lower("address")),
                name="onchain_deposit_addresses_chk_evm_lower_case",
            ),
        ]
        # A destination without a chain is looked up by address alone, on every deposit: the
        # unique (chain, address) index cannot serve that (it leads with chain).
        indexes = [models.Index(fields=["address"], name="onchain_depaddr_address")]

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


class CircleUnknownKey(models.Model):
    """A key id Circle answered 404 for, and when: not asked again for
    CIRCLE_UNKNOWN_KEY_TTL (in the database, so every worker process knows it)."""

    key_id = models.CharField(max_length=64, primary_key=True)
    checked_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "onchain_circle_unknown_keys"

    def __str__(self) -> str:
        return self.key_id


class SigningFetch(models.Model):
    """A fetch of signing material we did not hold (a Circle key id, an SNS certificate URL):
    at most CIRCLE_KEY_FETCHES_PER_MINUTE in any CIRCLE_KEY_FETCH_WINDOW, counted here so that
    every worker process spends one budget (onchain.signatures.signing_fetch_claim). Rows
    older than the window are deleted as new ones come."""

    source = models.TextField()  # the key id or the certificate URL
    fetched_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "onchain_signing_fetches"

    def __str__(self) -> str:
        return self.source


class SnsCertificateFailure(models.Model):
    """An SNS certificate URL whose fetch failed for good (4xx, not a PEM certificate, not
    RSA), and how: answered the same without fetching it again for CIRCLE_UNKNOWN_KEY_TTL (in
    the database, so every worker process knows it). Keyed by the URL's SHA-256: a URL may be
    longer than an index entry can be."""

    url_sha256 = models.CharField(max_length=64, primary_key=True)
    url = models.TextField()
    rejected = models.BooleanField()  # SnsRejected (403); otherwise SnsUnavailable (503)
    error = models.TextField()
    checked_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "onchain_sns_certificate_failures"

    def __str__(self) -> str:
        return self.url


class InboxStatus(models.TextChoices):
    RECEIVED = "received", "Received"
    PROCESSED = "processed", "Processed"
    PARKED = "parked", "Parked for an operator"
    FAILED = "failed", "Failed (retryable)"
    REFUSED = "refused", "Refused (kept, not credited: see why)"


class CircleNotification(models.Model):
    """A verified Circle notification, stored raw before it is processed; or a transfer the
    poll found malformed in Circle's list, parked (`poll:<transfer id>`, type poll.transfer)."""

    notification_id = models.CharField(max_length=64, unique=True)
    notification_type = models.CharField(max_length=64)
    transfer_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
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
        # /metrics counts the rows waiting for an operator or a retry at every scrape.
        indexes = [
            models.Index(
                fields=["status"],
                condition=Q(status__in=["parked", "failed"]),
                name="onchain_notifications_waiting",
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=InboxStatus.values),
                name="onchain_circle_notifications_chk_status",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.notification_type} {self.notification_id}"


class TransferDiscrepancyStatus(models.TextChoices):
    OPEN = "open", "Open"
    RESOLVED = "resolved", "Resolved"


class TransferDiscrepancy(models.Model):
    """A verified notification that contradicts what was already credited for its transfer
    (another amount, another address): nothing more is credited, an operator decides. One row
    per contradicting notification."""

    transfer_id = models.CharField(max_length=64, db_index=True)
    notification_id = models.CharField(max_length=64, unique=True)
    reference = models.CharField(max_length=255)  # the balance-path credit it contradicts
    credited_amount = models.DecimalField(max_digits=38, decimal_places=6)
    notified_amount = models.CharField(max_length=64)  # as Circle wrote it
    detail = models.TextField()
    status = models.CharField(
        max_length=8,
        choices=TransferDiscrepancyStatus.choices,
        default=TransferDiscrepancyStatus.OPEN,
    )
    created_at = models.DateTimeField(db_default=Now())
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True, default="")
    resolution_note = models.TextField(blank=True, default="")

    class Meta:
        db_table = "onchain_transfer_discrepancies"
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=TransferDiscrepancyStatus.values),
                name="onchain_transfer_discrepancies_chk_status",
            ),
        ]

    def __str__(self) -> str:
        return f"transfer {self.transfer_id}: credited {self.credited_amount}"


class WithdrawalStatus(models.TextChoices):
    PENDING = "pending", "Pending (held, to be sent to Circle)"
    SUBMITTED = "submitted", "Submitted (Circle accepted the transfer)"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed (the hold was reversed)"
    DEAD = "dead", "Dead (sending gave up; an operator decides)"


class Withdrawal(models.Model):
    """A user's USDC withdrawal, and the outbox row a worker sends to Circle.

    The user's money is held in `withdrawals_pending_usdc` from the moment the row exists (the
    hold and the row are one transaction); completion moves it out of the USDC buffer, failure
    reverses the hold. `idempotency_key` is Circle's idempotencyKey for the transfer: every
    resend, after any crash, asks Circle for the same transfer.
    """

    idempotency_key = models.UUIDField(unique=True)
    user_id = models.UUIDField(db_index=True)
    amount = models.DecimalField(max_digits=38, decimal_places=6)
    currency = models.CharField(max_length=8, default="USDC")
    address = models.CharField(max_length=128)
    chain = models.CharField(max_length=16)
    status = models.CharField(
        max_length=12, choices=WithdrawalStatus.choices, default=WithdrawalStatus.PENDING
    )
    hold_in_ledger = models.BooleanField()  # the hold was posted to the ledger (not legacy)
    circle_transfer_id = models.CharField(max_length=64, null=True, blank=True, unique=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(db_default=Now())
    last_error = models.TextField(blank=True, default="")
    requested_by = models.CharField(max_length=150, blank=True, default="")
    correlation_id = models.CharField(max_length=128, blank=True, default="")
    created_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "onchain_withdrawals"
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="onchain_withdrawals_due",
            ),
            # /metrics counts the dead ones at every scrape.
            models.Index(
                fields=["status"], condition=Q(status="dead"), name="onchain_withdrawals_dead"
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=WithdrawalStatus.values),
                name="onchain_withdrawals_chk_status",
            ),
            models.CheckConstraint(
                condition=Q(amount__gt=0), name="onchain_withdrawals_chk_amount"
            ),
            models.CheckConstraint(
                condition=Q(status__in=["pending", "dead", "failed"])
                | Q(circle_transfer_id__isnull=False),
                name="onchain_withdrawals_chk_transfer_id",
            ),
        ]

    def __str__(self) -> str:
        return f"withdrawal {self.idempotency_key} {self.amount} {self.currency} {self.status}"

    @property
    def hold_reference(self) -> str:
        return f"circle:withdrawal:{self.idempotency_key}:hold"

    @property
    def reversal_reference(self) -> str:
        return f"circle:withdrawal:{self.idempotency_key}:reversal"
