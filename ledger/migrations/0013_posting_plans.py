"""A posting's plans made once per connection, whatever the tables held when they were made.
Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/):
- the entry trigger (ledger_entry_apply) and the commit check (ledger_transaction_check) read
  by index (`SET enable_seqscan = off`): their plans are kept per connection until the table is
  analyzed again, and planned while the ledger was nearly empty (a new deployment, or one just
  backfilled) the transaction look-up became a sequential scan that read the whole growing table
  for every entry;
- the commit check's query is planned once (`plan_cache_mode = force_generic_plan`), not at
  every COMMIT;
- ledger_entry_hash is STABLE (as concat_ws is), so the planner inlines it; IMMUTABLE, it was
  parsed and planned again at every call."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0012_entries_checked_by_trigger")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0013_posting_plans.sql").read_text(),
            reverse_sql=(SQL_DIR / "0012_entries_checked_by_trigger.sql").read_text(),
        ),
    ]
