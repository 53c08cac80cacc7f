"""The legacy store's archive (the deployment checklist's Phase 5): its record, the permission
to make it, and cutover/sql/cutover.sql (frozen in migrations/sql/) with the schema
`legacy_archive` and the rules that keep it (an archive only after its time in cutover, no phase
but cutover once archived). The way down is refused once an archive is recorded."""

import datetime
from pathlib import Path

import django.db.models.functions.datetime
from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0010_deployment_checklist"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="phasestate",
            options={
                "permissions": [
                    ("advance_phase", "Can advance the rollout to the next phase"),
                    ("force_gate", "Can advance past a gate that is not met (with a reason)"),
                    ("rollback_phase", "Can roll the rollout back to legacy"),
                    ("operate_kill_switch", "Can engage and release the kill switch"),
                    ("open_custody", "Can book a system buffer's custody opening balance"),
                    ("archive_legacy", "Can archive the legacy store after its time in cutover"),
                ],
                "verbose_name": "phase and flags",
                "verbose_name_plural": "phase and flags",
            },
        ),
        migrations.CreateModel(
            name="LegacyArchive",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("table_name", models.CharField(max_length=63, unique=True)),
                ("archived_as", models.CharField(max_length=127)),
                ("rows", models.BigIntegerField()),
                ("totals", models.JSONField()),
                ("cutover_entered_at", models.DateTimeField()),
                ("min_time_in_cutover", models.DurationField()),
                (
                    "archived_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                ("archived_by", models.CharField(max_length=150)),
                ("reason", models.TextField()),
            ],
            options={
                "db_table": "cutover_legacy_archives",
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("rows__gte", 0)),
                        name="cutover_legacy_archives_chk_rows",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("min_time_in_cutover__gt", datetime.timedelta(0))),
                        name="cutover_legacy_archives_chk_min_time",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("reason", ""), _negated=True),
                        name="cutover_legacy_archives_chk_reason",
                    ),
                ],
            },
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0011_legacy_archive.sql").read_text(),
            reverse_sql=(SQL_DIR / "0011_legacy_archive_drop.sql").read_text(),
        ),
    ]
