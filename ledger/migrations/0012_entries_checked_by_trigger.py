"""Fewer statements per entry, every invariant kept. Re-installs ledger/sql/ledger.sql (frozen in
migrations/sql/):
- the entry trigger (ledger_entry_apply) reads its account and checks its transaction in one
  statement instead of two;
- ledger_post_transaction computes the legs' fingerprint and inserts the transaction in one;
- the entries' foreign keys are dropped, to its transaction (Django's, db_constraint now False)
  and to its account and currency (ledger.sql's composite one): the entry trigger already checks
  all three under the account's row lock, and each key re-read and key-share-locked the same
  rows once per entry (the transaction's again at COMMIT). What the keys also held is held by
  triggers: an account with entries cannot be deleted (ledger_account_delete_refuse, new) nor
  renumbered (ledger_account_guard now covers `id`); transactions already never change."""

from pathlib import Path

import django.db.models.deletion
from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0011_equity_shards")]

    operations = [
        migrations.AlterField(
            model_name="entry",
            name="transaction",
            field=models.ForeignKey(
                db_constraint=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="entries",
                to="ledger.transaction",
            ),
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0012_entries_checked_by_trigger.sql").read_text(),
            reverse_sql=(SQL_DIR / "0009_account_opening.sql").read_text()
            + "DROP TRIGGER IF EXISTS ledger_accounts_kept ON ledger_accounts;"
            "DROP FUNCTION IF EXISTS ledger_account_delete_refuse();",
        ),
    ]
