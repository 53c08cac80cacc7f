"""The balance path's journal (one row per mutation reference) and strict mode's failures."""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from cutover.models.phase import PHASE_CHOICES, Direction


class LedgerStatus(models.TextChoices):
    POSTED = "posted", "Posted"
    FAILED = "failed", "Failed (recorded, request succeeded)"
    NOT_WRITTEN = "not_written", "Not written in this phase"


class BalanceMutation(models.Model):
    """The balance path's journal: one row per mutation reference, written in the mutation's
    transaction, so a reference is applied exactly once in every phase."""

    reference = models.CharField(max_length=255, unique=True)
    user_id = models.UUIDField()
    direction = models.CharField(max_length=6, choices=Direction.choices)
    amount = models.DecimalField(max_digits=38, decimal_places=6)
    currency = models.CharField(max_length=8)
    reason = models.CharField(max_length=64)
    phase = models.CharField(max_length=16, choices=PHASE_CHOICES)
    legacy_balance_after = models.DecimalField(
        max_digits=38, decimal_places=6, null=True, blank=True
    )
    ledger_status = models.CharField(max_length=12, choices=LedgerStatus.choices)
    ledger_transaction_id = models.BigIntegerField(null=True, blank=True)
    ledger_error = models.TextField(blank=True, db_default="")
    correlation_id = models.CharField(max_length=128, blank=True, db_default="")
    created_at = models.DateTimeField(db_default=Now(), db_index=True)
    # The shadow experiment's figures (cutover_balance_mutate measures them): each store's
    # write time in microseconds, NULL when the phase does not write it; whether the two
    # stores' balances differed after a dual write.
    legacy_us = models.BigIntegerField(null=True, blank=True)
    ledger_us = models.BigIntegerField(null=True, blank=True)
    mismatch = models.BooleanField(db_default=False)

    class Meta:
        db_table = "cutover_balance_mutations"
        constraints = [
            models.CheckConstraint(
                condition=Q(amount__gt=0), name="cutover_balance_mutations_chk_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reference}: {self.direction} {self.amount} {self.currency}"


class StrictFailure(models.Model):
    """A request refused in strict mode because its ledger write failed (its legacy write was
    rolled back with it). Recorded after the rollback, in a transaction of its own."""

    at = models.DateTimeField(db_default=Now())
    phase = models.CharField(max_length=16, choices=PHASE_CHOICES)
    user_id = models.UUIDField()
    reference = models.CharField(max_length=255)
    error = models.TextField()

    class Meta:
        db_table = "cutover_strict_failures"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.reference}: {self.error}"
