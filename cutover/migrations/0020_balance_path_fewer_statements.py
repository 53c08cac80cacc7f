"""Re-installs cutover/sql/cutover.sql (frozen in migrations/sql/): the balance path's legacy
write is one statement that locks, checks and writes the row (a credit's upsert, a debit's
conditional update; the row read only to say why nothing was written), the custody look-up runs
in phase legacy only, a CU005 names the user in its HINT (so onchain_deposit_credit no
longer needs a subtransaction of its own to add it), and a caller that can repeat the call may
run the ledger's write without its subtransaction (p_isolate_ledger false; the function's
signature gains it, default true). The journal's reference loses its pattern
index (`_like`, for LIKE 'prefix%' searches nothing makes; the admin's search is a contains):
one index fewer written per mutation, the unique index stays."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0019_backfill_ranges"),
        ("ledger", "0012_entries_checked_by_trigger"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0020_balance_path_fewer_statements.sql").read_text(),
            reverse_sql="DROP FUNCTION IF EXISTS cutover_balance_mutate("
            "uuid, text, numeric, text, text, text, text, text, boolean);"
            + (SQL_DIR / "0019_backfill_ranges.sql").read_text(),
        ),
        migrations.RunSQL(
            sql="DROP INDEX IF EXISTS cutover_balance_mutations_reference_0f220979_like",
            reverse_sql=(
                "CREATE INDEX IF NOT EXISTS cutover_balance_mutations_reference_0f220979_like"
                " ON cutover_balance_mutations (reference varchar_pattern_ops)"
            ),
        ),
    ]
