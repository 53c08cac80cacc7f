"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/), which now also refuses an
account inserted with a balance, entries or a chain head (ledger_account_opened_empty): money
moves into an account only by posting entries."""

from pathlib import Path

from django.db import migrations

SQL = (Path(__file__).resolve().parent / "sql" / "0009_accounts_open_empty.sql").read_text()


class Migration(migrations.Migration):
    dependencies = [("ledger", "0008_hot_accounts")]

    operations = [
        migrations.RunSQL(
            sql=SQL,
            reverse_sql=(
                "DROP TRIGGER IF EXISTS ledger_accounts_opened_empty ON ledger_accounts;"
                "DROP FUNCTION IF EXISTS ledger_account_opened_empty();"
            ),
        ),
    ]
