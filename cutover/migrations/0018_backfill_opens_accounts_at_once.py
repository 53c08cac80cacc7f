"""cutover/sql/cutover.sql (frozen in migrations/sql/): a backfill chunk opens its users' ledger
accounts in one statement (ledger_user_accounts_open, ledger migration 0009) instead of one
function call per user."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0017_clearing_shards"),
        ("ledger", "0009_account_opening"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0018_backfill_opens_accounts_at_once.sql").read_text(),
            reverse_sql=(SQL_DIR / "0017_clearing_shards.sql").read_text(),
        ),
    ]
