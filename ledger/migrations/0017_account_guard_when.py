"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/): ledger_accounts_guard gets a
WHEN clause that lets the entry trigger's account update (one level deeper than a statement,
the count moved by one, the chain to a new head) through without calling its function, which
every posting's two account updates called before, each reading the call stack; the entries'
CHECK constraints (a positive amount, a side) are held by the entry trigger under the same
names. The models keep declaring the CHECKs (Django's state and validation are unchanged)."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"

CHECKS_RESTORED = """
ALTER TABLE ledger_entries
    ADD CONSTRAINT ledger_entries_chk_positive CHECK (amount > 0),
    ADD CONSTRAINT ledger_entries_chk_side CHECK (side IN ('debit', 'credit'));
"""


class Migration(migrations.Migration):
    dependencies = [("ledger", "0016_account_rules_trigger")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0017_account_guard_when.sql").read_text(),
            reverse_sql=CHECKS_RESTORED + (SQL_DIR / "0016_account_rules_trigger.sql").read_text(),
        ),
    ]
