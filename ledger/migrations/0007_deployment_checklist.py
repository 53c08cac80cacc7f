"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/), which now also holds the
deployment checklist's names: ledger_entries.entry_type (the side, generated) and the view
v_user_balances."""

from pathlib import Path

from django.db import migrations

SQL = (Path(__file__).resolve().parent / "sql" / "0007_deployment_checklist.sql").read_text()


class Migration(migrations.Migration):
    dependencies = [("ledger", "0006_ledger_contract")]

    operations = [
        migrations.RunSQL(
            sql=SQL,
            reverse_sql=(
                "DROP VIEW IF EXISTS v_user_balances;"
                "ALTER TABLE ledger_entries DROP COLUMN IF EXISTS entry_type;"
            ),
        ),
    ]
