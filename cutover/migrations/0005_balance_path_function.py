"""Re-installs cutover/sql/cutover.sql as it was then (frozen in migrations/sql/), which now
carries the balance path's SQL function."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("cutover", "0004_api_clients"), ("ledger", "0004_clearing_shards")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0005_balance_path_function.sql").read_text(),
            reverse_sql=(
                "DROP FUNCTION IF EXISTS cutover_balance_mutate"
                "(uuid, text, numeric, text, text, text, text, text);"
            ),
        ),
    ]
