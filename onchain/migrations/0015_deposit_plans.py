"""Re-installs onchain/sql/onchain.sql (frozen in migrations/sql/): onchain_deposit_credit and
onchain_deposit_notification_accept read by index (`SET enable_seqscan = off`). Their plans are
kept per connection until a table is analyzed again, and the inbox's and the journal's look-ups
planned while those were empty (a new deployment, analyzed) became sequential scans over the
whole growing tables, for every notification."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0014_inbox_written_once"),
        ("cutover", "0021_balance_path_plans"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0015_deposit_plans.sql").read_text(),
            reverse_sql=(SQL_DIR / "0014_inbox_written_once.sql").read_text(),
        ),
    ]
