"""Re-installs ledger/sql/ledger.sql as it was then (frozen in migrations/sql/), which now also
refuses any change of an account's balance, entry count or hash chain head that does not come
from posting an entry (LD009), and any change of its currency or normal balance."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0004_clearing_shards")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0005_rules_held.sql").read_text(),
            reverse_sql=(
                "DROP TRIGGER IF EXISTS ledger_accounts_guard ON ledger_accounts;"
                "DROP FUNCTION IF EXISTS ledger_account_guard();"
            ),
        ),
    ]
