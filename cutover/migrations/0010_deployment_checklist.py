"""Re-installs cutover/sql/cutover.sql (frozen in migrations/sql/), which now also holds the
deployment checklist's `users` view (every user either store holds)."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("cutover", "0009_ledger_contract")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0010_deployment_checklist.sql").read_text(),
            reverse_sql="DROP VIEW IF EXISTS users;",
        ),
    ]
