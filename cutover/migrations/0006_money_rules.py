"""Issue 9's money rules in the cutover: custody (the buffers' openings and custody
discrepancies), one ledger balance account per user (one currency per user, in every phase),
and a re-install of cutover/sql/cutover.sql as it was then, frozen in migrations/sql/ (the
journal made append-only; the balance path's currency rule, legacy mirror and overflow-free
shard)."""

from pathlib import Path

import django.db.models.functions.datetime
from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"

ONE_BALANCE_ACCOUNT = """
CREATE UNIQUE INDEX IF NOT EXISTS cutover_one_balance_account_per_user ON ledger_accounts (user_id)
 WHERE user_id IS NOT NULL AND account_type = lower(currency) || '_balance';
"""


class Migration(migrations.Migration):
    dependencies = [("cutover", "0005_balance_path_function"), ("ledger", "0005_rules_held")]

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
                ],
                "verbose_name": "phase and flags",
                "verbose_name_plural": "phase and flags",
            },
        ),
        migrations.CreateModel(
            name="CustodyOpening",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("currency", models.CharField(max_length=8, unique=True)),
                ("reported", models.DecimalField(decimal_places=6, max_digits=38)),
                ("source", models.CharField(max_length=64)),
                ("buffer_before", models.DecimalField(decimal_places=6, max_digits=38)),
                ("ledger_transaction_id", models.BigIntegerField(blank=True, null=True)),
                ("opened_by", models.CharField(max_length=150)),
                ("reason", models.TextField()),
                (
                    "opened_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
            ],
            options={
                "db_table": "cutover_custody_openings",
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("reported__gte", 0)),
                        name="cutover_custody_openings_chk_reported",
                    )
                ],
            },
        ),
        migrations.CreateModel(
            name="CustodyDiscrepancy",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("currency", models.CharField(max_length=8)),
                ("source", models.CharField(max_length=64)),
                ("ledger_balance", models.DecimalField(decimal_places=6, max_digits=38)),
                ("reported", models.DecimalField(decimal_places=6, max_digits=38)),
                ("difference", models.DecimalField(decimal_places=6, max_digits=38)),
                (
                    "status",
                    models.CharField(
                        choices=[("open", "Open"), ("resolved", "Resolved")],
                        default="open",
                        max_length=8,
                    ),
                ),
                ("occurrences", models.PositiveIntegerField(db_default=1)),
                (
                    "first_seen_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                (
                    "last_seen_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                ("resolved_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={
                "verbose_name_plural": "custody discrepancies",
                "db_table": "cutover_custody_discrepancies",
                "ordering": ["-last_seen_at", "-id"],
                "constraints": [
                    models.UniqueConstraint(
                        condition=models.Q(("status", "open")),
                        fields=("currency", "source"),
                        name="cutover_custody_discrepancies_uniq_open",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("status__in", ["open", "resolved"])),
                        name="cutover_custody_discrepancies_chk_status",
                    ),
                ],
            },
        ),
        migrations.RunSQL(
            sql=ONE_BALANCE_ACCOUNT,
            reverse_sql="DROP INDEX IF EXISTS cutover_one_balance_account_per_user;",
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0006_money_rules.sql").read_text(),
            reverse_sql=(
                "DROP TRIGGER IF EXISTS cutover_balance_mutations_append_only"
                " ON cutover_balance_mutations;"
            ),
        ),
    ]
