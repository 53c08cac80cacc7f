"""The migration's state: the legacy `balances` table, the phase, its audit trail, the balance
path's journal, discrepancies, reconciliation runs, strict-mode failures, and custody (the
opening of each system buffer and the custody discrepancies).

What PostgreSQL holds: one phase row (id = 1) with a legal phase and read percentage; legacy
balances never negative; one currency per user (one legacy row, at most one ledger balance
account, and cutover_balance_mutate refuses any other currency); one journal row per mutation
reference (exactly once), never updated or deleted; one open discrepancy per user and currency;
audit rows never updated or deleted (triggers in cutover/sql/cutover.sql); custody opened once
per currency, from a reported balance that is not negative; one open custody discrepancy per
currency and source; the legacy store archived once, only after its time in cutover, and never
left again (no phase but cutover once it is archived); a discrepancy's triage moves only as
cutover_discrepancy_transition allows (open -> investigating | known difference -> repaired |
resolved; repaired only by an applied repair, which another operator approved than the one who
requested it); known-difference rules never change except to end early; repair requests are
decided once; alert states change only when they flip; at most one reconciliation run running,
a run finished exactly when it is not running, and a difference listed once per run, user and
currency; at most one unfinished backfill run, its user ranges one per run and seq with low <
high, and a backfill posting once per state of a user's account.
"""

from datetime import timedelta

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


class RunStatus(models.TextChoices):
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    ABANDONED = "abandoned", "Abandoned (the phase left dual writes)"


class ReconciliationRun(models.Model):
    """A full reconciliation: its chunks (ReconciliationChunk) are taken by any number of
    workers; the run is completed, with the chunks' sums, when its last chunk is done. At most
    one run is running at a time (a partial unique index): a worker that starts one while
    another runs joins it instead. Gates and the cockpit read completed runs only."""

    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.RUNNING)
    phase = models.CharField(max_length=16, choices=PHASE_CHOICES)
    chunks = models.IntegerField(default=1, db_default=1)
    users_checked = models.BigIntegerField(default=0, db_default=0)
    differences = models.BigIntegerField(default=0, db_default=0)
    new_discrepancies = models.BigIntegerField(default=0, db_default=0)
    resolved = models.BigIntegerField(default=0, db_default=0)
    legacy_total = models.DecimalField(max_digits=38, decimal_places=6, default=0, db_default=0)
    ledger_total = models.DecimalField(max_digits=38, decimal_places=6, default=0, db_default=0)
    triggered_by = models.CharField(max_length=150)
    # Of `differences`, those an active known-difference rule matched (they keep a run clean).
    known_differences = models.BigIntegerField(default=0, db_default=0)

    class Meta:
        db_table = "cutover_reconciliation_runs"
        ordering = [models.F("finished_at").desc(nulls_last=True), "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["status"],
                condition=Q(status="running"),
                name="cutover_reconciliation_runs_one_running",
            ),
            models.CheckConstraint(
                condition=Q(status__in=RunStatus.values),
                name="cutover_reconciliation_runs_chk_status",
            ),
            models.CheckConstraint(
                condition=Q(status="running", finished_at__isnull=True)
                | (~Q(status="running") & Q(finished_at__isnull=False)),
                name="cutover_reconciliation_runs_chk_finished",
            ),
        ]

    def __str__(self) -> str:
        if self.finished_at is None:
            return f"reconciliation {self.started_at:%Y-%m-%d %H:%M}: {self.status}"
        return f"reconciliation {self.finished_at:%Y-%m-%d %H:%M}: {self.differences} differences"

    @property
    def clean(self) -> bool:
        return self.status == RunStatus.COMPLETED and self.differences == self.known_differences


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


class LegacyArchive(models.Model):
    """A legacy table archived after its time in cutover (the deployment checklist's Phase 5,
    "Archive legacy tables after 90 days"): its rows copied into the `legacy_archive` schema,
    the live table emptied and closed to writes (cutover.legacy_archive). One row per table,
    never changed. PostgreSQL refuses a row unless the phase is cutover and has been for
    `min_time_in_cutover`, and refuses leaving cutover once a row exists."""

    table_name = models.CharField(max_length=63, unique=True)
    archived_as = models.CharField(max_length=127)
    rows = models.BigIntegerField()
    totals = models.JSONField()  # per currency: {"rows": n, "total": "decimal"}
    cutover_entered_at = models.DateTimeField()
    min_time_in_cutover = models.DurationField()
    archived_at = models.DateTimeField(db_default=Now())
    archived_by = models.CharField(max_length=150)
    reason = models.TextField()

    class Meta:
        db_table = "cutover_legacy_archives"
        constraints = [
            models.CheckConstraint(
                condition=Q(rows__gte=0), name="cutover_legacy_archives_chk_rows"
            ),
            models.CheckConstraint(
                condition=Q(min_time_in_cutover__gt=timedelta(0)),
                name="cutover_legacy_archives_chk_min_time",
            ),
            models.CheckConstraint(
                condition=~Q(reason=""), name="cutover_legacy_archives_chk_reason"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.table_name} archived as {self.archived_as} at {self.archived_at:%Y-%m-%d}"


class AlertState(models.Model):
    """The last state of an alert that is logged when it changes rather than every time it is
    looked at (cutover.alerts): one row per alert, written only when it flips."""

    name = models.CharField(max_length=64, primary_key=True)
    firing = models.BooleanField()
    changed_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "cutover_alert_states"

    def __str__(self) -> str:
        return f"{self.name}: {'firing' if self.firing else 'quiet'}"


class TaskDeliveryStatus(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"


class TaskDelivery(models.Model):
    """One Celery message, by its task id, as the workers received it (cutover.deliveries, for
    every task of every app through config.deliveries): how many times it was started and how
    it ended. A message put back after its process died is started again, counted; one started
    TASK_DELIVERY_MAX_ATTEMPTS times without finishing is dead, never run again; a finished
    one delivered again is not run again (counted in `duplicates`). Not money: the workers'
    record, kept by the app every task-running app builds on."""

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255)
    status = models.CharField(
        max_length=16, choices=TaskDeliveryStatus.choices, default=TaskDeliveryStatus.RUNNING
    )
    attempts = models.PositiveIntegerField(default=1)
    duplicates = models.PositiveIntegerField(default=0)
    first_started_at = models.DateTimeField(db_default=Now())
    last_started_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        db_table = "celery_task_deliveries"
        verbose_name_plural = "task deliveries"
        indexes = [
            # Succeeded rows are deleted a day after they finished (cutover.deliveries).
            models.Index(
                fields=["finished_at"],
                condition=Q(status="succeeded"),
                name="celery_task_deliveries_done",
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=TaskDeliveryStatus.values),
                name="celery_task_deliveries_chk_status",
            ),
            models.CheckConstraint(
                condition=Q(attempts__gte=1), name="celery_task_deliveries_chk_attempts"
            ),
            # Finished exactly when no longer running.
            models.CheckConstraint(
                condition=Q(status="running", finished_at__isnull=True)
                | (~Q(status="running") & Q(finished_at__isnull=False)),
                name="celery_task_deliveries_chk_finished",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.status}"


class ReconciliationChunk(models.Model):
    """One slice of a run's users, `low` <= user_id < `high` (NULL: unbounded), compared in one
    database transaction by whichever worker takes it (SELECT ... FOR UPDATE SKIP LOCKED, the
    row lock held until the chunk commits: a worker that dies mid-chunk leaves it to be taken
    again, nothing of it recorded). `done_at` and the chunk's figures are written in the
    transaction that records its differences."""

    run = models.ForeignKey(ReconciliationRun, on_delete=models.CASCADE, related_name="+")
    seq = models.IntegerField()
    low = models.UUIDField(null=True, blank=True)
    high = models.UUIDField(null=True, blank=True)
    done_at = models.DateTimeField(null=True, blank=True)
    taken_by = models.CharField(max_length=200, blank=True, default="")
    users_checked = models.BigIntegerField(default=0)
    differences = models.BigIntegerField(default=0)
    new_discrepancies = models.BigIntegerField(default=0)
    resolved = models.BigIntegerField(default=0)
    known_differences = models.BigIntegerField(default=0)
    legacy_total = models.DecimalField(max_digits=38, decimal_places=6, default=0)
    ledger_total = models.DecimalField(max_digits=38, decimal_places=6, default=0)

    class Meta:
        db_table = "cutover_reconciliation_chunks"
        constraints = [
            models.UniqueConstraint(
                fields=["run", "seq"], name="cutover_reconciliation_chunks_uniq_seq"
            ),
            models.CheckConstraint(
                condition=Q(low__isnull=True) | Q(high__isnull=True) | Q(low__lt=models.F("high")),
                name="cutover_reconciliation_chunks_chk_range",
            ),
        ]
        indexes = [
            models.Index(
                fields=["run", "seq"],
                condition=Q(done_at__isnull=True),
                name="cutover_recon_chunks_pending",
            )
        ]

    def __str__(self) -> str:
        return f"run {self.run_id} chunk {self.seq}: {'done' if self.done_at else 'pending'}"


class ReconciliationDifference(models.Model):
    """A difference a run found, as it stood under the user's row locks when its chunk
    recorded it. Once per run, user and currency (a unique rule): a chunk taken again after a
    crash cannot record a difference twice."""

    run = models.ForeignKey(ReconciliationRun, on_delete=models.CASCADE, related_name="+")
    chunk = models.ForeignKey(ReconciliationChunk, on_delete=models.CASCADE, related_name="+")
    user_id = models.UUIDField()
    currency = models.CharField(max_length=8)
    legacy_balance = models.DecimalField(max_digits=38, decimal_places=6, null=True)
    ledger_balance = models.DecimalField(max_digits=38, decimal_places=6, null=True)
    known = models.BooleanField()

    class Meta:
        db_table = "cutover_reconciliation_differences"
        constraints = [
            models.UniqueConstraint(
                fields=["run", "user_id", "currency"],
                name="cutover_reconciliation_differences_uniq_user",
            )
        ]

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.user_id} {self.currency}"


class BackfillRun(models.Model):
    """A backfill's pass over the legacy users, split into disjoint user_id ranges
    (BackfillRange) that workers take in parallel, each with its own durable checkpoint. The
    run is finished, with its ranges' sums, once every range is. (`position` was the run's one
    checkpoint before ranges, cutover migration 0019; a run made then gets ranges when resumed.)"""

    started_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    position = models.UUIDField(null=True, blank=True)  # None: before the first user
    chunks = models.BigIntegerField(db_default=0)
    users_examined = models.BigIntegerField(db_default=0)
    postings = models.BigIntegerField(db_default=0)
    amount = models.DecimalField(max_digits=38, decimal_places=6, db_default=0)

    class Meta:
        db_table = "cutover_backfill_runs"
        constraints = [
            models.UniqueConstraint(
                fields=["finished_at"],
                condition=Q(finished_at__isnull=True),
                nulls_distinct=False,
                name="cutover_backfill_runs_uniq_unfinished",
            ),
        ]

    def __str__(self) -> str:
        state = f"finished {self.finished_at:%Y-%m-%d %H:%M}" if self.finished_at else "running"
        return f"backfill run {self.pk}: {self.users_examined} users, {state}"


class BackfillRange(models.Model):
    """One of a backfill run's user ranges, `low` <= user_id < `high` (NULL: unbounded), and its
    durable checkpoint: `position` (the last user it has covered) and its counts move with each
    chunk, in the chunk's transaction (cutover_backfill_range_chunk), under the range's row
    lock: a worker takes a range with SELECT ... FOR UPDATE SKIP LOCKED for one chunk, so
    several workers work different ranges at once, and a worker killed mid-chunk leaves the
    range at its last committed checkpoint for the next taker. `seq` also picks the
    opening-balance equity shard its chunks post against (seq modulo 64)."""

    run = models.ForeignKey(BackfillRun, on_delete=models.CASCADE, related_name="ranges")
    seq = models.IntegerField()
    low = models.UUIDField(null=True, blank=True)
    high = models.UUIDField(null=True, blank=True)
    position = models.UUIDField(null=True, blank=True)  # None: before the range's first user
    updated_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    chunks = models.BigIntegerField(db_default=0)
    users_examined = models.BigIntegerField(db_default=0)
    postings = models.BigIntegerField(db_default=0)
    amount = models.DecimalField(max_digits=38, decimal_places=6, db_default=0)

    class Meta:
        db_table = "cutover_backfill_ranges"
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="cutover_backfill_ranges_uniq_seq"),
            models.CheckConstraint(
                condition=Q(low__isnull=True) | Q(high__isnull=True) | Q(low__lt=models.F("high")),
                name="cutover_backfill_ranges_chk_range",
            ),
        ]

    def __str__(self) -> str:
        return f"backfill run {self.run_id} range {self.seq}: {self.users_examined} users"


class BackfillPosting(models.Model):
    """One user's backfill posting: the difference (legacy - ledger) found under the user's
    locks, posted in its chunk's ledger transaction. Unique per state of the user's account
    (its entry count when the difference was computed), so the database refuses a second
    posting computed from the same state: no user is ever posted twice for one difference."""

    run_id = models.BigIntegerField()  # its BackfillRun
    user_id = models.UUIDField()
    currency = models.CharField(max_length=8)
    entries_before = models.BigIntegerField()
    legacy_balance = models.DecimalField(max_digits=38, decimal_places=6)
    amount = models.DecimalField(max_digits=38, decimal_places=6)  # signed: to the user
    ledger_transaction_id = models.BigIntegerField()

    class Meta:
        db_table = "cutover_backfill_postings"
        constraints = [
            models.UniqueConstraint(
                fields=["user_id", "entries_before"],
                name="cutover_backfill_postings_uniq_user_state",
            ),
            models.CheckConstraint(
                condition=~Q(amount=0), name="cutover_backfill_postings_chk_amount"
            ),
        ]

    def __str__(self) -> str:
        return f"backfill of {self.amount} {self.currency} to user {self.user_id}"
