"""Custody: the opening of each system buffer and the custody discrepancies."""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from cutover.models.discrepancies import DiscrepancyStatus


class CustodyOpening(models.Model):
    """The opening balance of a system buffer (`usdc_buffer`, `fiat_buffer`), booked once per
    currency from what the provider reported. Its existence turns on the legacy mirror of the
    balance path for that currency (cutover_balance_mutate)."""

    currency = models.CharField(max_length=8, unique=True)
    reported = models.DecimalField(max_digits=38, decimal_places=6)
    source = models.CharField(max_length=64)
    buffer_before = models.DecimalField(max_digits=38, decimal_places=6)
    ledger_transaction_id = models.BigIntegerField(null=True, blank=True)
    opened_by = models.CharField(max_length=150)
    reason = models.TextField()
    opened_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "cutover_custody_openings"
        constraints = [
            models.CheckConstraint(
                condition=Q(reported__gte=0), name="cutover_custody_openings_chk_reported"
            ),
        ]

    def __str__(self) -> str:
        return f"custody {self.currency}: {self.reported} from {self.source}"


class CustodyDiscrepancy(models.Model):
    """A system buffer whose ledger balance is not what its provider reports. One open row per
    currency and source; later sightings update it; resolved when they agree again."""

    currency = models.CharField(max_length=8)
    source = models.CharField(max_length=64)
    ledger_balance = models.DecimalField(max_digits=38, decimal_places=6)
    reported = models.DecimalField(max_digits=38, decimal_places=6)
    difference = models.DecimalField(max_digits=38, decimal_places=6)
    status = models.CharField(
        max_length=8, choices=DiscrepancyStatus.choices, default=DiscrepancyStatus.OPEN
    )
    occurrences = models.PositiveIntegerField(db_default=1)
    first_seen_at = models.DateTimeField(db_default=Now())
    last_seen_at = models.DateTimeField(db_default=Now())
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "cutover_custody_discrepancies"
        verbose_name_plural = "custody discrepancies"
        ordering = ["-last_seen_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["currency", "source"],
                condition=Q(status="open"),
                name="cutover_custody_discrepancies_uniq_open",
            ),
            models.CheckConstraint(
                condition=Q(status__in=DiscrepancyStatus.values),
                name="cutover_custody_discrepancies_chk_status",
            ),
        ]

    def __str__(self) -> str:
        return (
            f"custody {self.currency} ({self.source}): ledger {self.ledger_balance}, "
            f"reported {self.reported}"
        )
