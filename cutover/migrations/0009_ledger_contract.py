"""Re-installs cutover/sql/cutover.sql (frozen in migrations/sql/): the balance path reads and
opens users' accounts through the ledger's views and functions instead of its tables."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0008_api_clients_to_gateway"),
        ("ledger", "0006_ledger_contract"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0009_ledger_contract.sql").read_text(),
            reverse_sql=(SQL_DIR / "0006_money_rules.sql").read_text(),
        ),
    ]
