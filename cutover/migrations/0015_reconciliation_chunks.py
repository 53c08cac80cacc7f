"""Reconciliation in chunks that workers take in parallel: a run is running until its last
chunk is done (one running run at a time), its chunks (a user_id range each) and the
differences it found (once per run, user and currency). Runs recorded before were complete."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0014_experiment_timings"),
    ]

    operations = [
        migrations.CreateModel(
            name="ReconciliationChunk",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("seq", models.IntegerField()),
                ("low", models.UUIDField(blank=True, null=True)),
                ("high", models.UUIDField(blank=True, null=True)),
                ("done_at", models.DateTimeField(blank=True, null=True)),
                ("taken_by", models.CharField(blank=True, default="", max_length=200)),
                ("users_checked", models.BigIntegerField(default=0)),
                ("differences", models.BigIntegerField(default=0)),
                ("new_discrepancies", models.BigIntegerField(default=0)),
                ("resolved", models.BigIntegerField(default=0)),
                ("known_differences", models.BigIntegerField(default=0)),
                ("legacy_total", models.DecimalField(decimal_places=6, default=0, max_digits=38)),
                ("ledger_total", models.DecimalField(decimal_places=6, default=0, max_digits=38)),
            ],
            options={
                "db_table": "cutover_reconciliation_chunks",
            },
        ),
        migrations.CreateModel(
            name="ReconciliationDifference",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("user_id", models.UUIDField()),
                ("currency", models.CharField(max_length=8)),
                ("legacy_balance", models.DecimalField(decimal_places=6, max_digits=38, null=True)),
                ("ledger_balance", models.DecimalField(decimal_places=6, max_digits=38, null=True)),
                ("known", models.BooleanField()),
            ],
            options={
                "db_table": "cutover_reconciliation_differences",
            },
        ),
        migrations.AlterModelOptions(
            name="reconciliationrun",
            options={
                "ordering": [
                    models.OrderBy(models.F("finished_at"), descending=True, nulls_last=True),
                    "-id",
                ]
            },
        ),
        migrations.AddField(
            model_name="reconciliationrun",
            name="chunks",
            field=models.IntegerField(db_default=1, default=1),
        ),
        migrations.AddField(
            model_name="reconciliationrun",
            name="status",
            field=models.CharField(
                choices=[
                    ("running", "Running"),
                    ("completed", "Completed"),
                    ("abandoned", "Abandoned (the phase left dual writes)"),
                ],
                default="running",
                max_length=16,
            ),
        ),
        # The runs recorded before this migration were whole runs, all completed.
        migrations.RunSQL(
            "UPDATE cutover_reconciliation_runs SET status = 'completed'",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name="reconciliationrun",
            name="differences",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AlterField(
            model_name="reconciliationrun",
            name="finished_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="reconciliationrun",
            name="ledger_total",
            field=models.DecimalField(db_default=0, decimal_places=6, default=0, max_digits=38),
        ),
        migrations.AlterField(
            model_name="reconciliationrun",
            name="legacy_total",
            field=models.DecimalField(db_default=0, decimal_places=6, default=0, max_digits=38),
        ),
        migrations.AlterField(
            model_name="reconciliationrun",
            name="new_discrepancies",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AlterField(
            model_name="reconciliationrun",
            name="resolved",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AlterField(
            model_name="reconciliationrun",
            name="users_checked",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AddConstraint(
            model_name="reconciliationrun",
            constraint=models.UniqueConstraint(
                condition=models.Q(("status", "running")),
                fields=("status",),
                name="cutover_reconciliation_runs_one_running",
            ),
        ),
        migrations.AddConstraint(
            model_name="reconciliationrun",
            constraint=models.CheckConstraint(
                condition=models.Q(("status__in", ["running", "completed", "abandoned"])),
                name="cutover_reconciliation_runs_chk_status",
            ),
        ),
        migrations.AddConstraint(
            model_name="reconciliationrun",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("finished_at__isnull", True), ("status", "running")),
                    models.Q(
                        models.Q(("status", "running"), _negated=True),
                        ("finished_at__isnull", False),
                    ),
                    _connector="OR",
                ),
                name="cutover_reconciliation_runs_chk_finished",
            ),
        ),
        migrations.AddField(
            model_name="reconciliationchunk",
            name="run",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="cutover.reconciliationrun",
            ),
        ),
        migrations.AddField(
            model_name="reconciliationdifference",
            name="chunk",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="cutover.reconciliationchunk",
            ),
        ),
        migrations.AddField(
            model_name="reconciliationdifference",
            name="run",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="cutover.reconciliationrun",
            ),
        ),
        migrations.AddIndex(
            model_name="reconciliationchunk",
            index=models.Index(
                condition=models.Q(("done_at__isnull", True)),
                fields=["run", "seq"],
                name="cutover_recon_chunks_pending",
            ),
        ),
        migrations.AddConstraint(
            model_name="reconciliationchunk",
            constraint=models.UniqueConstraint(
                fields=("run", "seq"), name="cutover_reconciliation_chunks_uniq_seq"
            ),
        ),
        migrations.AddConstraint(
            model_name="reconciliationchunk",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("low__isnull", True),
                    ("high__isnull", True),
                    ("low__lt", models.F("high")),
                    _connector="OR",
                ),
                name="cutover_reconciliation_chunks_chk_range",
            ),
        ),
        migrations.AddConstraint(
            model_name="reconciliationdifference",
            constraint=models.UniqueConstraint(
                fields=("run", "user_id", "currency"),
                name="cutover_reconciliation_differences_uniq_user",
            ),
        ),
    ]
