"""Re-installs onchain/sql/onchain.sql (frozen in migrations/sql/): a deposit address's currency
rule (OC002) reads a user's currency through the ledger's ledger_user_balances view."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("onchain", "0003_money_paths"), ("ledger", "0006_ledger_contract")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0004_ledger_contract.sql").read_text(),
            reverse_sql=(
                "DROP TRIGGER IF EXISTS onchain_deposit_address_currency"
                " ON onchain_deposit_addresses;"
                "DROP FUNCTION IF EXISTS onchain_deposit_address_currency();"
            ),
        ),
    ]
