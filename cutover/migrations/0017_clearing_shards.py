"""cutover/sql/cutover.sql (frozen in migrations/sql/): the balance path picks its counterparty's
shard modulo 64, over the shards ledger migration 0008 adds (16 before). Existing postings stay
on their shards; a clearing balance is the sum over all of a type's shards either way."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0016_backfill_chunks"),
        ("ledger", "0008_hot_accounts"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0017_clearing_shards.sql").read_text(),
            reverse_sql=(SQL_DIR / "0016_backfill_chunks.sql").read_text(),
        ),
    ]
