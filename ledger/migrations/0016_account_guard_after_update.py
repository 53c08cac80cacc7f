"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/): the account guard
(ledger_accounts_guard) is an AFTER UPDATE trigger whose WHEN holds the rule: an account's id,
currency and normal balance never change, and its balance, entry count and chain head change
only inside the entry trigger, which now runs with `ledger.entry_apply` on. On the posting path
the WHEN is false and nothing more runs; as a BEFORE trigger it re-read and re-locked the row
at every account update (about 7 us of a 20 us update, two per posting), even when its function
was not called. What it refuses, and with which error (LD009), is unchanged."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0015_account_id_currency_index_dropped")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0016_account_guard_after_update.sql").read_text(),
            reverse_sql=(SQL_DIR / "0014_commit_check_one_aggregate.sql").read_text(),
        ),
    ]
