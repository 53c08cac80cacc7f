"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/), which now also
- refuses an account inserted with a balance, entries or a chain head
  (ledger_account_opened_empty): money moves into an account only by posting entries;
- opens many users' balance accounts in one statement (ledger_user_accounts_open, which
  ledger_user_account_open now calls for one): the backfill opens a chunk's at once."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0008_hot_accounts")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0009_account_opening.sql").read_text(),
            reverse_sql=(SQL_DIR / "0007_deployment_checklist.sql").read_text()
            + "DROP FUNCTION IF EXISTS ledger_user_accounts_open(uuid[], text[]);"
            "DROP TRIGGER IF EXISTS ledger_accounts_opened_empty ON ledger_accounts;"
            "DROP FUNCTION IF EXISTS ledger_account_opened_empty();",
        ),
    ]
