"""The phase (one row) and its legal values, the legacy `balances` table it migrates from, and
the audit trails of phase flips and operator actions."""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from cutover.phases import Phase

PHASE_CHOICES = [(phase.value, phase.value) for phase in Phase]


class Direction(models.TextChoices):
    CREDIT = "credit", "Credit"
    DEBIT = "debit", "Debit"


class LegacyBalance(models.Model):
    """The legacy store, as the old system has it."""

    user_id = models.UUIDField(primary_key=True)
    buying_power = models.DecimalField(max_digits=38, decimal_places=6, db_default=0)
    currency = models.CharField(max_length=8, db_default="USDC")
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "balances"
        constraints = [
            models.CheckConstraint(
                condition=Q(buying_power__gte=0), name="balances_chk_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}: {self.buying_power} {self.currency}"


class PhaseState(models.Model):
    """The one row saying where the rollout stands; changed only by cutover.phase_machine."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    phase = models.CharField(max_length=16, choices=PHASE_CHOICES)
    read_percent = models.PositiveSmallIntegerField(default=0)
    entered_at = models.DateTimeField()
    kill_switch = models.BooleanField(default=False)
    kill_switch_reason = models.TextField(blank=True)
    kill_switch_changed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "cutover_phase_state"
        verbose_name = "phase and flags"
        verbose_name_plural = "phase and flags"
        permissions = [
            ("advance_phase", "Can advance the rollout to the next phase"),
            ("force_gate", "Can advance past a gate that is not met (with a reason)"),
            ("rollback_phase", "Can roll the rollout back to legacy"),
            ("operate_kill_switch", "Can engage and release the kill switch"),
            ("open_custody", "Can book a system buffer's custody opening balance"),
            ("archive_legacy", "Can archive the legacy store after its time in cutover"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(id=1), name="cutover_phase_state_chk_singleton"),
            models.CheckConstraint(
                condition=Q(phase__in=[p.value for p in Phase]),
                name="cutover_phase_state_chk_phase",
            ),
            models.CheckConstraint(
                condition=Q(read_percent__lte=100), name="cutover_phase_state_chk_percent"
            ),
        ]

    def __str__(self) -> str:
        return self.phase


class AuditAction(models.TextChoices):
    SEED = "seed", "Seeded from the environment"
    ADVANCE = "advance", "Advance"
    FORCE = "force", "Forced advance"
    ROLLBACK = "rollback", "Rollback"
    READ_PERCENT = "read_percent", "Read percentage"
    KILL_SWITCH_ON = "kill_switch_on", "Kill switch engaged"
    KILL_SWITCH_OFF = "kill_switch_off", "Kill switch released"


class PhaseAudit(models.Model):
    """Append-only: who changed what, when, from, to, why, and the gate evidence."""

    at = models.DateTimeField(db_default=Now())
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=16, choices=AuditAction.choices)
    from_phase = models.CharField(max_length=16)
    to_phase = models.CharField(max_length=16)
    reason = models.TextField(blank=True)
    evidence = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "cutover_phase_audit"
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.actor} {self.action} {self.to_phase}"


class OperatorAudit(models.Model):
    """Append-only (a trigger refuses UPDATE and DELETE): every operator action on money or on
    the engines' settings, written in the same transaction as the action. `before` and `after`
    are the target's fields the action changed."""

    at = models.DateTimeField(db_default=Now())
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=64)
    target = models.CharField(max_length=150)
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    reason = models.TextField(blank=True)

    class Meta:
        db_table = "cutover_operator_audit"
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["target", "-at"], name="cutover_operator_audit_target")]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.actor} {self.action} {self.target}"
