"""The legacy store's archive, alert states and Celery task deliveries."""

from datetime import timedelta

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now


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
