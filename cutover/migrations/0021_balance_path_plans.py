"""Re-installs cutover/sql/cutover.sql (frozen in migrations/sql/): cutover_balance_mutate reads
by index (`SET enable_seqscan = off`): its plans are kept per connection until a table is
analyzed again, and the journal's reference look-up planned while the journal was empty became
a sequential scan over the whole growing journal. The phase and the reference's journal row are
read in one statement, and the one-currency check reads only the store the phase does not write
(each write refuses another currency in its own store, the currency before the funds)."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0020_balance_path_fewer_statements"),
        ("ledger", "0014_commit_check_one_aggregate"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0021_balance_path_plans.sql").read_text(),
            reverse_sql=(SQL_DIR / "0020_balance_path_fewer_statements.sql").read_text(),
        ),
    ]
