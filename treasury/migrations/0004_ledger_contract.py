"""Re-installs treasury/sql/treasury.sql (frozen in migrations/sql/): v_buffer_status reads the
buffers through the ledger's ledger_system_balances view."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("treasury", "0003_money_paths"), ("ledger", "0006_ledger_contract")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0004_ledger_contract.sql").read_text(),
            reverse_sql=(SQL_DIR / "0003_money_paths.sql").read_text(),
        ),
    ]
