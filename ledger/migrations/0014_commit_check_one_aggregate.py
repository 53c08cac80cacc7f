"""Re-installs ledger/sql/ledger.sql (frozen in migrations/sql/): the commit check
(ledger_transaction_check) reads a transaction's entries in one aggregate and never plans in
parallel. After a backfill (a few transactions of many entries) the statistics made every
transaction look large, and the generic plan kept for the check became a parallel one (a Gather
Merge over a parallel index scan and two aggregates), set up at every COMMIT. A transaction in
several currencies is checked per currency as before."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0013_posting_plans")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0014_commit_check_one_aggregate.sql").read_text(),
            reverse_sql=(SQL_DIR / "0013_posting_plans.sql").read_text(),
        ),
    ]
