"""celery_task_deliveries moves to this app (its model only; the table stays as it is): every
app that runs Celery tasks builds on cutover, and the workers' record is not on-chain logic.
onchain 0012 created the table; onchain 0013 drops the model from onchain's state."""

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0012_discrepancy_triage"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="TaskDelivery",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True,
                                primary_key=True,
                                serialize=False,
                                verbose_name="ID",
                            ),
                        ),
                        ("task_id", models.CharField(max_length=255, unique=True)),
                        ("task_name", models.CharField(max_length=255)),
                        (
                            "status",
                            models.CharField(
                                choices=[
                                    ("running", "Running"),
                                    ("succeeded", "Succeeded"),
                                    ("failed", "Failed"),
                                    ("dead", "Dead"),
                                ],
                                default="running",
                                max_length=16,
                            ),
                        ),
                        ("attempts", models.PositiveIntegerField(default=1)),
                        ("duplicates", models.PositiveIntegerField(default=0)),
                        (
                            "first_started_at",
                            models.DateTimeField(
                                db_default=django.db.models.functions.datetime.Now()
                            ),
                        ),
                        (
                            "last_started_at",
                            models.DateTimeField(
                                db_default=django.db.models.functions.datetime.Now()
                            ),
                        ),
                        ("finished_at", models.DateTimeField(blank=True, null=True)),
                        ("error", models.TextField(blank=True)),
                    ],
                    options={
                        "verbose_name_plural": "task deliveries",
                        "db_table": "celery_task_deliveries",
                        "indexes": [
                            models.Index(
                                condition=models.Q(("status", "succeeded")),
                                fields=["finished_at"],
                                name="celery_task_deliveries_done",
                            )
                        ],
                        "constraints": [
                            models.CheckConstraint(
                                condition=models.Q(
                                    ("status__in", ["running", "succeeded", "failed", "dead"])
                                ),
                                name="celery_task_deliveries_chk_status",
                            ),
                            models.CheckConstraint(
                                condition=models.Q(("attempts__gte", 1)),
                                name="celery_task_deliveries_chk_attempts",
                            ),
                            models.CheckConstraint(
                                condition=models.Q(
                                    models.Q(("finished_at__isnull", True), ("status", "running")),
                                    models.Q(
                                        models.Q(("status", "running"), _negated=True),
                                        ("finished_at__isnull", False),
                                    ),
                                    _connector="OR",
                                ),
                                name="celery_task_deliveries_chk_finished",
                            ),
                        ],
                    },
                ),
            ],
        ),
    ]
