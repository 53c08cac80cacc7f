"""The chunked backfill: a run's durable checkpoint (cutover_backfill_runs: at most one
unfinished run) and one row per user posted (cutover_backfill_postings, unique per state of the
user's account); cutover/sql/cutover.sql (frozen in migrations/sql/) adds
cutover_backfill_chunk, one chunk of users posted set-based under the balance path's locks."""

from pathlib import Path

import django.db.models.functions.datetime
from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0012_discrepancy_triage"),
    ]

    operations = [
        migrations.CreateModel(
            name="BackfillRun",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "started_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                (
                    "updated_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                ("finished_at", models.DateTimeField(blank=True, null=True)),
                ("position", models.UUIDField(blank=True, null=True)),
                ("chunks", models.BigIntegerField(db_default=0)),
                ("users_examined", models.BigIntegerField(db_default=0)),
                ("postings", models.BigIntegerField(db_default=0)),
                ("amount", models.DecimalField(db_default=0, decimal_places=6, max_digits=38)),
            ],
            options={
                "db_table": "cutover_backfill_runs",
                "constraints": [
                    models.UniqueConstraint(
                        condition=models.Q(("finished_at__isnull", True)),
                        fields=("finished_at",),
                        name="cutover_backfill_runs_uniq_unfinished",
                        nulls_distinct=False,
                    )
                ],
            },
        ),
        migrations.CreateModel(
            name="BackfillPosting",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("user_id", models.UUIDField()),
                ("currency", models.CharField(max_length=8)),
                ("entries_before", models.BigIntegerField()),
                ("legacy_balance", models.DecimalField(decimal_places=6, max_digits=38)),
                ("amount", models.DecimalField(decimal_places=6, max_digits=38)),
                ("ledger_transaction_id", models.BigIntegerField()),
                ("run_id", models.BigIntegerField()),
            ],
            options={
                "db_table": "cutover_backfill_postings",
                "constraints": [
                    models.UniqueConstraint(
                        fields=("user_id", "entries_before"),
                        name="cutover_backfill_postings_uniq_user_state",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("amount", 0), _negated=True),
                        name="cutover_backfill_postings_chk_amount",
                    ),
                ],
            },
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0013_backfill_chunks.sql").read_text(),
            reverse_sql=(SQL_DIR / "0013_backfill_chunks_drop.sql").read_text(),
        ),
    ]
