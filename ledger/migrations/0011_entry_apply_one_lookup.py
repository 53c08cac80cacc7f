"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/): the entry trigger
(ledger_entry_apply) reads its account and checks its transaction in one statement instead of
two; it runs for every entry of every posting."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0010_buffer_shards")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0011_entry_apply_one_lookup.sql").read_text(),
            reverse_sql=(SQL_DIR / "0009_account_opening.sql").read_text(),
        ),
    ]
