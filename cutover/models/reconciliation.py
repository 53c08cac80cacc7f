"""Reconciliation runs, their chunks (taken by workers in parallel) and the differences found."""

from django.db import models
from django.db.models import Q

from cutover.models.phase import PHASE_CHOICES


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
