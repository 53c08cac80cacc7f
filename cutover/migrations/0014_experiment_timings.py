"""The shadow experiment's figures on the balance path's journal: each mutation's legacy and
ledger write times (legacy_us, ledger_us: microseconds, NULL where the phase does not write that
store) and whether the stores differed after the dual write (mismatch); cutover/sql/cutover.sql
(frozen in migrations/sql/) has cutover_balance_mutate measure and record them. Online: nullable
columns and a constant default add no rewrite of the journal. The way down installs 0012's
function again and keeps the columns with what they hold (that function does not write them;
the journal is append-only and a drill goes down and up again losing nothing); the way up adds
them only if they are missing."""

from pathlib import Path

from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"

COLUMNS_SQL = """
    ALTER TABLE cutover_balance_mutations
        ADD COLUMN IF NOT EXISTS legacy_us bigint NULL,
        ADD COLUMN IF NOT EXISTS ledger_us bigint NULL,
        ADD COLUMN IF NOT EXISTS mismatch boolean DEFAULT false NOT NULL;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0013_task_deliveries"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddField(
                    model_name="balancemutation",
                    name="legacy_us",
                    field=models.BigIntegerField(blank=True, null=True),
                ),
                migrations.AddField(
                    model_name="balancemutation",
                    name="ledger_us",
                    field=models.BigIntegerField(blank=True, null=True),
                ),
                migrations.AddField(
                    model_name="balancemutation",
                    name="mismatch",
                    field=models.BooleanField(db_default=False),
                ),
            ],
            database_operations=[
                migrations.RunSQL(sql=COLUMNS_SQL, reverse_sql=migrations.RunSQL.noop),
            ],
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0014_experiment_timings.sql").read_text(),
            reverse_sql=(SQL_DIR / "0012_discrepancy_triage.sql").read_text(),
        ),
    ]
