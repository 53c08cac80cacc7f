"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/), which now also holds what other
apps need of the ledger instead of its tables: ledger_user_account_type(), the views
ledger_user_balances and ledger_system_balances, and ledger_user_account_open()."""

from pathlib import Path

from django.db import migrations

SQL = (Path(__file__).resolve().parent / "sql" / "0006_ledger_contract.sql").read_text()


class Migration(migrations.Migration):
    dependencies = [("ledger", "0005_rules_held")]

    operations = [
        migrations.RunSQL(
            sql=SQL,
            reverse_sql=(
                "DROP FUNCTION IF EXISTS ledger_user_account_open(uuid, text);"
                "DROP VIEW IF EXISTS ledger_system_balances;"
                "DROP VIEW IF EXISTS ledger_user_balances;"
                "DROP FUNCTION IF EXISTS ledger_user_account_type(text);"
            ),
        ),
    ]
