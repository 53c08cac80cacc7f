"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/): three of ledger_accounts' CHECK
constraints (a user's account never negative, a user's or a system account, the normal balance a
side) become the trigger ledger_accounts_rules, which checks them only when those columns are
written and fails under the same constraint names and SQLSTATE. As CHECKs they were prepared
again at every account update, two per posting. The models keep declaring them (Django's state
and validation are unchanged); the balance's own CHECK stays."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"

CHECKS_RESTORED = """
DROP TRIGGER IF EXISTS ledger_accounts_rules ON ledger_accounts;
DROP FUNCTION IF EXISTS ledger_account_kind_check();
ALTER TABLE ledger_accounts
    ADD CONSTRAINT ledger_accounts_chk_user_never_negative
        CHECK (user_id IS NULL OR NOT allow_negative),
    ADD CONSTRAINT ledger_accounts_chk_user_or_system
        CHECK ((user_id IS NULL AND code IS NOT NULL) OR (user_id IS NOT NULL AND code IS NULL)),
    ADD CONSTRAINT ledger_accounts_chk_normal_balance
        CHECK (normal_balance IN ('debit', 'credit'));
"""


class Migration(migrations.Migration):
    dependencies = [("ledger", "0015_account_id_currency_index_dropped")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0016_account_rules_trigger.sql").read_text(),
            reverse_sql=CHECKS_RESTORED
            + (SQL_DIR / "0014_commit_check_one_aggregate.sql").read_text(),
        ),
    ]
