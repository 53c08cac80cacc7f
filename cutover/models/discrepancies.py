"""Discrepancies between the two stores, their triage, known differences and repairs."""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from cutover.models.phase import PHASE_CHOICES


class DiscrepancyStatus(models.TextChoices):
    OPEN = "open", "Open"
    RESOLVED = "resolved", "Resolved"


class TriageStatus(models.TextChoices):
    """Where working a legacy-vs-ledger discrepancy stands (cutover.discrepancies)."""

    OPEN = "open", "Open"
    INVESTIGATING = "investigating", "Investigating"
    KNOWN_DIFFERENCE = "known_difference", "Known difference"
    REPAIRED = "repaired", "Repaired"
    RESOLVED = "resolved", "Resolved (the stores agree again)"


# Unresolved: the stores still differ as far as anyone knows; one such row per user and currency.
UNRESOLVED = [TriageStatus.OPEN, TriageStatus.INVESTIGATING, TriageStatus.KNOWN_DIFFERENCE]


class DiscrepancySource(models.TextChoices):
    DUAL_WRITE = "dual_write", "Compared after a dual write"
    LEDGER_WRITE_FAILED = "ledger_write_failed", "Ledger write failed in a tolerant phase"
    RECONCILIATION = "reconciliation", "Found by reconciliation"


class KnownDifference(models.Model):
    """A known-difference rule (Scientist's `ignore`), made by an operator from a discrepancy
    with a reason and an expiry. While it is active (`expires_at` in the future) an unresolved
    discrepancy it matches does not count against the gates, and a reconciliation that finds
    only such differences is clean. Matching: the same user, the same currency and the same
    difference (legacy - ledger) to the last unit; a difference that moves counts again. Never
    changed or deleted, except that it may end early (`expires_at` moved earlier)."""

    user_id = models.UUIDField()
    currency = models.CharField(max_length=8)
    difference = models.DecimalField(max_digits=38, decimal_places=6)
    reason = models.TextField()
    created_by = models.CharField(max_length=150)
    created_at = models.DateTimeField(db_default=Now())
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "cutover_known_differences"
        indexes = [models.Index(fields=["user_id", "currency"], name="cutover_known_diff_user")]
        constraints = [
            models.CheckConstraint(
                condition=~Q(difference=0), name="cutover_known_differences_chk_difference"
            ),
            models.CheckConstraint(
                condition=~Q(reason=""), name="cutover_known_differences_chk_reason"
            ),
            models.CheckConstraint(
                condition=Q(expires_at__gt=models.F("created_at")),
                name="cutover_known_differences_chk_expiry",
            ),
        ]

    def __str__(self) -> str:
        return f"known difference {self.pk}: {self.difference} {self.currency} for {self.user_id}"


class Discrepancy(models.Model):
    """A user whose legacy and ledger balances differ. One unresolved row (open, investigating,
    known difference) per user and currency; later sightings update it (occurrences, last
    values). Worked by operators through cutover.discrepancies: triaged, then repaired."""

    user_id = models.UUIDField()
    currency = models.CharField(max_length=8)
    legacy_balance = models.DecimalField(max_digits=38, decimal_places=6, null=True)
    ledger_balance = models.DecimalField(max_digits=38, decimal_places=6, null=True)
    difference = models.DecimalField(max_digits=38, decimal_places=6)
    status = models.CharField(
        max_length=16, choices=TriageStatus.choices, default=TriageStatus.OPEN
    )
    # The rule a known difference is covered by (set with the status; see KnownDifference).
    known_difference = models.ForeignKey(
        KnownDifference, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    source = models.CharField(max_length=24, choices=DiscrepancySource.choices)
    phase = models.CharField(max_length=16, choices=PHASE_CHOICES)
    reference = models.CharField(max_length=255, blank=True, db_default="")
    detail = models.TextField(blank=True, db_default="")
    occurrences = models.PositiveIntegerField(db_default=1)
    first_seen_at = models.DateTimeField(db_default=Now())
    last_seen_at = models.DateTimeField(db_default=Now())
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True, db_default="")
    resolution_note = models.TextField(blank=True, db_default="")

    class Meta:
        db_table = "cutover_discrepancies"
        verbose_name_plural = "discrepancies"
        permissions = [
            ("triage_discrepancy", "Can mark a discrepancy investigating or a known difference"),
            ("request_discrepancy_repair", "Can request the repair of a discrepancy"),
            ("approve_discrepancy_repair", "Can approve another operator's discrepancy repair"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["user_id", "currency"],
                condition=Q(status__in=UNRESOLVED),
                name="cutover_discrepancies_uniq_unresolved",
            ),
            models.CheckConstraint(
                condition=Q(status__in=TriageStatus.values),
                name="cutover_discrepancies_chk_status",
            ),
            models.CheckConstraint(
                condition=~Q(status=TriageStatus.KNOWN_DIFFERENCE)
                | Q(known_difference__isnull=False),
                name="cutover_discrepancies_chk_known_rule",
            ),
        ]
        indexes = [models.Index(fields=["status", "last_seen_at"])]

    def __str__(self) -> str:
        return f"discrepancy {self.pk}"


class RepairSide(models.TextChoices):
    LEGACY = "legacy", "Legacy store: set it to the ledger's balance"
    LEDGER = "ledger", "Ledger: set it to the legacy balance"


class RepairStatus(models.TextChoices):
    REQUESTED = "requested", "Requested (waiting for a second operator)"
    APPLIED = "applied", "Applied"
    LAPSED = "lapsed", "Lapsed (not applied)"


class DiscrepancyRepair(models.Model):
    """The correcting entry for a discrepancy: requested by one operator on the side they pick,
    with a reason, for the difference the stores showed then; applied only when another
    operator approves it and the stores still show that difference (cutover.discrepancies).
    Decided once (applied or lapsed, never changed after); one waiting request per
    discrepancy; the approver is never the requester (a CHECK)."""

    discrepancy = models.ForeignKey(Discrepancy, on_delete=models.PROTECT, related_name="repairs")
    side = models.CharField(max_length=8, choices=RepairSide.choices)
    difference = models.DecimalField(max_digits=38, decimal_places=6)  # legacy - ledger
    legacy_balance = models.DecimalField(max_digits=38, decimal_places=6, null=True, blank=True)
    ledger_balance = models.DecimalField(max_digits=38, decimal_places=6, null=True, blank=True)
    reason = models.TextField()
    requested_by = models.CharField(max_length=150)
    requested_at = models.DateTimeField(db_default=Now())
    status = models.CharField(
        max_length=12, choices=RepairStatus.choices, default=RepairStatus.REQUESTED
    )
    approved_by = models.CharField(max_length=150, blank=True, default="")
    decided_at = models.DateTimeField(null=True, blank=True)
    legacy_after = models.DecimalField(max_digits=38, decimal_places=6, null=True, blank=True)
    ledger_after = models.DecimalField(max_digits=38, decimal_places=6, null=True, blank=True)
    ledger_transaction_id = models.BigIntegerField(null=True, blank=True)
    lapsed_why = models.TextField(blank=True, default="")

    class Meta:
        db_table = "cutover_discrepancy_repairs"
        constraints = [
            models.CheckConstraint(
                condition=Q(side__in=RepairSide.values), name="cutover_repairs_chk_side"
            ),
            models.CheckConstraint(
                condition=Q(status__in=RepairStatus.values), name="cutover_repairs_chk_status"
            ),
            models.CheckConstraint(
                condition=~Q(difference=0), name="cutover_repairs_chk_difference"
            ),
            models.CheckConstraint(condition=~Q(reason=""), name="cutover_repairs_chk_reason"),
            models.CheckConstraint(
                condition=Q(approved_by="") | ~Q(approved_by=models.F("requested_by")),
                name="cutover_repairs_chk_second_person",
            ),
            models.CheckConstraint(
                condition=Q(status=RepairStatus.APPLIED, decided_at__isnull=False)
                & ~Q(approved_by="")
                | ~Q(status=RepairStatus.APPLIED) & Q(approved_by=""),
                name="cutover_repairs_chk_approved",
            ),
            models.UniqueConstraint(
                fields=["discrepancy"],
                condition=Q(status=RepairStatus.REQUESTED),
                name="cutover_repairs_uniq_requested",
            ),
        ]

    def __str__(self) -> str:
        return f"repair {self.pk} of discrepancy {self.discrepancy_id} ({self.side})"
