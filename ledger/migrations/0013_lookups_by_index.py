"""The entry trigger (ledger_entry_apply) and the commit check (ledger_transaction_check) read
by index however small the tables were when their look-ups were planned. Re-installs
ledger/sql/ledger.sql (frozen in migrations/sql/): both functions gain `SET enable_seqscan =
off`. Their plans are kept per connection until the table is analyzed again; planned while the
ledger was nearly empty (a new deployment, or just backfilled), the transaction look-up became a
sequential scan that read the whole growing table for every entry."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0012_entries_checked_by_trigger")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0013_lookups_by_index.sql").read_text(),
            reverse_sql=(SQL_DIR / "0012_entries_checked_by_trigger.sql").read_text(),
        ),
    ]
